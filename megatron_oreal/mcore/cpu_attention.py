"""The local (CPU) spec's packed rows: attention cost Σ (sequence length)², RoPE by true positions.

Megatron's local `DotProductAttention` takes one dense [L, L] mask and materialises the full
[heads, L, L] score matrix of a packed row (packing.py), so a micro-batch of 128 short sequences in
an 8 k-token row costs ~64 M scores per head where the sequences themselves need ~0.5 M. Here each
sequence's positions (the row's `slots`, packing.py) are gathered side by side into a padded batch
[S, heads, max_len, head_dim]; one `scaled_dot_product_attention(is_causal=True)` call then does every
sequence at once (in fact up to three calls, one per bucket of slots of similar length; measured on
2 cores, 9 k tokens / 128 sequences, one layer fwd+bwd: dense mask 17.9 s, a Python loop of per-sequence SDPA calls 3.7 s, this 0.16 s; FlexAttention needs
torch.compile, which costs more than it saves on this path). A prompt shared by several responses
(packing.py, share_prompts) sits in each of their slots; its outputs are read from its first slot,
and the keys/values it gives every slot sum their gradients back into the one copy.

Why no padding mask is needed: a slot's padding lies after its last token, and under a causal mask a
real query at slot position i only sees keys 0..i, all real. Padded queries see padded keys but their
outputs are never read (and so get no gradient).

At TP = PP = 1 `LocalGPTModel` sends packed rows through lean_forward.py instead, which attends the
same slots (in the native C kernel when it loads, else in the same buckets with its own batched
matmuls); this module serves TP/PP > 1.

The row reaches this module as `PackedSeqParams(qkv_format="sbhd", ...)` with `slots` and
`rope_positions` attached (MicroBatch.local_packed_seq_params). `LocalGPTModel` rotates each token by
its position inside its sequence (Megatron's "sbhd" RoPE rotates by row index, which is right only
when every sequence is contiguous in the row) and, at TP = 1, computes logits for the real vocabulary
rows only (see `LocalGPTModel`).

Without `packed_seq_params` (or for a configuration this path does not cover: sliding window, a
non-vanilla softmax, attention dropout while training) the module is Megatron's DotProductAttention,
with the dense mask built from the same slots when a packed row comes in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention

Tensor = torch.Tensor


# Slots are attended in up to this many buckets of similar length, each padded only to its own
# longest slot: SDPA's cost grows with the padded width, and sampled responses vary in length (the
# tiny task's 128 slots of 15-38 positions: one layer's fwd+bwd 7.4 ms in one bucket, 4.6 in three).
# A bucket holds at least MIN_BUCKET_SLOTS slots, so a few long sequences are not split for nothing.
MAX_BUCKETS = 3
MIN_BUCKET_SLOTS = 8


def slot_layout(slots: Tensor, length: int, max_buckets: int = MAX_BUCKETS) -> tuple[list, Tensor]:
    """([(gather [n*W] row positions (L = pad), n, W) per bucket], read [L]).

    Buckets take the slots shortest first in equal shares, each as wide as its longest slot. `read`
    gives, for each row position, its output's index in the buckets' outputs laid end to end; a
    position held by several slots (a shared prompt) is read from the first of them.
    """
    slots = slots.to(dtype=torch.long)
    lens = (slots != length).sum(dim=1)
    order = torch.argsort(lens, stable=True)
    n_buckets = max(1, min(max_buckets, slots.shape[0] // MIN_BUCKET_SLOTS))
    buckets, flats = [], []
    for part in torch.tensor_split(order, n_buckets):
        width = max(int(lens[part].max()), 1)
        flat = slots[part, :width].reshape(-1)
        buckets.append((flat, part.numel(), width))
        flats.append(flat)
    flat = torch.cat(flats)
    first = torch.full((length + 1,), flat.numel(), dtype=torch.long)
    first.scatter_reduce_(0, flat, torch.arange(flat.numel()), reduce="amin")
    return buckets, first[:length]


def row_slot_layout(packed_seq_params, like: Tensor) -> tuple[list, Tensor]:
    """slot_layout of a packed row's slots on `like`'s device, computed once per row (it is the same
    for every layer of a forward) and cached on the row's PackedSeqParams."""
    layout = getattr(packed_seq_params, "_slot_layout", None)
    if layout is None:
        slots = packed_seq_params.slots
        buckets, read = slot_layout(slots.cpu(), int(packed_seq_params.max_seqlen_q))
        layout = ([(g.to(like.device), n, w) for g, n, w in buckets], read.to(like.device))
        packed_seq_params._slot_layout = layout
    return layout


class PackedLocalAttention(DotProductAttention):
    """DotProductAttention that runs a packed row sequence by sequence (see the module docstring)."""

    def _covered(self) -> bool:
        c = self.config
        return (c.window_size is None and c.softmax_type == "vanilla"
                and not (self.training and self.attention_dropout.p > 0.0))

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "sbhd":
            raise ValueError(f"PackedLocalAttention: qkv_format {packed_seq_params.qkv_format!r}; the local "
                             "spec takes packed rows as 'sbhd' (MicroBatch.local_packed_seq_params)")
        length, batch = query.shape[0], query.shape[1]
        if batch != 1:
            raise ValueError(f"PackedLocalAttention: a packed row has batch size 1, got {batch}")
        slots = getattr(packed_seq_params, "slots", None)
        if slots is None:
            raise ValueError("PackedLocalAttention: the packed row carries no `slots`; build its parameters "
                             "with MicroBatch.local_packed_seq_params()")
        if not self._covered():
            from megatron_oreal.mcore.packing import slots_mask

            mask = slots_mask(slots.cpu(), length).to(query.device)
            return super().forward(query, key, value, mask, attn_mask_type, attention_bias)

        buckets, read = row_slot_layout(packed_seq_params, query)
        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        heads, groups = self.num_attention_heads_per_partition, self.num_query_groups_per_partition

        def with_pad_row(t: Tensor) -> Tensor:  # [L, 1, h, d] -> [L+1, h, d]: gather index L reads zeros
            return torch.cat([t[:, 0], t.new_zeros(1, t.shape[2], t.shape[3])])

        q_rows, k_rows, v_rows = with_pad_row(query), with_pad_row(key), with_pad_row(value)
        outs = []
        for gather, n, width in buckets:
            def padded(rows: Tensor) -> Tensor:  # -> [n, h, width, d]
                return rows.index_select(0, gather).view(n, width, rows.shape[1], rows.shape[2]).transpose(1, 2)

            out = F.scaled_dot_product_attention(padded(q_rows), padded(k_rows), padded(v_rows), is_causal=True,
                                                 scale=scale, enable_gqa=heads != groups)
            outs.append(out.transpose(1, 2).reshape(n * width, heads * query.shape[3]))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.index_select(0, read).unsqueeze(1)  # [L, 1, h*d], as DotProductAttention


class LocalGPTModel(GPTModel):
    """GPTModel for the local spec (build_policy without Transformer Engine): three changes for packed rows.

    - At TP = PP = 1 (fp32, the usual CPU run; `lean_off_reason()` says why not otherwise) a packed row
      takes lean_forward.py's path: the same parameters and result, fewer and cheaper ops (its module
      docstring). Other calls (a dense mask, labels, inference, TP/PP > 1) run Megatron's forward with
      the two changes below.

    - RoPE by `rope_positions` (each token's position in its own sequence) when the row carries them
      (MicroBatch.local_packed_seq_params): the table GPTModel builds for the row length is indexed by
      them, so a response packed after a shared prompt is rotated as if it followed it directly. For a
      row of whole sequences this is the same rotation up to round-off (only relative positions
      matter), and the same as Hugging Face's, which also rotates by position ids.
    - At TP = 1 the logits are computed for the `real_vocab_size` rows of the output weight only: the
      padding rows (hf_config.VOCAB_PAD_BASE) would be masked to -inf anyway (model.mask_padded_vocab), so
      their logits, gradients (zero) and softmax mass (zero) change nothing; the tiny model's 102-token
      vocabulary is padded to 1024 rows, so this is most of its output layer. At TP > 1 the shards must
      stay equal for vocab-parallel cross entropy, and every rank computes its whole shard as before.
    """

    def __init__(self, *args, real_vocab_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        if (self.post_process and self.config.tensor_model_parallel_size == 1
                and real_vocab_size < self.output_layer.output_size_per_partition):
            # GPTModel builds its output layer itself; this subclass only narrows the forward (no new state).
            self.output_layer.__class__ = RealVocabOutputLayer
            self.output_layer.real_rows = real_vocab_size

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None,
                inference_context=None, packed_seq_params=None, extra_block_kwargs=None,
                runtime_gather_output=None, **kwargs):
        if (packed_seq_params is not None and getattr(packed_seq_params, "slots", None) is not None
                and decoder_input is None and labels is None and inference_context is None
                and not extra_block_kwargs and not any(v is not None for v in kwargs.values())
                and self.lean_off_reason() is None):
            from megatron_oreal.mcore.lean_forward import lean_forward

            return lean_forward(self, input_ids, packed_seq_params)
        return super().forward(input_ids, position_ids, attention_mask, decoder_input, labels, inference_context,
                               packed_seq_params, extra_block_kwargs, runtime_gather_output, **kwargs)

    def lean_off_reason(self) -> str | None:
        """None when packed rows take lean_forward.py's path; else why they take Megatron's forward.
        Decided once per model (its structure and config do not change after building), unless
        `lean = False` was set on it (A/B checks, tests)."""
        if not getattr(self, "lean", True):
            return "lean = False"
        if not hasattr(self, "_lean_off_reason"):
            from megatron_oreal.mcore.lean_forward import unsupported_reason

            self._lean_off_reason = unsupported_reason(self)
        return self._lean_off_reason

    def _preprocess(self, *args, **kwargs):
        out = super()._preprocess(*args, **kwargs)
        positions = getattr(kwargs.get("packed_seq_params"), "rope_positions", None)
        if positions is None or out[1] is None:
            return out
        table = out[1]  # [L, 1, 1, dim] for row positions 0..L-1; a token's position never exceeds its row index
        return (out[0], table[positions.to(table.device)], *out[2:])


class RealVocabOutputLayer(ColumnParallelLinear):
    """The TP = 1 output layer computing the first `real_rows` logits only (see LocalGPTModel)."""

    real_rows: int

    def forward(self, input_: Tensor, weight: Tensor | None = None, runtime_gather_output=None):
        w = self.weight if weight is None else weight  # tied embeddings pass the embedding weight
        return F.linear(input_, w[: self.real_rows]), None
