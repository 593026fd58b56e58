"""Token weights, losses and the LR schedule against docs/algorithm.md §8.1 items 3-9 and §4.3."""

import math
from dataclasses import replace

import pytest
import torch

from megatron_oreal.algo.ladder import ABLATIONS, LADDER_ORDER, ablation_overrides
from megatron_oreal.algo.losses import kl_penalty, policy_loss, rm_loss
from megatron_oreal.algo.schedule import lr_at
from megatron_oreal.algo.token_weights import prefix_mean, token_weights, topk_rescale
from megatron_oreal.config import AlgoConfig, load_config

CFG = AlgoConfig()


def test_token_weights_worked_example():
    scores = torch.tensor([2.0, -2.0, -2.0, 0.0, 0.0])  # seq 0 = [2,-2,-2], seq 1 = zero head
    cu = torch.tensor([0, 3, 5])
    assert prefix_mean(scores, cu).tolist() == pytest.approx([2, 0, -2 / 3, 0, 0], abs=1e-9)
    w_pos, w_neg = token_weights(scores, cu)
    q = torch.sigmoid(torch.tensor([2.0, 0.0, -2 / 3], dtype=torch.float64))
    assert q.tolist() == pytest.approx([0.880797, 0.5, 0.339244], abs=1e-6)
    assert w_pos.tolist() == pytest.approx([2 * q[0].item() - 1, 0, 0, 0, 0], abs=1e-6)  # 0.7616
    assert w_neg.tolist() == pytest.approx([0, 0, 1 - 2 * q[2].item(), 0, 0], abs=1e-6)  # 0.3215
    assert w_pos[0].item() == pytest.approx(0.761594, abs=1e-6) and w_neg[2].item() == pytest.approx(0.321513, abs=1e-6)
    # other thresholds: clamp((q - τ)/(1 - τ), 0, 1)
    w_pos, w_neg = token_weights(scores, cu, correct_threshold=0.3, incorrect_threshold=0.0)
    assert w_pos[1].item() == pytest.approx(0.2 / 0.7, abs=1e-6)
    assert w_neg[:3].tolist() == pytest.approx((1 - q).tolist(), abs=1e-6)
    ones = token_weights(scores, cu, mode="none")
    assert ones[0].tolist() == [1.0] * 5 and ones[1].tolist() == [1.0] * 5


def test_topk_weights():
    q = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6])
    assert topk_rescale(q, 0.25).tolist() == pytest.approx([0, 1, 0, 0, 0, 0, 0, 0])  # top 2: 0.9->1, 0.8->0
    assert topk_rescale(q, 0.5).tolist() == pytest.approx([0, 1, 0, 1 / 3, 0, 2 / 3, 0, 0])  # top 4: 0.9..0.6
    assert sorted(topk_rescale(torch.tensor([0.5, 0.5]), 0.25).tolist()) == [0.0, 1.0]  # k >= 1, equal values -> 1
    scores = torch.tensor([3.0, -1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0])
    w_pos, w_neg = token_weights(scores, torch.tensor([0, 4, 8]), mode="topk", topk_ratio=0.5)
    # seq 0 prefix means [3, 1, 1/3, 0]: top-2 q at t=0,1; 1-q top-2 at t=3,2
    assert w_pos[:4].tolist() == pytest.approx([1, 0, 0, 0]) and w_neg[:4].tolist() == pytest.approx([0, 0, 0, 1])
    assert sorted(w_pos[4:].tolist()) == [0.0, 0.0, 1.0, 1.0]  # equal q: two kept, all 1


def _packed(seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 3, 7, 9])
    logp = (-torch.rand(9, generator=g) * 3).requires_grad_()
    ref = -torch.rand(9, generator=g) * 3
    return cu, logp, ref


def test_zero_rm_head_gives_zero_pg_and_bc_gradient():
    cu, logp, _ = _packed()
    w_pos, w_neg = token_weights(torch.zeros(9), cu)
    assert w_pos.abs().sum() == 0 and w_neg.abs().sum() == 0
    loss, m = policy_loss(logp, logp.detach(), cu, torch.tensor([1.6, -0.5, 1.2]), torch.tensor([True, False, True]),
                          w_pos, w_neg, 5, 4, 9, CFG)
    loss.backward()
    assert loss.item() == 0.0 and logp.grad.abs().max().item() == 0.0  # KL grad too: policy == ref
    assert m["tokens/w_pos_nonzero"] == 0 and m["tokens/positive"] == 5


def test_negative_and_positive_gradients():
    cu, logp, _ = _packed()
    adv = torch.tensor([1.6, -0.5, 1.2])
    is_pos = torch.tensor([True, False, True])
    w_pos = torch.linspace(0.1, 0.9, 9)
    w_neg = torch.linspace(0.9, 0.1, 9)
    cfg = replace(CFG, kl_coef=0.0)
    loss, m = policy_loss(logp, None, cu, adv, is_pos, w_pos, w_neg, 50.0, 40.0, 90.0, cfg)
    loss.backward()
    g = logp.grad
    neg = slice(3, 7)
    # ∂L⁻/∂logp_t = −η A ω⁻_t / N⁻ (> 0 since A < 0); value η Σ|A| ω⁻ / N⁻
    assert g[neg].tolist() == pytest.approx((-0.5 * -0.5 * w_neg[neg] / 40).tolist(), abs=1e-9)
    assert m["loss/negative"].item() == pytest.approx(0.5 * 0.5 * w_neg[neg].sum().item() / 40, abs=1e-9)
    # ∂L⁺/∂logp_t = −α A ω⁺_t / N⁺ on positives
    assert g[:3].tolist() == pytest.approx((-1.6 * w_pos[:3] / 50).tolist(), abs=1e-9)
    assert g[7:].tolist() == pytest.approx((-1.2 * w_pos[7:] / 50).tolist(), abs=1e-9)
    expected_pos = (1.6 * (w_pos[:3] * -logp[:3]).sum() + 1.2 * (w_pos[7:] * -logp[7:]).sum()) / 50
    assert m["loss/positive"].item() == pytest.approx(expected_pos.item(), abs=1e-7)
    # pg mode: REINFORCE form with one shared denominator N for both sets
    logp.grad = None
    loss, _ = policy_loss(logp, None, cu, adv, is_pos, w_pos, w_neg, 50.0, 40.0, 90.0,
                          replace(cfg, positive_loss="pg", negative_loss_factor=1.0))
    loss.backward()
    a_tok = torch.tensor([1.6] * 3 + [-0.5] * 4 + [1.2] * 2)
    w = torch.where(torch.arange(9).ge(3) & torch.arange(9).lt(7), w_neg, w_pos)
    assert logp.grad.tolist() == pytest.approx((-a_tok * w / 90).tolist(), abs=1e-9)


def test_kl_k3_value_and_gradient():
    cu, logp, ref = _packed()
    assert kl_penalty(ref, ref).abs().max() == 0
    cfg = replace(CFG, negative_loss_factor=0.0, positive_loss_factor=0.0, kl_coef=0.01)
    z = torch.zeros(9)
    loss, m = policy_loss(logp, ref, cu, torch.zeros(3), torch.tensor([True, False, True]), z, z, 5, 4, 9, cfg)
    loss.backward()
    d = ref - logp.detach()
    assert loss.item() == pytest.approx((0.01 * (d.exp() - d - 1).sum() / 9).item(), abs=1e-9)
    assert logp.grad.tolist() == pytest.approx((0.01 * (1 - d.exp()) / 9).tolist(), abs=1e-9)
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx(d.tolist())
    assert kl_penalty(logp, ref, "mse").tolist() == pytest.approx((d * d / 2).tolist())
    assert m["sum/logp_minus_ref"].item() == pytest.approx(-d.sum().item(), abs=1e-6)


def test_rm_bce_label_and_mean_over_m():
    scores = torch.tensor([1.0, 3.0, -2.0, 0.0, 0.0], requires_grad=True)
    cu = torch.tensor([0, 2, 3, 5])
    rewards = torch.tensor([1.0, -1.0, -1.0])
    labels = torch.tensor([int(max(r, 0)) for r in rewards.tolist()])  # int(max(r, 0))
    loss, m = rm_loss(scores, cu, labels > 0, m_global=6)
    sp = lambda x: math.log1p(math.exp(x))  # BCE(z, 1) = softplus(-z), BCE(z, 0) = softplus(z)
    expected = (sp(-2.0) + sp(-2.0) + sp(0.0)) / 6
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    s = 1 / (1 + math.exp(-2.0))
    # d/dw_t of BCE(mean w) = (σ(z) - y) / R_i / M
    assert scores.grad.tolist() == pytest.approx([(s - 1) / 2 / 6] * 2 + [(1 - s) / 6] + [0.25 / 6] * 2, abs=1e-6)
    assert m["sum/rm_correct"].item() == 3  # z=2 (y=1), z=-2 (y=0), z=0 (y=0: z>0 is False) all right


def test_lr_schedule_values():
    args = dict(base=5e-7, min_lr=1e-7, warmup=10, total=90)
    assert lr_at(0, **args) == pytest.approx(5e-8)
    assert lr_at(4, **args) == pytest.approx(2.5e-7)
    assert lr_at(9, **args) == pytest.approx(5e-7) and lr_at(10, **args) == pytest.approx(5e-7)
    assert lr_at(50, **args) == pytest.approx(3e-7)  # half way through the cosine
    assert lr_at(90, **args) == pytest.approx(1e-7) and lr_at(200, **args) == pytest.approx(1e-7)
    assert lr_at(11, **args) == pytest.approx(1e-7 + 4e-7 * (1 + math.cos(math.pi / 80)) / 2)
    assert lr_at(3, 2e-6, 4e-7, 0, 10) == pytest.approx(4e-7 + 1.6e-6 * (1 + math.cos(math.pi * 0.3)) / 2)
    with pytest.raises(ValueError, match="total steps"):
        lr_at(0, 1.0, 0.1, 10, 10)


def test_ablation_presets_are_valid_config_overrides():
    for name in (*LADDER_ORDER, "grpo"):
        cfg = load_config(None, ablation_overrides(name))
        for key, value in ABLATIONS[name].items():
            assert getattr(cfg.algo, key) == value, (name, key)
    assert ABLATIONS["oreal"] == {k: getattr(AlgoConfig(), k) for k in ABLATIONS["oreal"]}  # full OREAL = defaults
    # The authors: the "+ reward shaping" row is GRPO-style shaping applied to all samples (docs/algorithm.md §6.2)
    assert ABLATIONS["reward_shaping"] == ABLATIONS["grpo"]
    assert ABLATIONS["reward_shaping"]["advantage"] == "grpo" and ABLATIONS["reward_shaping"]["selection"] == "all"


def test_kl_normalizer_all_vs_negative_by_hand():
    # One positive sequence of 1 token, one negative of 2 tokens: N = 3, N⁻ = 2. δ = ref − logp is 0 on the
    # positive token and ln 2 on both negative ones, so k3 = e^δ − δ − 1 is 0 and 1 − ln 2 (= 0.306853).
    cu = torch.tensor([0, 1, 3])
    ref = torch.tensor([-1.0, -1.0 + math.log(2.0), -2.0 + math.log(2.0)])
    for normalizer, den in (("all", 3.0), ("negative", 2.0)):
        logp = torch.tensor([-1.0, -1.0, -2.0], requires_grad=True)
        cfg = replace(CFG, negative_loss_factor=0.0, positive_loss_factor=0.0, kl_coef=0.1, kl_normalizer=normalizer)
        z = torch.zeros(3)
        loss, m = policy_loss(logp, ref, cu, torch.zeros(2), torch.tensor([True, False]), z, z, 1, 2, 3, cfg)
        loss.backward()
        assert loss.item() == pytest.approx(0.1 * 2 * (1 - math.log(2.0)) / den, abs=1e-7)
        assert m["loss/kl"].item() == pytest.approx(loss.item())
        # ∂/∂logp of β·k3/den = β(1 − e^δ)/den: 0 where δ = 0, −β/den where e^δ = 2
        assert logp.grad.tolist() == pytest.approx([0.0, -0.1 / den, -0.1 / den], abs=1e-7)
    assert AlgoConfig().kl_normalizer == "all"  # the reference HEAD (2859cc0) divides by N
    assert load_config(None, ["algo.kl_normalizer=negative"]).algo.kl_normalizer == "negative"
    with pytest.raises(ValueError, match="algo.kl_normalizer"):
        load_config(None, ["algo.kl_normalizer=pos"])
