"""Packed micro-batches: sequences concatenated into rows, no padding waste (docs/design.md decision 9).

One builder serves both paths. Each micro-batch is one row [1, L] of whole prompt+response sequences
with position ids restarting per sequence. On the local (CPU) spec the row's `cu_seqlens` go to
PackedLocalAttention (cpu_attention.py), which attends within each sequence (cost Σ len², no [L, L]
mask); a local-spec model without it gets the dense block-diagonal causal mask; on GPUs the same
row goes to Transformer Engine attention as THD with `cu_seqlens` (`packed_seq_params`). RoPE
depends only on relative positions, so a sequence's offset inside a row does not change its outputs.

Split of one step's batch (identical on every rank):
  1. across DP ranks: longest-first greedy onto the rank with the fewest tokens (balanced compute);
  2. within a rank: first-fit-decreasing into micro-batches of at most `micro_batch_tokens` tokens
     (dynamic batch size); a sequence longer than the budget gets a micro-batch of its own.
Every rank computes the same split from the same batch, so no communication is needed to agree.

Alignment (docs/algorithm.md §3 / §8.1 item 7): with prompt length P and response length R, the positions
P-1 .. P+R-2 of a sequence predict its R response tokens; `loss_mask` marks exactly those R positions,
and the per-position outputs (log-probs, RM scores) taken there in order form the packed
response-token layout with offsets `resp_cu_seqlens`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_oreal.types import TrainBatch, TrainSequence

Tensor = torch.Tensor


@dataclass
class MicroBatch:
    tokens: Tensor  # [1, L] long: prompt+response of each sequence, concatenated
    position_ids: Tensor  # [1, L] long, restarting at 0 for each sequence
    labels: Tensor  # [1, L] long: the next token inside the sequence (0 where there is none)
    loss_mask: Tensor  # [1, L] bool: positions that predict a response token
    cu_seqlens: Tensor  # [S+1] int32: row offsets of the whole sequences
    resp_cu_seqlens: Tensor  # [S+1] long: offsets in the packed response-token layout
    advantages: Tensor  # [S] float32
    is_positive: Tensor  # [S] bool
    seq_indices: list[int]  # positions in TrainBatch.sequences
    attention_mask: Tensor | None = None  # [1, 1, L, L] bool, True = masked (local spec only)

    @property
    def num_sequences(self) -> int:
        return len(self.seq_indices)

    @property
    def num_response_tokens(self) -> int:
        return int(self.resp_cu_seqlens[-1])

    def packed_seq_params(self):
        """THD parameters for Transformer Engine attention (GPU path; mcore 0.16.1 PackedSeqParams).

        TE's fused attention reads cu_seqlens as int32 on the device; max_seqlen bounds the kernel tiles.
        """
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = self.cu_seqlens.to(dtype=torch.int32)
        if int(cu[-1]) < self.tokens.shape[1]:  # trailing padding (pad_to_multiple) is a sequence of its own
            cu = torch.cat([cu, torch.tensor([self.tokens.shape[1]], dtype=torch.int32)])
        max_len = int((cu[1:] - cu[:-1]).max())
        cu = cu.to(self.tokens.device)
        return PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len
        )

    def local_packed_seq_params(self):
        """The row's sequence offsets for the local spec's PackedLocalAttention (cpu_attention.py).

        qkv_format "sbhd": Megatron keeps the row as [L, 1, ...] and applies RoPE along it as with the
        dense mask; GPTModel sizes the RoPE table from max_seqlen_q, so that is the row length here.
        """
        from megatron.core.packed_seq_params import PackedSeqParams

        n = self.tokens.shape[1]
        return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                               max_seqlen_q=n, max_seqlen_kv=n)

    def to(self, device) -> "MicroBatch":
        mv = lambda t: None if t is None else t.to(device)
        return MicroBatch(
            mv(self.tokens), mv(self.position_ids), mv(self.labels), mv(self.loss_mask), self.cu_seqlens,
            self.resp_cu_seqlens, mv(self.advantages), mv(self.is_positive), list(self.seq_indices),
            mv(self.attention_mask),
        )


def _check_sequence(i: int, s: TrainSequence) -> None:
    if not s.prompt_ids:
        raise ValueError(f"batch.sequences[{i}]: empty prompt_ids (a response needs at least one prompt token)")
    if not s.response_ids:
        raise ValueError(f"batch.sequences[{i}]: empty response_ids")


def seq_len(s: TrainSequence) -> int:
    return len(s.prompt_ids) + len(s.response_ids)


def split_across_dp(lengths: list[int], dp: int) -> list[list[int]]:
    """Indices per DP rank, balanced by tokens: longest first, each to the currently lightest rank."""
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    loads, shares = [0] * dp, [[] for _ in range(dp)]
    for i in order:
        r = min(range(dp), key=lambda k: (loads[k], k))
        loads[r] += lengths[i]
        shares[r].append(i)
    return [sorted(s) for s in shares]


def split_by_token_budget(indices: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit decreasing into bins of at most `budget` tokens (an oversized sequence gets its own bin)."""
    if budget < 1:
        raise ValueError(f"policy.micro_batch_tokens must be >= 1, got {budget}")
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        for b, load in enumerate(loads):
            if load + lengths[i] <= budget:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return [sorted(b) for b in bins]


def block_causal_mask(cu_seqlens: Tensor, length: int) -> Tensor:
    """[1, 1, L, L] bool, True = masked: token i sees token j only if same sequence and j <= i."""
    seg = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
    if seg.numel() < length:  # trailing padding: one more segment of its own
        seg = torch.cat([seg, torch.full((length - seg.numel(),), cu_seqlens.numel() - 1)])
    same = seg[:, None] == seg[None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return ~(same & causal)[None, None]


def pack_sequences(
    batch: TrainBatch, indices: list[int], *, with_mask: bool = True, pad_to_multiple: int = 1
) -> MicroBatch:
    """Pack batch.sequences[indices] into one row (see the module docstring for the alignment)."""
    tokens, pos, labels, lmask = [], [], [], []
    cu, rcu = [0], [0]
    for i in indices:
        s = batch.sequences[i]
        _check_sequence(i, s)
        ids = list(s.prompt_ids) + list(s.response_ids)
        p, r = len(s.prompt_ids), len(s.response_ids)
        tokens += ids
        pos += range(len(ids))
        labels += ids[1:] + [0]
        lmask += [False] * (p - 1) + [True] * r + [False]
        cu.append(cu[-1] + len(ids))
        rcu.append(rcu[-1] + r)
    n = len(tokens)
    pad = (-n) % pad_to_multiple if n else pad_to_multiple  # an empty share still needs one position
    tokens += [0] * pad
    pos += range(pad)
    labels += [0] * pad
    lmask += [False] * pad
    cu_t = torch.tensor(cu, dtype=torch.int32)
    seqs = [batch.sequences[i] for i in indices]
    return MicroBatch(
        tokens=torch.tensor([tokens], dtype=torch.long),
        position_ids=torch.tensor([pos], dtype=torch.long),
        labels=torch.tensor([labels], dtype=torch.long),
        loss_mask=torch.tensor([lmask], dtype=torch.bool),
        cu_seqlens=cu_t,
        resp_cu_seqlens=torch.tensor(rcu, dtype=torch.long),
        advantages=torch.tensor([s.advantage for s in seqs], dtype=torch.float32),
        is_positive=torch.tensor([s.is_positive for s in seqs], dtype=torch.bool),
        seq_indices=list(indices),
        attention_mask=block_causal_mask(cu_t, len(tokens)) if with_mask else None,
    )


def build_micro_batches(
    batch: TrainBatch,
    dp_rank: int,
    dp_size: int,
    micro_batch_tokens: int,
    *,
    with_mask: bool = True,
    pad_to_multiple: int = 1,
) -> list[MicroBatch]:
    """This DP rank's micro-batches for the step (at least one, possibly empty of sequences)."""
    for i, s in enumerate(batch.sequences):
        _check_sequence(i, s)
    lengths = [seq_len(s) for s in batch.sequences]
    share = split_across_dp(lengths, dp_size)[dp_rank]
    bins = split_by_token_budget(share, lengths, micro_batch_tokens) or [[]]
    return [pack_sequences(batch, b, with_mask=with_mask, pad_to_multiple=pad_to_multiple) for b in bins]


def global_counts(batch: TrainBatch) -> dict[str, int]:
    """N⁺, N⁻, N (response tokens) and M (sequences) over a whole batch (docs/algorithm.md §1)."""
    n_pos = sum(len(s.response_ids) for s in batch.sequences if s.is_positive)
    n_neg = sum(len(s.response_ids) for s in batch.sequences if not s.is_positive)
    return {"n_pos": n_pos, "n_neg": n_neg, "n_all": n_pos + n_neg, "m": len(batch.sequences)}


def local_counts(micro_batches: list[MicroBatch]) -> dict[str, int]:
    """The same counts over this rank's micro-batches (summed over DP they give global_counts)."""
    out = {"n_pos": 0, "n_neg": 0, "n_all": 0, "m": 0}
    for mb in micro_batches:
        lens = (mb.resp_cu_seqlens[1:] - mb.resp_cu_seqlens[:-1]).long()
        out["n_pos"] += int(lens[mb.is_positive].sum())
        out["n_neg"] += int(lens[~mb.is_positive].sum())
        out["m"] += mb.num_sequences
    out["n_all"] = out["n_pos"] + out["n_neg"]
    return out
