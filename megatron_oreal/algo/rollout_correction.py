"""Rollout/train mismatch correction: truncated importance sampling (TIS) on the engine's log-probs.

The loss assumes its samples come from the policy being trained (one optimiser step per rollout batch,
so the ratio to the "old" policy is identically 1). With an external engine they come from the
engine's copy instead: another kernel, another precision (FP8 in the 32B FP8 recipe), so its sampling
distribution μ differs a little from the trainer's π. Each token's policy-gradient and BC term is
then weighted by the truncated ratio

    w_t = clamp(π(a_t) / μ(a_t), clip_low, clip)        (detached; π from Megatron, μ from the engine)

which makes the estimate unbiased where π/μ ≤ clip and bounds its variance where it is not (as
slime's `--use-tis` and verl's token-level rollout correction do; C = 2 there). The KL term is not
weighted. docs/algorithm.md §"Rollout correction" has the derivation and the defaults:
`algo.rollout_correction=auto` is TIS with an FP8 engine (`rollout.fp8=true`) and none with BF16.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

MODES = ("auto", "none", "tis")
MAX_LOG_RATIO = 20.0  # exp(20) ≈ 5e8: keeps the logged ratio finite for a grossly wrong engine


def resolve_mode(mode: str, rollout_fp8: bool) -> str:
    """'auto' -> 'tis' for FP8 rollouts, 'none' otherwise; 'none'/'tis' unchanged."""
    if mode not in MODES:
        raise ValueError(f"algo.rollout_correction: unknown {mode!r} (known: {list(MODES)})")
    if mode == "auto":
        return "tis" if rollout_fp8 else "none"
    return mode


def tis_weights(train_logp: Tensor, rollout_logp: Tensor, clip: float = 2.0,
                clip_low: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token truncated importance weights [T] (detached, fp32) and metric sums.

    ratio = exp(log π_train − log π_rollout); weight = clamp(ratio, clip_low, clip). Metric sums (over
    tokens; divide by the token count): sum/tis_ratio (the raw ratio, log capped at MAX_LOG_RATIO),
    sum/tis_weight, tokens/tis_clipped (tokens whose ratio was outside [clip_low, clip]).
    """
    if not 0.0 <= clip_low < clip:
        raise ValueError(f"algo.tis_clip_low/tis_clip: need 0 <= clip_low < clip, got {clip_low}, {clip}")
    if train_logp.shape != rollout_logp.shape:
        raise ValueError(f"rollout log-probs: shape {tuple(rollout_logp.shape)} does not match the trainer's "
                         f"{tuple(train_logp.shape)}")
    log_ratio = (train_logp.detach().float() - rollout_logp.to(train_logp.device).float()).clamp(max=MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(min=clip_low, max=clip)
    clipped = (ratio > clip) | (ratio < clip_low)
    return weight, {"sum/tis_ratio": ratio.sum(), "sum/tis_weight": weight.sum(),
                    "tokens/tis_clipped": clipped.sum().float()}
