"""Token-level RM scores -> importance weights ω⁺ (positive sequences) and ω⁻ (negative sequences).

Layout: the response tokens of S sequences packed flat, `scores` [T] and `cu_seqlens` [S+1] (int, starting
at 0, ending at T). scores[t] is the RM output at the position that *predicts* response token t, i.e. the
value of the prefix (x, a_<t) without a_t (docs/algorithm.md §3 "Scores and alignment", [train_oreal.py:L772]).

All weights are detached (docs/algorithm.md §3, `q = sigmoid(c).detach()`): they scale the policy gradient and
never train the RM.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

WEIGHTING_MODES = ("threshold", "topk", "none")


def check_cu_seqlens(cu_seqlens: Tensor, total: int, name: str = "cu_seqlens") -> Tensor:
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name}: expected a 1-D [S+1] tensor, got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.long()
    if int(cu[0]) != 0 or int(cu[-1]) != total:
        raise ValueError(f"{name}: must start at 0 and end at {total} tokens, got {cu.tolist()[:4]}...{int(cu[-1])}")
    if (cu[1:] - cu[:-1] <= 0).any():
        raise ValueError(f"{name}: every sequence needs at least one token, got lengths {(cu[1:] - cu[:-1]).tolist()}")
    return cu


def segment_ids(cu_seqlens: Tensor) -> Tensor:
    """[S+1] offsets -> [T] index of the sequence each token belongs to."""
    cu = cu_seqlens.long()
    return torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), cu[1:] - cu[:-1])


def segment_sum(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Per-sequence sum of a packed [T] tensor -> [S] (differentiable)."""
    cu = check_cu_seqlens(cu_seqlens, x.numel()).to(x.device)
    out = torch.zeros(cu.numel() - 1, dtype=x.dtype, device=x.device)
    return out.index_add(0, segment_ids(cu), x)


def sequence_mean(x: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Per-sequence mean -> [S]; z_i = mean_t w_{i,t} of docs/algorithm.md §3 (differentiable)."""
    cu = cu_seqlens.long().to(x.device)
    return segment_sum(x, cu) / (cu[1:] - cu[:-1]).to(x.dtype)


def prefix_mean(scores: Tensor, cu_seqlens: Tensor) -> Tensor:
    """c_t = (1/(t+1)) Σ_{k<=t} w_k within each sequence ([docs/algorithm.md, train_oreal.py:L769] cumsum / arange), float64 for long rows."""
    cu = check_cu_seqlens(cu_seqlens, scores.numel()).to(scores.device)  # offsets may live on the host
    seg = segment_ids(cu)
    x = scores.detach().double()
    cs = torch.cumsum(x, 0)
    start = (cs - x)[cu[:-1]]  # running sum before each sequence's first token
    pos = torch.arange(x.numel(), device=x.device) - cu[:-1][seg]
    return (cs - start[seg]) / (pos + 1).double()


def threshold_rescale(prob: Tensor, threshold: float) -> Tensor:
    """clamp((p - τ)/(1 - τ), 0, 1) ([docs/algorithm.md, train_oreal.py:L105-109]); τ = 0.5 gives max(2p - 1, 0) ([P Eq 10])."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"token-weight threshold must be in [0, 1), got {threshold}")
    return ((prob - threshold) / (1.0 - threshold)).clamp(0.0, 1.0)


def topk_rescale(prob: Tensor, ratio: float) -> Tensor:
    """Keep the top `ratio` of one sequence's tokens by prob, min-max normalised to [0, 1]; zero the rest.

    [docs/algorithm.md, train_oreal.py:L112-121]: k = int(n * ratio); if all kept values are equal they all get 1. Deviation: the
    reference crashes when k = 0 (sequences shorter than 1/ratio); we keep at least one token.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"algo.topk_ratio must be in (0, 1], got {ratio}")
    k = max(int(prob.numel() * ratio), 1)
    values, idx = torch.topk(prob, k)
    out = torch.zeros_like(prob)
    lo, hi = values.min(), values.max()
    out[idx] = (values - lo) / (hi - lo) if hi != lo else torch.ones_like(values)
    return out


def token_weights(
    scores: Tensor,
    cu_seqlens: Tensor,
    mode: str = "threshold",
    correct_threshold: float = 0.5,
    incorrect_threshold: float = 0.5,
    topk_ratio: float = 0.25,
) -> tuple[Tensor, Tensor]:
    """Packed RM scores [T] -> (ω⁺ [T], ω⁻ [T]), float32, detached (docs/algorithm.md §3 "Scores → token weights").

    q_t = σ(prefix mean of w); ω⁺ from q, ω⁻ from 1 - q. "none" gives ω⁺ = ω⁻ = 1 ([C7-noRM]).
    """
    if mode not in WEIGHTING_MODES:
        raise ValueError(f"algo.token_weighting: unknown mode {mode!r} (known: {list(WEIGHTING_MODES)})")
    if mode == "none":
        ones = torch.ones(scores.numel(), dtype=torch.float32, device=scores.device)
        return ones, ones.clone()
    q = torch.sigmoid(prefix_mean(scores, cu_seqlens))  # float64, detached
    if mode == "threshold":
        w_pos, w_neg = threshold_rescale(q, correct_threshold), threshold_rescale(1.0 - q, incorrect_threshold)
    else:
        cu = cu_seqlens.long().tolist()
        w_pos, w_neg = torch.zeros_like(q), torch.zeros_like(q)
        for a, b in zip(cu[:-1], cu[1:]):  # per sequence, as the reference applies it per trajectory
            w_pos[a:b] = topk_rescale(q[a:b], topk_ratio)
            w_neg[a:b] = topk_rescale(1.0 - q[a:b], topk_ratio)
    return w_pos.float(), w_neg.float()
