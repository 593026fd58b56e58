"""Truncated importance sampling on the engine's log-probs (algo/rollout_correction.py): the weight
function by hand, the config defaults tied to the rollout precision, the loss wiring, and a perturbed
engine whose samples come from a shifted policy, which the correction un-biases."""

import math
from dataclasses import replace

import pytest
import torch

from megatron_oreal.algo.losses import policy_loss
from megatron_oreal.algo.rollout_correction import resolve_mode, tis_weights
from megatron_oreal.config import AlgoConfig, ConfigError, load_config


def test_tis_weights_by_hand():
    train = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.0])
    engine = torch.tensor([-1.0, -2.5, -0.1, -1.0, -2.0])
    # ratio = exp(train − engine) = [1, e^0.5, e^−0.4, e^−2, e^1]; clip 2 cuts the last, clip_low 0.2 the 4th
    w, sums = tis_weights(train, engine, clip=2.0, clip_low=0.2)
    ratio = [1.0, math.exp(0.5), math.exp(-0.4), math.exp(-2.0), math.e]
    assert w.tolist() == pytest.approx([1.0, math.exp(0.5), math.exp(-0.4), 0.2, 2.0], abs=1e-6)
    assert float(sums["sum/tis_ratio"]) == pytest.approx(sum(ratio), abs=1e-5)
    assert float(sums["sum/tis_weight"]) == pytest.approx(1 + math.exp(0.5) + math.exp(-0.4) + 0.2 + 2.0, abs=1e-5)
    assert float(sums["tokens/tis_clipped"]) == 2.0
    assert not w.requires_grad
    # An engine that reports every log-prob 0.3 too low (same samples): every weight is e^0.3, none clipped.
    w, sums = tis_weights(train, train - 0.3)
    assert w.tolist() == pytest.approx([math.exp(0.3)] * 5, abs=1e-6) and float(sums["tokens/tis_clipped"]) == 0
    # A grossly wrong engine: the logged ratio stays finite, the weight is the clip.
    w, sums = tis_weights(torch.tensor([0.0]), torch.tensor([-1000.0]))
    assert w.tolist() == [2.0] and math.isfinite(float(sums["sum/tis_ratio"]))
    with pytest.raises(ValueError, match="clip_low < clip"):
        tis_weights(train, engine, clip=1.0, clip_low=1.0)
    with pytest.raises(ValueError, match="does not match"):
        tis_weights(train, engine[:3])


def test_default_follows_rollout_precision():
    assert AlgoConfig().rollout_correction == "auto"
    assert resolve_mode("auto", rollout_fp8=False) == "none" and resolve_mode("auto", rollout_fp8=True) == "tis"
    assert load_config(None).algo.rollout_correction == "none"  # BF16 engine: off
    assert load_config(None, ["rollout.fp8=true"]).algo.rollout_correction == "tis"  # FP8 engine: on
    assert load_config(None, ["rollout.fp8=true", "algo.rollout_correction=none"]).algo.rollout_correction == "none"
    assert load_config(None, ["algo.rollout_correction=tis"]).algo.rollout_correction == "tis"
    with pytest.raises(ConfigError, match="algo.tis_clip_low/algo.tis_clip"):
        load_config(None, ["algo.tis_clip=0.5", "algo.tis_clip_low=0.5"])
    with pytest.raises(ConfigError, match="algo.rollout_correction"):
        load_config(None, ["algo.rollout_correction=is"])


def test_is_weight_scales_each_token_term():
    # One positive (2 tokens) and one negative (1 token) sequence, OREAL form: BC / N⁺ and η·PG / N⁻.
    cu = torch.tensor([0, 2, 3])
    adv, is_pos = torch.tensor([1.5, -0.5]), torch.tensor([True, False])
    ones = torch.ones(3)
    isw = torch.tensor([2.0, 0.5, 1.5])
    logp = torch.tensor([-0.2, -0.7, -1.1], requires_grad=True)
    cfg = replace(AlgoConfig(), kl_coef=0.0)
    loss, m = policy_loss(logp, None, cu, adv, is_pos, ones, ones, 2, 1, 3, cfg, is_weight=isw)
    loss.backward()
    # ∂L⁺/∂logp_t = −A·w_t/N⁺ ; ∂L⁻/∂logp_t = −η·A·w_t/N⁻
    assert logp.grad.tolist() == pytest.approx([-1.5 * 2.0 / 2, -1.5 * 0.5 / 2, -0.5 * -0.5 * 1.5 / 1], abs=1e-6)
    assert loss.item() == pytest.approx(1.5 * (2.0 * 0.2 + 0.5 * 0.7) / 2 + 0.5 * 0.5 * 1.5, abs=1e-6)
    assert m["tokens/w_pos_nonzero"].item() == 2  # metrics count ω, not the correction


class PerturbedEngine:
    """Samples one-token responses from a policy whose logits differ from the trainer's by `shift`, and
    reports the log-probs it sampled with (as a BF16/FP8 engine with other kernels would)."""

    def __init__(self, logits: torch.Tensor, shift: torch.Tensor):
        self.logp = torch.log_softmax(logits + shift, -1)

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.multinomial(self.logp.exp(), n, replacement=True, generator=gen)
        return tokens, self.logp[tokens]


def _policy_gradient(theta, tokens, reward, engine_logp, correction):
    """Gradient wrt the trainer's logits of the REINFORCE-form policy loss on the engine's samples."""
    theta = theta.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)[tokens]
    n = tokens.numel()
    cu = torch.arange(n + 1)
    cfg = replace(AlgoConfig(), positive_loss="pg", negative_loss_factor=1.0, kl_coef=0.0)
    isw = tis_weights(logp, engine_logp, clip=10.0)[0] if correction else None
    ones = torch.ones(n)
    loss, _ = policy_loss(logp, None, cu, reward, reward > 0, ones, ones, n, n, n, cfg, is_weight=isw)
    loss.backward()
    return theta.grad


def test_tis_unbiases_a_perturbed_engine():
    # Five "tokens" with rewards ±1; the trainer's policy π = softmax(θ); the engine samples from
    # μ = softmax(θ + shift) with shift large enough to move most of the mass.
    theta = torch.tensor([0.5, 0.0, -0.5, 0.2, -0.1])
    r = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0])
    pi = torch.softmax(theta, -1)
    exact = -(pi * (r - (pi * r).sum()))  # ∇θ of −E_π[r]: what the on-policy loss estimates
    engine = PerturbedEngine(theta, torch.tensor([-1.0, 0.8, -0.6, 0.3, 0.0]))
    tokens, engine_logp = engine.sample(40_000, torch.Generator().manual_seed(0))
    plain = _policy_gradient(theta, tokens, r[tokens], engine_logp, correction=False)
    tis = _policy_gradient(theta, tokens, r[tokens], engine_logp, correction=True)
    err_plain, err_tis = (plain - exact).abs().max().item(), (tis - exact).abs().max().item()
    assert err_tis < 0.015 < 0.08 < err_plain, (err_tis, err_plain)  # corrected: sampling noise only (~0.003)
    # The same engine reporting exactly the trainer's log-probs (no mismatch) leaves the gradient unchanged.
    same = _policy_gradient(theta, tokens, r[tokens], torch.log_softmax(theta, -1)[tokens], correction=True)
    assert torch.allclose(same, plain, atol=1e-6)
