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


def test_slot_layout_gathers_each_sequence_and_reads_a_shared_prompt_once():
    from megatron_oreal.mcore.cpu_attention import slot_layout
    from megatron_oreal.mcore.packing import slots_of_segments

    slots = slots_of_segments(torch.tensor([0, 2, 5], dtype=torch.int32), 6)
    assert slots.tolist() == [[0, 1, 6], [2, 3, 4], [5, 6, 6]]  # the trailing padding is a slot of its own
    (bucket,), read = slot_layout(slots, 6)  # 3 slots: one bucket
    gather, n, width = bucket
    assert (n, width) == (3, 3)
    # slots shortest first: [5] then [0, 1] then [2, 3, 4]
    assert gather.tolist() == [5, 6, 6, 0, 1, 6, 2, 3, 4] and read.tolist() == [3, 4, 6, 7, 8, 0]
    # prompt 0,1 shared by responses 2 and 3,4: its outputs come from the first slot read
    (bucket,), read = slot_layout(torch.tensor([[0, 1, 2, 5], [0, 1, 3, 4]]), 5)
    assert bucket[0].tolist() == [0, 1, 2, 5, 0, 1, 3, 4] and read.tolist() == [0, 1, 2, 6, 7]


def test_slot_layout_buckets_by_length():
    from megatron_oreal.mcore.cpu_attention import slot_layout

    lengths = [1 + (7 * i) % 10 for i in range(24)]  # 24 slots of 1..10 positions
    length = sum(lengths)
    slots = torch.full((24, 10), length)
    start = 0
    for i, n in enumerate(lengths):
        slots[i, :n] = torch.arange(start, start + n)
        start += n
    buckets, read = slot_layout(slots, length)
    assert [(n, w) for _, n, w in buckets] == [(8, 3), (8, 7), (8, 10)]  # 3 x 8 slots, each its own width
    flat = torch.cat([g for g, _, _ in buckets])
    assert (flat[read] == torch.arange(length)).all()  # every position read back from where it was put
    assert sum(n * w for _, n, w in buckets) < 24 * 10


def out_vocab(logits):
    return logits.shape[-1]


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

    mb = pack_sequences(_batch(), [0, 1, 2, 3], pad_to_multiple=8)  # 34 tokens + 6 padding
    assert mb.tokens.shape[1] == 40 and mb.attention_mask is not None

    def run(**kw):
        model.zero_grad(set_to_none=True)
        out = model(mb.tokens, mb.position_ids, **kw)
        (out.float().pow(2).mean()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    dense, dense_g = run(attention_mask=mb.attention_mask)
    packed, packed_g = run(attention_mask=None, packed_seq_params=mb.local_packed_seq_params())
    real = int(mb.cu_seqlens[-1])
    assert out_vocab(packed) == 250 and out_vocab(dense) == 250  # TP = 1: the real rows only (LocalGPTModel)
    assert dense.abs().max() > 0.1
    assert (packed[:, :real] - dense[:, :real]).abs().max().item() <= 1e-5
    for name, g in dense_g.items():
        assert g.abs().max() > 0 or name.endswith("bias"), name
        assert (packed_g[name] - g).abs().max().item() <= 1e-6 * max(1.0, g.abs().max().item()), name


def _group_batch():
    """Two prompts with 3 and 2 samples (one sample has a one-token response)."""
    from megatron_oreal.types import TrainBatch, TrainSequence

    g = torch.Generator().manual_seed(9)
    rand = lambda n: torch.randint(1, 250, (n,), generator=g).tolist()
    a, b = rand(5), rand(3)
    return TrainBatch([TrainSequence(a, rand(r), 1.0, True) for r in (4, 1, 6)]
                      + [TrainSequence(b, rand(r), -1.0, False) for r in (2, 5)])


def test_shared_prompt_row_matches_sequences_packed_one_by_one(tmp_path, layout):
    """Same log-probs and parameter gradients whether each prompt is packed once (share_prompts) or
    once per sequence: the shared layout changes the work, not the result."""
    from megatron_oreal.checkpoint.hf_io import load_hf_weights
    from megatron_oreal.mcore.forward import response_logprobs
    from megatron_oreal.mcore.hf_config import load_hf_config
    from megatron_oreal.mcore.model import build_policy
    from megatron_oreal.mcore.packing import pack_sequences

    make_tiny_qwen2(tmp_path, seed=6)
    model = build_policy(load_hf_config(tmp_path), layout)
    load_hf_weights(model, tmp_path, layout)
    batch = _group_batch()

    def run(share):
        mb = pack_sequences(batch, list(range(5)), with_mask=False, share_prompts=share)
        model.zero_grad(set_to_none=True)
        out = model(mb.tokens, mb.position_ids, None, packed_seq_params=mb.local_packed_seq_params())
        logp = response_logprobs(out, mb, 250)
        (logp * torch.linspace(-1.0, 2.0, logp.numel())).sum().backward()
        return mb, logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    shared_mb, shared, shared_g = run(True)
    plain_mb, plain, plain_g = run(False)
    # last tokens are not fed: responses 4, 1, 6 and 2, 5 take 3, 0, 5 and 1, 4 positions
    assert shared_mb.tokens.shape[1] == 5 + 8 + 3 + 5 and plain_mb.tokens.shape[1] == 8 + 5 + 10 + 4 + 7
    assert shared.shape == plain.shape == (18,) and plain.min() < -1.0
    assert (shared - plain).abs().max().item() <= 1e-5
    for name, g in plain_g.items():
        assert (shared_g[name] - g).abs().max().item() <= 1e-5 * max(1.0, g.abs().max().item()), name


def test_bucketed_attention_matches_dense_mask(tmp_path, layout):
    """30 sequences of 2..31 tokens: three buckets of slots; logits and gradients as with the dense mask."""
    from megatron_oreal.checkpoint.hf_io import load_hf_weights
    from megatron_oreal.mcore.cpu_attention import slot_layout
    from megatron_oreal.mcore.hf_config import load_hf_config
    from megatron_oreal.mcore.model import build_policy
    from megatron_oreal.mcore.packing import pack_sequences
    from megatron_oreal.types import TrainBatch, TrainSequence

    make_tiny_qwen2(tmp_path, seed=8)
    model = build_policy(load_hf_config(tmp_path), layout)
    load_hf_weights(model, tmp_path, layout)
    g = torch.Generator().manual_seed(3)
    seqs = [TrainSequence(torch.randint(1, 250, (1 + i % 4,), generator=g).tolist(),
                          torch.randint(1, 250, (2 + (11 * i) % 29,), generator=g).tolist(), 1.0, True)
            for i in range(30)]
    mb = pack_sequences(TrainBatch(seqs), list(range(30)))
    assert len(slot_layout(mb.slots, mb.tokens.shape[1])[0]) == 3

    def run(**kw):
        model.zero_grad(set_to_none=True)
        out = model(mb.tokens, mb.position_ids, **kw)
        (out.float().pow(2).mean()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    dense, dense_g = run(attention_mask=mb.attention_mask, packed_seq_params=None)
    packed, packed_g = run(attention_mask=None, packed_seq_params=mb.local_packed_seq_params())
    assert (packed - dense).abs().max().item() <= 1e-5
    for name, grad in dense_g.items():
        assert (packed_g[name] - grad).abs().max().item() <= 1e-5 * max(1.0, grad.abs().max().item()), name
