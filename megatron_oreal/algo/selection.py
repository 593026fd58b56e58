"""Which samples are trained: OREAL's 1 correct + 1 incorrect per mixed prompt, or everything.

Selection is deterministic from (seed, step), so every rank picks the same samples without a broadcast
(docs/algorithm.md §9 #17: the reference relied on identical Python RNG state on every rank).
"""

from __future__ import annotations

import torch

from megatron_oreal.algo.advantages import compute_advantages
from megatron_oreal.types import Group, TrainBatch, TrainSequence

SELECTION_MODES = ("one_pair", "all")


def _generator(seed: int, step: int) -> torch.Generator:
    # A distinct stream per (seed, step); the same on every rank.
    return torch.Generator().manual_seed((int(seed) & 0xFFFFFFFF) * 1_000_003 + int(step))


def select_samples(rewards: torch.Tensor, mode: str = "one_pair", seed: int = 0, step: int = 0) -> list[tuple[int, int]]:
    """rewards [P, K] -> the kept (prompt_idx, sample_idx), prompt by prompt.

    one_pair ([DS] `TrajectoryDatasetWithFilter(only_keep_1_pair=True)`, docs/algorithm.md §4.2 step 5): drop prompts
    whose K samples are all correct or all wrong; keep one random correct (r > 0) then one random incorrect.
    all: keep every sample (the no-token-RM configuration [C7-noRM] and the ablations).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected a [P, K] tensor, got shape {tuple(rewards.shape)}")
    num_prompts, k = rewards.shape
    if mode == "all":
        return [(p, s) for p in range(num_prompts) for s in range(k)]
    if mode != "one_pair":
        raise ValueError(f"algo.selection: unknown mode {mode!r} (known: {list(SELECTION_MODES)})")
    gen = _generator(seed, step)
    keep: list[tuple[int, int]] = []
    for p in range(num_prompts):
        correct = torch.nonzero(rewards[p] > 0).flatten().tolist()
        wrong = torch.nonzero(rewards[p] <= 0).flatten().tolist()
        if not correct or not wrong:  # pass rate 0 or 1: no learning signal, dropped
            continue
        keep.append((p, correct[int(torch.randint(len(correct), (1,), generator=gen))]))
        keep.append((p, wrong[int(torch.randint(len(wrong), (1,), generator=gen))]))
    return keep


def build_train_batch(
    groups: list[Group], advantage: str = "rloo", selection: str = "one_pair", seed: int = 0, step: int = 0
) -> TrainBatch:
    """Scored groups -> the step's TrainBatch: advantages over all K samples, then selection.

    Also writes each sample's group-level advantage into `Sample.advantage` (for logs and HTML pages).
    """
    if not groups:
        return TrainBatch(sequences=[], step=step)
    k = len(groups[0].samples)
    for i, g in enumerate(groups):
        if len(g.samples) != k:
            raise ValueError(f"groups[{i}] ({g.prompt.uid}): {len(g.samples)} samples, expected K={k} like groups[0]")
    rewards = torch.tensor([[s.reward for s in g.samples] for g in groups], dtype=torch.float64)
    adv = compute_advantages(advantage, rewards)
    for g, row in zip(groups, adv.tolist()):
        for s, a in zip(g.samples, row):
            s.advantage = float(a)
    seqs = []
    for p, s in select_samples(rewards, selection, seed, step):
        g, smp = groups[p], groups[p].samples[s]
        if not smp.response_ids:
            raise ValueError(f"groups[{p}] ({g.prompt.uid}) sample {s}: empty response_ids cannot be trained")
        if not g.prompt.input_ids:
            raise ValueError(f"groups[{p}] ({g.prompt.uid}): empty prompt input_ids")
        seqs.append(
            TrainSequence(
                prompt_ids=list(g.prompt.input_ids),
                response_ids=list(smp.response_ids),
                advantage=smp.advantage,
                is_positive=smp.reward > 0,
                rollout_logprobs=None if smp.rollout_logprobs is None else list(smp.rollout_logprobs),
            )
        )
    return TrainBatch(sequences=seqs, step=step)
