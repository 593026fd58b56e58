"""The OREAL step on Megatron (gloo, CPU) against the plain-PyTorch oracle (tests/reference/oreal_torch.py).

Two torchrun launches: 4 ranks for sharding invariance (TP2xPP2, TP2xDP2, PP2xDP2, DP4 with tiny
micro-batches), 2 ranks (TP=2) for the behaviour checks.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

from helpers.tiny_hf import make_tiny_qwen2  # noqa: E402
from helpers.torchrun import run_torchrun  # noqa: E402
from reference.oreal_torch import load_hf, oreal_reference_step, response_logprobs  # noqa: E402

from train_step_worker import LAYOUTS  # noqa: E402

from megatron_oreal.config import AlgoConfig, OptimConfig  # noqa: E402
from megatron_oreal.mcore.packing import build_micro_batches  # noqa: E402
from megatron_oreal.types import TrainBatch, TrainSequence  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step_worker.py")
sys.path.insert(0, os.path.dirname(WORKER))  # the worker's LAYOUTS
pytestmark = pytest.mark.slow


def _batch(vocab: int) -> TrainBatch:
    g = torch.Generator().manual_seed(7)
    shapes = [(5, 9, True, 1.6), (3, 14, False, -0.5), (8, 6, True, 0.9), (4, 11, False, -1.2),
              (6, 3, True, 0.4), (2, 17, False, -0.8), (7, 8, False, -0.3)]
    seqs = []
    for p, r, pos, adv in shapes:
        ids = torch.randint(3, vocab, (p + r,), generator=g).tolist()
        seqs.append(TrainSequence(prompt_ids=ids[:p], response_ids=ids[p:], advantage=adv, is_positive=pos))
    return TrainBatch(sequences=seqs, step=0)


def _checks(out: str) -> list[list[str]]:
    return [line.split()[1:] for line in out.splitlines() if line.startswith("CHECK ")]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_step")
    hf_cfg = make_tiny_qwen2(root / "policy", seed=0)
    make_tiny_qwen2(root / "ref", seed=5)  # a different reference, so the KL gradient is non-trivial
    batch = _batch(hf_cfg["vocab_size"])
    algo = AlgoConfig(actor_freeze_steps=3, kl_coef=0.05)
    # seed 0: ω⁺ and ω⁻ are each non-zero on part of their tokens (56% / 68%), fractional where non-zero
    rm_head = 0.3 * torch.randn(1, hf_cfg["hidden_size"], generator=torch.Generator().manual_seed(0))
    oracle = oreal_reference_step(str(root / "policy"), str(root / "ref"), batch, algo, rm_head)
    hf = load_hf(str(root / "policy"))
    with torch.no_grad():
        hf_logp = [response_logprobs(hf, s.prompt_ids, s.response_ids) for s in batch.sequences]
    torch.save({"batch": batch, "algo": algo, "hf_cfg": hf_cfg, "oracle": oracle, "rm_head": rm_head,
                "optim": OptimConfig(lr=0.0, min_lr=0.0, warmup_steps=0, clip_grad=1e9), "hf_logprobs": hf_logp},
               root / "case.pt")
    return root, oracle


def test_oracle_is_non_trivial(case):
    _, oracle = case
    m = oracle["metrics"]
    assert m["loss/positive"] > 0 and m["loss/negative"] != 0 and m["loss/kl"] > 0 and m["rm/loss"] > 0
    assert all(g.abs().max() > 0 for g in oracle["policy_grads"].values())
    assert 0.2 < m["tokens/w_pos_nonzero_frac"] < 0.9 and 0.2 < m["tokens/w_neg_nonzero_frac"] < 0.9, m


def test_gradients_invariant_to_sharding_and_micro_batching(case):
    root, _ = case
    checks = _checks(run_torchrun(WORKER, 4, ["invariance", root], timeout=420))
    tags = set()
    for c in checks:
        if c[0] in ("policy_rel", "rm_rel", "rm_head_rel"):
            tags.add(c[1])
            assert float(c[2]) < 1e-5, c
        elif c[0] == "metric":
            assert float(c[3]) < 1e-5, c
    batch = torch.load(root / "case.pt", weights_only=False)["batch"]
    want_mbs = {}
    for tp, pp, budget in LAYOUTS:
        dp = 4 // (tp * pp)
        tag = f"tp{tp}pp{pp}dp{dp}mb{budget}"
        # summed over all 4 ranks: every TP/PP rank of a replica runs its replica's micro-batches
        want_mbs[tag] = tp * pp * sum(len(build_micro_batches(batch, r, dp, budget)) for r in range(dp))
    assert tags == set(want_mbs), tags
    assert len([c for c in checks if c[0] == "rm_head_rel"]) == 4
    got_mbs = {c[1]: int(c[2]) for c in checks if c[0] == "microbatches"}
    assert got_mbs == want_mbs
    assert want_mbs["tp2pp2dp1mb30"] >= 4 * 3 and want_mbs["tp1pp2dp2mb20"] >= 2 * 6  # several per pipeline


def test_zero_head_packing_learning_direction_and_sft(case):
    root, _ = case
    c = {x[0]: x[1:] for x in _checks(run_torchrun(WORKER, 2, ["behaviour", root], timeout=420))}
    assert float(c["zero_head_policy_grad"][0]) == 0.0  # exactly: ω = 0 and policy == reference
    assert float(c["zero_head_grad_norm"][0]) == 0.0
    assert float(c["zero_head_rm_grad_norm"][0]) > 0  # the RM itself learns from step 0
    assert float(c["zero_head_w_frac"][0]) == 0.0 and float(c["zero_head_kl"][0]) == 0.0
    assert float(c["packed_vs_unpacked"][0]) < 1e-5
    assert float(c["vs_hf"][0]) < 1e-4
    assert c["lengths_match"][0] == "True"
    before, after, _, rm_logit = map(float, c["learn_correct"])
    assert after > before + 0.05 and rm_logit > 0, c["learn_correct"]
    before, after, _, rm_logit = map(float, c["learn_wrong"])
    assert after < before - 0.05 and rm_logit < 0, c["learn_wrong"]
    gnorm, wp, wn, pg_loss, has_rm = c["reinforce"]
    assert float(gnorm) > 0 and float(wp) == 1.0 and float(wn) == 1.0 and has_rm == "False"
    # REINFORCE value: −Σ A / N with A = r = advantage of each sequence here (ρ ≡ 1)
    seqs = _batch(250).sequences
    want = -sum(s.advantage * len(s.response_ids) for s in seqs) / sum(len(s.response_ids) for s in seqs)
    assert float(pg_loss) == pytest.approx(want, rel=1e-5)
    finite, rm0, rm2, g0, g2 = c["bf16_distopt"]
    assert finite == "True" and float(rm2) < float(rm0) and float(g0) == 0.0 and float(g2) > 0, c["bf16_distopt"]
    sft = [float(v) for v in c["sft_losses"]]
    assert sft[-1] < sft[0] - 0.1, sft
