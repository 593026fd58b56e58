"""OREAL loss terms on the packed response-token layout (docs/algorithm.md §2.3-2.6, §3; [train_oreal.py:L770-840]).

Inputs are local (one micro-batch); the global counts N⁺, N⁻, N (tokens) and M (sequences) over the
whole step on all DP ranks are arguments, so the sum over micro-batches and ranks of these losses is the
step's loss whatever the split. No distributed calls here: `mcore/train_step.py` all-reduces the counts.

Each function returns (loss, metrics); metrics are detached *sums* (summed over micro-batches and DP
ranks by the caller, then divided by the matching global count).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from megatron_oreal.algo.token_weights import check_cu_seqlens, segment_ids, sequence_mean

Tensor = torch.Tensor

KL_TYPES = ("k3", "k1", "mse")
POSITIVE_LOSSES = ("bc", "pg")


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token KL estimate with δ = log π_ref − log π_θ (docs/algorithm.md §2.5, [train_oreal.py:L826-840]).

    k3 ("unbias"): exp(δ) − δ − 1 (≥ 0; gradient wrt logp is 1 − exp(δ)); k1 ("kl"): δ; mse: δ²/2.
    """
    delta = ref_logp - logp
    if kind == "k3":
        return torch.exp(delta) - delta - 1.0
    if kind == "k1":
        return delta
    if kind == "mse":
        return delta.square() / 2.0
    raise ValueError(f"algo.kl_type: unknown {kind!r} (known: {list(KL_TYPES)})")


def _denominator(n: float | Tensor, name: str) -> float:
    n = float(n)
    if n < 0:
        raise ValueError(f"{name}: a token/sequence count cannot be negative, got {n}")
    return max(n, 1.0)  # an empty set contributes 0, never NaN


def policy_loss(
    logp: Tensor,
    ref_logp: Tensor | None,
    cu_seqlens: Tensor,
    advantages: Tensor,
    is_positive: Tensor,
    w_pos: Tensor,
    w_neg: Tensor,
    n_pos: float | Tensor,
    n_neg: float | Tensor,
    n_all: float | Tensor,
    cfg: Any,
    is_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L⁺ + L⁻ + L^KL for one packed micro-batch.

    logp, ref_logp, w_pos, w_neg: [T] per response token; advantages [S] float, is_positive [S] bool.
    cfg: the AlgoConfig section (positive_loss, positive_loss_factor, pos_mult_adv, negative_loss_factor,
    kl_coef, kl_type, kl_normalizer).

    positive_loss="bc" (OREAL, [docs/algorithm.md, train_oreal.py:L802-812]): L⁺ = α Σ_{pos} A·ω⁺·(−logp) / N⁺ (A only if pos_mult_adv).
    positive_loss="pg" (ablations): both sets take the REINFORCE form −Σ ρ·A·ω / N with one shared
      denominator N, so with α = η = 1 and ω = 1 the loss is one plain per-token REINFORCE mean.
    is_weight: optional [T] rollout-correction weights (algo/rollout_correction.py), multiplying every
      token's L⁺ and L⁻ term like ω does; None = 1 (on-policy). The KL term is not weighted.
    Negative ([docs/algorithm.md, train_oreal.py:L814-824]): L⁻ = −η Σ_{neg} ρ·A·ω⁻ / N⁻, ρ = exp(logp − sg(logp)) (value 1, grad ∇logp).
    KL ([docs/algorithm.md, train_oreal.py:L826-840]): β Σ_{all} kl(δ) / N, on positives and negatives alike; / N⁻ with
      cfg.kl_normalizer="negative" (the reference before commit 2859cc0).
    """
    cu = check_cu_seqlens(cu_seqlens, logp.numel()).to(logp.device)
    num_seqs = cu.numel() - 1
    if advantages.shape != (num_seqs,) or is_positive.shape != (num_seqs,):
        raise ValueError(
            f"advantages/is_positive: expected [{num_seqs}] (one per sequence), "
            f"got {tuple(advantages.shape)} / {tuple(is_positive.shape)}"
        )
    for name, t in (("ref_logp", ref_logp), ("w_pos", w_pos), ("w_neg", w_neg), ("is_weight", is_weight)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match logp {tuple(logp.shape)}")
    if cfg.positive_loss not in POSITIVE_LOSSES:
        raise ValueError(f"algo.positive_loss: unknown {cfg.positive_loss!r} (known: {list(POSITIVE_LOSSES)})")

    seg = segment_ids(cu)
    logp = logp.float()
    adv_tok = advantages.to(logp)[seg]
    pos_tok = is_positive.bool()[seg]
    neg_tok = ~pos_tok
    w_pos, w_neg = w_pos.detach().to(logp), w_neg.detach().to(logp)
    ratio = torch.exp(logp - logp.detach())  # ≡ 1: one optimiser step per rollout batch, old = current
    # the loss's weights: ω times the rollout correction (metrics below count ω alone)
    lw_pos, lw_neg = (w_pos, w_neg) if is_weight is None else (w_pos * is_weight.detach().to(logp),
                                                                w_neg * is_weight.detach().to(logp))

    if cfg.positive_loss == "bc":
        scale = adv_tok if cfg.pos_mult_adv else torch.ones_like(adv_tok)
        pos_sum = (scale * lw_pos * -logp)[pos_tok].sum()
        pos_loss = cfg.positive_loss_factor * pos_sum / _denominator(n_pos, "N+")
        neg_den = _denominator(n_neg, "N-")
    else:
        pos_sum = -(ratio * adv_tok * lw_pos)[pos_tok].sum()
        pos_loss = cfg.positive_loss_factor * pos_sum / _denominator(n_all, "N")
        neg_den = _denominator(n_all, "N")
    neg_sum = -(ratio * adv_tok * lw_neg)[neg_tok].sum()
    neg_loss = cfg.negative_loss_factor * neg_sum / neg_den

    metrics: dict[str, Tensor] = {
        "loss/positive": pos_loss.detach(),
        "loss/negative": neg_loss.detach(),
        "tokens/positive": pos_tok.sum().float(),
        "tokens/negative": neg_tok.sum().float(),
        "tokens/w_pos_nonzero": (pos_tok & (w_pos > 0)).sum().float(),
        "tokens/w_neg_nonzero": (neg_tok & (w_neg > 0)).sum().float(),
        "sum/neg_logp": -logp.detach().sum(),  # entropy estimate = sum / N (docs/algorithm.md §11 avg_gen_entropy)
        "sum/advantage_tokens": adv_tok.detach().sum(),
    }
    loss = pos_loss + neg_loss
    if ref_logp is not None and cfg.kl_coef != 0.0:
        kl = kl_penalty(logp, ref_logp.float().detach(), cfg.kl_type)
        # algo.kl_normalizer: N (reference HEAD) or N⁻ (reference before 2859cc0, the paper era)
        if cfg.kl_normalizer == "negative":
            kl_den = _denominator(n_neg, "N-")
        elif cfg.kl_normalizer == "all":
            kl_den = _denominator(n_all, "N")
        else:
            raise ValueError(f"algo.kl_normalizer: unknown {cfg.kl_normalizer!r} (known: ['all', 'negative'])")
        kl_loss = cfg.kl_coef * kl.sum() / kl_den
        loss = loss + kl_loss
        metrics["loss/kl"] = kl_loss.detach()
        metrics["sum/kl"] = kl.detach().sum()
        metrics["sum/logp_minus_ref"] = (logp.detach() - ref_logp.float()).sum()  # avg_ref_kl
    else:
        metrics["loss/kl"] = torch.zeros(())
    return loss, metrics


def rm_loss(scores: Tensor, cu_seqlens: Tensor, rewards_positive: Tensor, m_global: float | Tensor) -> tuple[Tensor, dict]:
    """Token-RM loss: Σ_i BCEWithLogits(mean_t w_{i,t}, y_i) / M, fp32 (docs/algorithm.md §3, [P Eq 12], [train_oreal.py:L775-781]).

    Sequence-level BCE on the mean token logit, y_i = int(max(r_i, 0)) = 1 for positives.
    """
    z = sequence_mean(scores.float(), cu_seqlens)
    y = rewards_positive.to(torch.float32)
    if y.shape != z.shape:
        raise ValueError(f"rewards_positive: expected [{z.numel()}] (one per sequence), got {tuple(y.shape)}")
    per_seq = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    loss = per_seq.sum() / _denominator(m_global, "M")
    correct = ((z > 0) == (y > 0.5)).sum().float()
    return loss, {"loss/token_rm": loss.detach(), "sum/rm_correct": correct, "sum/rm_logit": z.detach().sum()}
