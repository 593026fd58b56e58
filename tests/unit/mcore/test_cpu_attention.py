"""PackedLocalAttention (the CPU path's per-sequence attention) against the dense block-causal mask.

Same model, same packed row: the logits and every parameter gradient must agree with Megatron's own
DotProductAttention run with the [L, L] mask, including GQA and a trailing padding segment.
"""

from __future__ import annotations

import pytest
import torch

from helpers.layout import single_rank_layout
from helpers.tiny_hf import make_tiny_qwen2


@pytest.fixture(scope="module")
def layout():
    with single_rank_layout(seed=11) as lay:
        yield lay


def _batch():
    from megatron_oreal.types import TrainBatch, TrainSequence

    g = torch.Generator().manual_seed(5)
    seqs = []
    for p, r in [(4, 7), (9, 2), (1, 3), (6, 6)]:
        ids = torch.randint(1, 250, (p + r,), generator=g).tolist()
        seqs.append(TrainSequence(ids[:p], ids[p:], 1.0, True))
    return TrainBatch(seqs)


def test_row_layout_gathers_each_sequence_into_its_own_padded_slot():
    from megatron_oreal.mcore.cpu_attention import row_layout

    index, n_seq, max_len = row_layout(torch.tensor([0, 2, 5], dtype=torch.int32), 6)
    assert (n_seq, max_len) == (3, 3)  # the trailing padding position is a sequence of its own
    assert index.tolist() == [0, 1, 3, 4, 5, 6]


def test_packed_attention_matches_dense_mask_logits_and_grads(tmp_path, layout):
    from megatron_oreal.checkpoint.hf_io import load_hf_weights
    from megatron_oreal.mcore.cpu_attention import PackedLocalAttention
    from megatron_oreal.mcore.forward import needs_dense_mask, uses_packed_local
    from megatron_oreal.mcore.hf_config import load_hf_config
    from megatron_oreal.mcore.model import build_policy
    from megatron_oreal.mcore.packing import pack_sequences

    make_tiny_qwen2(tmp_path, seed=4)  # 4 heads, 2 KV groups: the GQA path
    model = build_policy(load_hf_config(tmp_path), layout)
    load_hf_weights(model, tmp_path, layout)
    assert uses_packed_local(model) and not needs_dense_mask(model)
    attn = [m for m in model.modules() if isinstance(m, PackedLocalAttention)]
    assert attn and attn[0].num_attention_heads_per_partition != attn[0].num_query_groups_per_partition

    mb = pack_sequences(_batch(), [0, 1, 2, 3], pad_to_multiple=8)  # 38 tokens + 2 padding
    assert mb.tokens.shape[1] == 40 and mb.attention_mask is not None

    def run(**kw):
        model.zero_grad(set_to_none=True)
        out = model(mb.tokens, mb.position_ids, **kw)
        (out.float().pow(2).mean()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    dense, dense_g = run(attention_mask=mb.attention_mask)
    packed, packed_g = run(attention_mask=None, packed_seq_params=mb.local_packed_seq_params())
    real = int(mb.cu_seqlens[-1])
    assert dense.abs().max() > 0.1
    assert (packed[:, :real] - dense[:, :real]).abs().max().item() <= 1e-5
    for name, g in dense_g.items():
        assert g.abs().max() > 0 or name.endswith("bias"), name
        assert (packed_g[name] - g).abs().max().item() <= 1e-6 * max(1.0, g.abs().max().item()), name
