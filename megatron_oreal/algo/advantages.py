"""Outcome reward -> per-sample advantage, over the K samples of each prompt.

Rewards are [P, K] (P prompts, K samples each, order AAAA BBBB as in docs/algorithm.md §4.2) and so are the
advantages. Every estimator is computed on the *full* group, before selection: the kept samples carry
their group-level advantage (docs/algorithm.md §2.2, [train_oreal.py:L559-575]).
"""

from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor


def _check(rewards: Tensor, min_k: int = 1) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected a [P, K] tensor, got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < min_k:
        raise ValueError(f"rewards: need at least {min_k} samples per prompt, got K={rewards.shape[1]}")


def rloo_advantages(rewards: Tensor) -> Tensor:
    """RLOO: A_k = r_k - mean_{j != k} r_j (docs/algorithm.md §2.2, [train_oreal.py:L559-563]).

    With ±1 rewards and c correct of K: A⁺ = 2(K-c)/(K-1), A⁻ = -2c/(K-1) (K=16, c=4: 1.6, -0.5333).
    """
    _check(rewards, min_k=2)
    r = rewards.double()
    k = r.shape[1]
    baseline = (r.sum(dim=1, keepdim=True) - r) / (k - 1)  # leave-one-out mean
    return (r - baseline).to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def grpo_advantages(rewards: Tensor) -> Tensor:
    """GRPO: (r - mean) / (std + 1e-8) with torch's unbiased std (docs/algorithm.md §2.2, `reward_shaping_type="grpo"`)."""
    _check(rewards, min_k=2)
    r = rewards.double()
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, unbiased=True, keepdim=True) + 1e-8)
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def reinforce_advantages(rewards: Tensor) -> Tensor:
    """Plain REINFORCE: A = r, no baseline (the first rung of the ablation ladder, docs/algorithm.md §6.2)."""
    _check(rewards)
    return rewards.clone() if rewards.is_floating_point() else rewards.float()


# Explicit registry (STYLE.md): `algo.advantage` names one of these.
ADVANTAGE_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "rloo": rloo_advantages,
    "grpo": grpo_advantages,
    "reinforce": reinforce_advantages,
}


def compute_advantages(name: str, rewards: Tensor) -> Tensor:
    try:
        fn = ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"algo.advantage: unknown estimator {name!r} (known: {sorted(ADVANTAGE_ESTIMATORS)})") from None
    return fn(rewards)
