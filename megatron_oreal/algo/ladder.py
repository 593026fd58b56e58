"""The paper's ablation ladder (docs/algorithm.md §6.2, [P Tab 2] / [P Fig 2]) as AlgoConfig overrides.

Each rung adds one component to the previous one; apply with `algo.<key>=<value>` overrides or
`dataclasses.replace(cfg.algo, **ABLATIONS[name])`.

- reinforce:       REINFORCE baseline. A = r (±1), every sample trained, one shared per-token denominator,
                   no token weights, no actor freeze.
- reward_shaping:  + reward shaping (L₂): GRPO-style advantages (r − mean)/std on every sample, as the
                   authors describe this row (docs/algorithm.md §6.2, COLM review thread); OREAL itself shapes with
                   RLOO. Same settings as "grpo" (kept as its own name for the paper's ladder).
- behavior_cloning: + BC on positives (L₁): positives get the advantage-scaled NLL over N⁺, negatives the
                   η-weighted policy gradient over N⁻; still every sample and ω = 1. This is the reference's
                   no-token-RM config ([C7-noRM]: no filter, no freeze).
- oreal:           + token-level RM weighting (L_total, full OREAL): 1+1 selection, ω⁺/ω⁻ from the RM
                   with τ = 0.5, actor frozen 10 steps ([C7]). Equal to the AlgoConfig defaults.
- grpo:            GRPO-style comparison: (r − mean)/std advantages on every sample, REINFORCE form.
"""

from __future__ import annotations

from typing import Any

_BASE_PG: dict[str, Any] = {
    "selection": "all",
    "positive_loss": "pg",
    "positive_loss_factor": 1.0,
    "pos_mult_adv": True,
    "negative_loss_factor": 1.0,
    "token_weighting": "none",
    "actor_freeze_steps": 0,
    "kl_coef": 0.01,
    "kl_type": "k3",
}

ABLATIONS: dict[str, dict[str, Any]] = {
    "reinforce": {**_BASE_PG, "advantage": "reinforce"},
    "reward_shaping": {**_BASE_PG, "advantage": "grpo"},
    "behavior_cloning": {
        **_BASE_PG,
        "advantage": "rloo",
        "positive_loss": "bc",
        "negative_loss_factor": 0.5,
    },
    "oreal": {
        "advantage": "rloo",
        "selection": "one_pair",
        "positive_loss": "bc",
        "positive_loss_factor": 1.0,
        "pos_mult_adv": True,
        "negative_loss_factor": 0.5,
        "kl_coef": 0.01,
        "kl_type": "k3",
        "token_weighting": "threshold",
        "correct_threshold": 0.5,
        "incorrect_threshold": 0.5,
        "actor_freeze_steps": 10,
    },
    "grpo": {**_BASE_PG, "advantage": "grpo"},
}

# Paper order of the cumulative rungs ([P Tab 2]); "grpo" is a side comparison.
LADDER_ORDER = ("reinforce", "reward_shaping", "behavior_cloning", "oreal")


def ablation_overrides(name: str) -> list[str]:
    """`algo.key=value` override strings for config.load_config."""
    try:
        preset = ABLATIONS[name]
    except KeyError:
        raise ValueError(f"unknown ablation {name!r} (known: {sorted(ABLATIONS)})") from None
    return [f"algo.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in preset.items()]
