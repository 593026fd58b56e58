"""Core attention for the local (CPU) layer spec: cost Σ (sequence length)², not (packed row)².

Megatron's local `DotProductAttention` takes one dense [L, L] mask and materialises the full
[heads, L, L] score matrix of a packed row (packing.py), so a micro-batch of 128 short sequences in
an 8 k-token row costs ~64 M scores per head where the sequences themselves need ~0.5 M. Here the
row is cut at `cu_seqlens` and the sequences are laid side by side in a padded batch
[S, heads, max_len, head_dim]; one `scaled_dot_product_attention(is_causal=True)` call then does every
sequence at once (measured on 2 cores, 9 k tokens / 128 sequences, one layer fwd+bwd: dense mask
17.9 s, a Python loop of per-sequence SDPA calls 3.7 s, this 0.16 s; FlexAttention needs
torch.compile, which costs more than it saves on this path).

Why no padding mask is needed: a sequence's padding lies after its last token, and under a causal
mask a real query at position i only sees keys 0..i, all real. Padded queries see padded keys but
their outputs are dropped when the row is gathered back (and so get no gradient).

The row reaches this module as `PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=...)`
(MicroBatch.local_packed_seq_params). With "sbhd" Megatron's Attention applies RoPE to the whole row
exactly as with the dense mask (RoPE depends only on relative positions, packing.py), and GPTModel
sizes the RoPE table from `max_seqlen_q`, which is therefore the row length, not the longest sequence.

Without `packed_seq_params` (or for a configuration this path does not cover: sliding window, a
non-vanilla softmax, attention dropout while training) the module is Megatron's DotProductAttention,
with the dense block-causal mask built from `cu_seqlens` when needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention

Tensor = torch.Tensor


def row_layout(cu_seqlens: Tensor, length: int) -> tuple[Tensor, int, int]:
    """(gather index [L] into a flat [S * max_len] padded layout, S, max_len) for a row of `length`.

    Positions past cu_seqlens[-1] (trailing padding) form one more sequence of their own.
    """
    cu = cu_seqlens.to(device="cpu", dtype=torch.long)
    if int(cu[-1]) < length:
        cu = torch.cat([cu, torch.tensor([length])])
    lens = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(lens.numel()), lens)
    max_len = int(lens.max())
    index = seg * max_len + (torch.arange(length) - cu[:-1][seg])
    return index, int(lens.numel()), max_len


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
        if not self._covered():
            from megatron_oreal.mcore.packing import block_causal_mask

            mask = block_causal_mask(packed_seq_params.cu_seqlens_q.cpu(), length).to(query.device)
            return super().forward(query, key, value, mask, attn_mask_type, attention_bias)

        layout = getattr(packed_seq_params, "_row_layout", None)  # the same for every layer of a forward
        if layout is None or layout[0].numel() != length:
            index, n_seq, max_len = row_layout(packed_seq_params.cu_seqlens_q, length)
            layout = (index.to(query.device), n_seq, max_len)
            packed_seq_params._row_layout = layout
        index, n_seq, max_len = layout

        def padded(t: Tensor) -> Tensor:  # [L, 1, h, d] -> [S, h, max_len, d]
            flat = t.new_zeros(n_seq * max_len, t.shape[2], t.shape[3]).index_copy(0, index, t[:, 0])
            return flat.view(n_seq, max_len, t.shape[2], t.shape[3]).transpose(1, 2)

        scale = self.softmax_scale * (self.layer_number if self.config.apply_query_key_layer_scaling else 1)
        heads, groups = self.num_attention_heads_per_partition, self.num_query_groups_per_partition
        out = F.scaled_dot_product_attention(padded(query), padded(key), padded(value), is_causal=True,
                                             scale=scale, enable_gqa=heads != groups)
        out = out.transpose(1, 2).reshape(n_seq * max_len, heads * query.shape[3])
        return out[index].unsqueeze(1)  # [L, 1, h*d] as DotProductAttention returns
