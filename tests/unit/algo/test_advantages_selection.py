"""RLOO / GRPO / REINFORCE and the 1+1 selection against docs/algorithm.md §8.1 items 1-2."""

import math

import pytest
import torch

from megatron_oreal.algo.advantages import ADVANTAGE_ESTIMATORS, compute_advantages
from megatron_oreal.algo.selection import build_train_batch, select_samples
from megatron_oreal.types import Group, Prompt, Sample


def _rewards(c: int, k: int = 16) -> torch.Tensor:
    return torch.tensor([1.0] * c + [-1.0] * (k - c))


def test_rloo_closed_form_k16_c4():
    r = torch.stack([_rewards(4), _rewards(16), _rewards(0)])
    a = compute_advantages("rloo", r)
    assert a[0, :4].tolist() == pytest.approx([24 / 15] * 4, abs=1e-6)  # 1.6
    assert a[0, 4:].tolist() == pytest.approx([-8 / 15] * 12, abs=1e-6)  # -0.5333
    assert a[1].abs().max() < 1e-9 and a[2].abs().max() < 1e-9  # all-right / all-wrong -> 0
    # closed form for every c: A+ = 2(K-c)/(K-1), A- = -2c/(K-1)
    for c in range(1, 16):
        a = compute_advantages("rloo", _rewards(c)[None])[0]
        assert a[0].item() == pytest.approx(2 * (16 - c) / 15, abs=1e-6)
        assert a[-1].item() == pytest.approx(-2 * c / 15, abs=1e-6)


def test_grpo_and_reinforce():
    r = torch.tensor([[1.0, -1.0, -1.0, -1.0]])
    a = ADVANTAGE_ESTIMATORS["grpo"](r)
    std = math.sqrt((1.5**2 + 3 * 0.5**2) / 3)  # unbiased: mean -0.5
    assert a[0].tolist() == pytest.approx([1.5 / std, -0.5 / std, -0.5 / std, -0.5 / std], abs=1e-6)
    assert compute_advantages("grpo", torch.ones(1, 4)).abs().max() < 1e-9  # std 0 -> 0, no NaN
    assert compute_advantages("reinforce", r).tolist() == r.tolist()
    with pytest.raises(ValueError, match="algo.advantage"):
        compute_advantages("ppo", r)
    with pytest.raises(ValueError, match="at least 2"):
        compute_advantages("rloo", torch.ones(3, 1))


def test_one_pair_selection_filters_and_is_deterministic():
    r = torch.stack([_rewards(4, 8), _rewards(8, 8), _rewards(0, 8), _rewards(1, 8)])
    keep = select_samples(r, "one_pair", seed=3, step=7)
    assert [p for p, _ in keep] == [0, 0, 3, 3]  # p in {0,1} vanish
    for i in range(0, len(keep), 2):
        assert r[keep[i]] == 1 and r[keep[i + 1]] == -1  # one correct then one incorrect
    assert keep == select_samples(r, "one_pair", seed=3, step=7)  # same on every rank
    picks = {tuple(select_samples(r, "one_pair", seed=3, step=s)) for s in range(20)}
    assert len(picks) > 1  # varies with the step
    assert len(select_samples(r, "all")) == 32


def _group(uid, rewards):
    return Group(
        prompt=Prompt(uid=uid, text="q", gold="1", input_ids=[1, 2]),
        samples=[Sample(response_ids=[10 + i], finish_reason="stop", reward=r) for i, r in enumerate(rewards)],
    )


def test_build_train_batch_keeps_group_level_advantage():
    groups = [_group("a", [1, -1, -1, -1]), _group("b", [1, 1, 1, 1]), _group("c", [-1, 1, 1, -1])]
    batch = build_train_batch(groups, "rloo", "one_pair", seed=0, step=5)
    assert batch.num_sequences == 4 and batch.step == 5
    s = batch.sequences
    assert s[0].is_positive and s[0].advantage == pytest.approx(2 * 3 / 3) and s[0].response_ids == [10]
    assert not s[1].is_positive and s[1].advantage == pytest.approx(-2 / 3)
    assert s[2].is_positive and s[2].advantage == pytest.approx(2 * 2 / 3)
    assert s[3].advantage == pytest.approx(-4 / 3) and s[3].prompt_ids == [1, 2]
    assert groups[1].samples[0].advantage == 0.0  # written back for logs
    assert build_train_batch(groups, "rloo", "all").num_sequences == 12
    with pytest.raises(ValueError, match=r"groups\[1\] \(b\)"):
        build_train_batch([groups[0], _group("b", [1, -1])])
