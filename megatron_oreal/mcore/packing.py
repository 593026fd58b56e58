"""Packed micro-batches: sequences concatenated into rows, no padding waste (docs/design.md decision 9).

One builder serves both paths. Each micro-batch is one row [1, L] of whole prompt+response sequences
with position ids restarting per sequence. On the local (CPU) spec the row's `slots` go to
PackedLocalAttention (cpu_attention.py), which attends within each sequence (cost Σ len², no [L, L]
mask); a local-spec model without it gets the dense mask built from the same slots; on GPUs the row
goes to Transformer Engine attention as THD with `cu_seqlens` (`packed_seq_params`).

Shared prompts (`share_prompts=True`, the local spec only): the n samples of a prompt repeat the same
prompt tokens, whose hidden states are identical in every sample (causal attention: a prompt token
sees only the prompt). Such sequences are packed as one segment, the prompt once followed by each
response: [p0 p1 p2 | a0 a1 | b0 b1 b2]. Response b attends to the prompt and to itself only (its slot
is [p0 p1 p2 b0 b1 b2]; last tokens are left out, below), its positions continue the prompt's
(3, 4, 5), and b's first token is predicted by the shared last prompt position, as is a's. The outputs are those of the sequences
packed one by one, for ~30 % fewer tokens per forward and backward in the tiny task's groups of 8
(a 7-token prompt under ~16-token responses). The GPU's THD attention has no such layout; there
every sequence keeps its own copy of the prompt.

Split of one step's batch (identical on every rank):
  1. across DP ranks: longest-first greedy onto the rank with the fewest tokens (balanced compute);
  2. within a rank: first-fit-decreasing into micro-batches of at most `micro_batch_tokens` tokens
     (dynamic batch size); a sequence longer than the budget gets a micro-batch of its own.
With shared prompts the unit of both splits is a prompt's group of sequences (its row length the
cost), cut into several units when the whole group is over the budget.
Every rank computes the same split from the same batch, so no communication is needed to agree.

Alignment (docs/algorithm.md §3 / §8.1 item 7): with prompt length P and response length R, the positions
P-1 .. P+R-2 of a sequence predict its R response tokens. Its last token predicts nothing and no
later token attends to it, so it is not fed at all: a sequence takes P+R-1 row positions (~6 % fewer
tokens at the tiny task's lengths, on both paths). `pred_index` lists, for every response token
in order (sequence by sequence, in `seq_indices` order), the row position whose output predicts it,
and `pred_labels` the token: per-position outputs (log-probs, RM scores) taken there form the packed
response-token layout with offsets `resp_cu_seqlens`. With shared prompts one row position (the
prompt's last) predicts the first token of every response of the group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_oreal.types import TrainBatch, TrainSequence

Tensor = torch.Tensor


@dataclass
class MicroBatch:
    tokens: Tensor  # [1, L] long: the row (see the module docstring)
    position_ids: Tensor  # [1, L] long, each token's position inside its own sequence
    pred_index: Tensor  # [T] long: the row position predicting each response token (packed order)
    pred_labels: Tensor  # [T] long: that response token
    cu_seqlens: Tensor  # [G+1] int32: row offsets of the segments (a sequence; or a prompt and its responses)
    slots: Tensor  # [S', W] long: the row positions of each sequence in order, L = none (pad); then padding
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

    @property
    def shares_prompts(self) -> bool:
        """True when some sequences of this row share one copy of their prompt (slots overlap)."""
        return len(self.seq_indices) > self.cu_seqlens.numel() - 1

    def packed_seq_params(self):
        """THD parameters for Transformer Engine attention (GPU path; mcore 0.16.1 PackedSeqParams).

        TE's fused attention reads cu_seqlens as int32 on the device; max_seqlen bounds the kernel tiles.
        """
        from megatron.core.packed_seq_params import PackedSeqParams

        if self.shares_prompts:
            raise ValueError("packed_seq_params: this row shares prompts between sequences, which THD attention "
                             "cannot express; build it with share_prompts=False")
        cu = self.cu_seqlens.to(dtype=torch.int32)
        if int(cu[-1]) < self.tokens.shape[1]:  # trailing padding (pad_to_multiple) is a sequence of its own
            cu = torch.cat([cu, torch.tensor([self.tokens.shape[1]], dtype=torch.int32)])
        max_len = int((cu[1:] - cu[:-1]).max())
        cu = cu.to(self.tokens.device)
        return PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len
        )

    def local_packed_seq_params(self):
        """The row's layout for the local spec: PackedLocalAttention and LocalGPTModel (cpu_attention.py).

        qkv_format "sbhd": Megatron keeps the row as [L, 1, ...]; GPTModel sizes its RoPE table from
        max_seqlen_q (the row length here). Two attributes ride along: `slots` (which positions form each
        sequence, for the attention) and `rope_positions` (each token's position in its sequence, by which
        LocalGPTModel rotates it: along the row would be wrong for a response after a shared prompt).
        """
        from megatron.core.packed_seq_params import PackedSeqParams

        n = self.tokens.shape[1]
        params = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
                                 max_seqlen_q=n, max_seqlen_kv=n)
        params.slots = self.slots
        params.rope_positions = self.position_ids[0]
        return params

    def to(self, device) -> "MicroBatch":
        mv = lambda t: None if t is None else t.to(device)
        return MicroBatch(
            mv(self.tokens), mv(self.position_ids), mv(self.pred_index), mv(self.pred_labels), self.cu_seqlens,
            self.slots, self.resp_cu_seqlens, mv(self.advantages), mv(self.is_positive), list(self.seq_indices),
            mv(self.attention_mask),
        )


def _check_sequence(i: int, s: TrainSequence) -> None:
    if not s.prompt_ids:
        raise ValueError(f"batch.sequences[{i}]: empty prompt_ids (a response needs at least one prompt token)")
    if not s.response_ids:
        raise ValueError(f"batch.sequences[{i}]: empty response_ids")


def seq_len(s: TrainSequence) -> int:
    """Row positions a sequence takes: its last token is not fed (see the module docstring)."""
    return len(s.prompt_ids) + len(s.response_ids) - 1


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


def slots_of_segments(cu_seqlens: Tensor, length: int) -> Tensor:
    """[S, W] slots of a row of whole sequences at `cu_seqlens` (positions past its end: one more slot)."""
    cu = cu_seqlens.to(dtype=torch.long).tolist()
    if cu[-1] < length:
        cu.append(length)
    return _slots([list(range(a, b)) for a, b in zip(cu[:-1], cu[1:])], length)


def _slots(slot_positions: list[list[int]], length: int) -> Tensor:
    width = max((len(p) for p in slot_positions), default=1)
    # one tensor from padded lists (a tensor per slot cost ~1.5 ms a step for the tiny task's 128)
    rows = [p + [length] * (width - len(p)) for p in slot_positions] or [[length] * width]
    return torch.tensor(rows, dtype=torch.long)


def slots_mask(slots: Tensor, length: int) -> Tensor:
    """[1, 1, L, L] bool, True = masked: position i sees j iff some slot holds j at or before i."""
    width = slots.shape[1]
    seen = torch.zeros(length + 1, length + 1, dtype=torch.bool)  # row/column L collects the pads
    causal = torch.ones(width, width, dtype=torch.bool).tril().expand(slots.shape[0], width, width)
    seen[slots[:, :, None].expand_as(causal), slots[:, None, :].expand_as(causal)] = causal
    return ~seen[:length, :length][None, None]


def _prompt_groups(batch: TrainBatch, indices: list[int]) -> list[list[int]]:
    """indices grouped by identical prompt, groups in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in indices:
        groups.setdefault(tuple(batch.sequences[i].prompt_ids), []).append(i)
    return list(groups.values())


def pack_sequences(
    batch: TrainBatch, indices: list[int], *, with_mask: bool = True, pad_to_multiple: int = 1,
    share_prompts: bool = False,
) -> MicroBatch:
    """Pack batch.sequences[indices] into one row (see the module docstring for the layout and alignment).

    The response-token layout follows `indices` in either case; with share_prompts the row holds each
    distinct prompt once, followed by the responses of the sequences that have it.
    """
    for i in indices:
        _check_sequence(i, batch.sequences[i])
    groups = _prompt_groups(batch, indices) if share_prompts else [[i] for i in indices]
    tokens, pos, cu, slot_pos = [], [], [0], []
    preds: dict[int, tuple[list[int], list[int]]] = {}  # sequence -> (row positions, labels)
    for group in groups:
        prompt = list(batch.sequences[group[0]].prompt_ids)
        p, start = len(prompt), len(tokens)
        tokens += prompt
        pos += range(p)
        for i in group:
            resp = list(batch.sequences[i].response_ids)
            first = len(tokens)
            tokens += resp[:-1]  # the last token predicts nothing: a label only, never an input
            pos += range(p, p + len(resp) - 1)
            rows = list(range(first, first + len(resp) - 1))
            slot_pos.append(list(range(start, start + p)) + rows)
            preds[i] = ([start + p - 1] + rows, resp)
        cu.append(len(tokens))
    n = len(tokens)
    pad = (-n) % pad_to_multiple if n else pad_to_multiple  # an empty share still needs one position
    tokens += [0] * pad
    pos += range(pad)
    if pad:
        slot_pos.append(list(range(n, n + pad)))
    length = len(tokens)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    slots = _slots(slot_pos, length)
    seqs = [batch.sequences[i] for i in indices]
    rcu = [0]
    for s in seqs:
        rcu.append(rcu[-1] + len(s.response_ids))
    return MicroBatch(
        tokens=torch.tensor([tokens], dtype=torch.long),
        position_ids=torch.tensor([pos], dtype=torch.long),
        pred_index=torch.tensor([r for i in indices for r in preds[i][0]], dtype=torch.long),
        pred_labels=torch.tensor([t for i in indices for t in preds[i][1]], dtype=torch.long),
        cu_seqlens=cu_t,
        slots=slots,
        resp_cu_seqlens=torch.tensor(rcu, dtype=torch.long),
        advantages=torch.tensor([s.advantage for s in seqs], dtype=torch.float32),
        is_positive=torch.tensor([s.is_positive for s in seqs], dtype=torch.bool),
        seq_indices=list(indices),
        attention_mask=slots_mask(slots, length) if with_mask else None,
    )


def _units(batch: TrainBatch, budget: int, share_prompts: bool) -> list[tuple[list[int], int]]:
    """The units the splits place, with their row lengths: a sequence each, or with share_prompts a
    prompt's group (cut into budget-sized parts when the whole group is over the budget)."""
    if not share_prompts:
        return [([i], seq_len(s)) for i, s in enumerate(batch.sequences)]
    units = []
    for group in _prompt_groups(batch, list(range(batch.num_sequences))):
        p = len(batch.sequences[group[0]].prompt_ids)
        part, cost = [], p
        for i in group:
            r = len(batch.sequences[i].response_ids) - 1
            if part and cost + r > budget:
                units.append((part, cost))
                part, cost = [], p
            part.append(i)
            cost += r
        units.append((part, cost))
    return units


def build_micro_batches(
    batch: TrainBatch,
    dp_rank: int,
    dp_size: int,
    micro_batch_tokens: int,
    *,
    with_mask: bool = True,
    pad_to_multiple: int = 1,
    share_prompts: bool = False,
) -> list[MicroBatch]:
    """This DP rank's micro-batches for the step (at least one, possibly empty of sequences).

    share_prompts: pack each prompt once per micro-batch (local spec only; see the module docstring).
    """
    for i, s in enumerate(batch.sequences):
        _check_sequence(i, s)
    if micro_batch_tokens < 1:
        raise ValueError(f"policy.micro_batch_tokens must be >= 1, got {micro_batch_tokens}")
    units = _units(batch, micro_batch_tokens, share_prompts)
    costs = [c for _, c in units]
    share = split_across_dp(costs, dp_size)[dp_rank]
    bins = split_by_token_budget(share, costs, micro_batch_tokens) or [[]]
    return [pack_sequences(batch, sorted(i for u in b for i in units[u][0]), with_mask=with_mask,
                           pad_to_multiple=pad_to_multiple, share_prompts=share_prompts) for b in bins]


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
