"""lean_forward.py (the CPU path's forward at TP = PP = 1) against Megatron's forward on the same weights.

- Each autograd Function's hand-written backward passes torch.autograd.gradcheck in float64.
- On a row of shared prompts in three length buckets: the logits and every parameter gradient equal
  those of Megatron's layers (with PackedLocalAttention), for Qwen2 (q/k/v biases, GQA), Llama with
  tied embeddings and Llama-3 RoPE scaling, and the token RM's score head; with the native kernels
  (megatron_oreal.native, whenever they build) and, for Qwen2, also without them.
"""

from __future__ import annotations

import pytest
import torch

from helpers.layout import single_rank_layout
from helpers.tiny_hf import make_tiny_llama, make_tiny_qwen2


@pytest.fixture(scope="module")
def layout():
    with single_rank_layout(seed=13) as lay:
        yield lay


def _grouped_batch(vocab: int = 250):
    """18 prompts x 2 samples, prompts of 1-6 tokens, responses of 1-23: three buckets of slots."""
    from megatron_oreal.types import TrainBatch, TrainSequence

    g = torch.Generator().manual_seed(21)
    rand = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()
    seqs = []
    for i in range(18):
        prompt = rand(1 + i % 6)
        seqs += [TrainSequence(prompt, rand(1 + (7 * i + 3 * j) % 23), 1.0 - 2 * j, j == 0) for j in range(2)]
    return TrainBatch(seqs)


def _row(batch):
    from megatron_oreal.mcore.cpu_attention import slot_layout
    from megatron_oreal.mcore.packing import pack_sequences

    mb = pack_sequences(batch, list(range(len(batch.sequences))), share_prompts=True)
    assert mb.shares_prompts and len(slot_layout(mb.slots, mb.tokens.shape[1])[0]) == 3
    return mb


def test_functions_backward_pass_gradcheck():
    from megatron_oreal.mcore.cpu_attention import slot_layout
    from megatron_oreal.mcore.lean_forward import _RMSNorm, _SlotAttention, _SwiGLU, rope_tables, slot_index

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNorm.apply(x, w, 1e-6), (rnd(5, 8), rnd(8)))
    assert torch.autograd.gradcheck(_SwiGLU.apply, (rnd(5, 12),))

    # 4 sequences over 9 row positions, a 2-token prompt shared by two of them; 2 groups x 2 heads, dim 4
    slots = torch.tensor([[0, 1, 2, 3], [0, 1, 4, 9], [5, 6, 9, 9], [7, 8, 9, 9]])
    index = slot_index(slot_layout(slots, 9, max_buckets=2), 9, 2, 2)
    positions = torch.tensor([0, 1, 2, 3, 2, 0, 1, 0, 1], dtype=torch.float64)
    angles = positions[:, None] * torch.tensor([1.0, 0.1], dtype=torch.float64)[None]
    tables = rope_tables(angles.cos(), angles.sin(), 2, 2)
    qkv = rnd(9, 2 * 4 * 4)
    assert torch.autograd.gradcheck(lambda t: _SlotAttention.apply(t, tables, index, 2, 2, 4, 0.5), (qkv,))


def test_slot_attention_matches_sdpa_per_sequence():
    """Each sequence's output equals causal SDPA over that sequence alone, after the same rotation."""
    from megatron_oreal.mcore.cpu_attention import slot_layout
    from megatron_oreal.mcore.lean_forward import _SlotAttention, rope_tables, slot_index

    g = torch.Generator().manual_seed(1)
    slots = torch.tensor([[0, 1, 2, 3], [0, 1, 4, 7], [5, 6, 7, 7]])
    positions = torch.tensor([0, 1, 2, 3, 2, 0, 1])
    angles = positions[:, None].float() * torch.tensor([1.0, 0.3, 0.01])[None]
    cos, sin = angles.cos(), angles.sin()
    qkv = torch.randn(7, 1 * (3 + 2) * 6, generator=g)  # 1 group of 3 query heads, head dim 6
    index = slot_index(slot_layout(slots, 7), 7, 1, 3)
    out = _SlotAttention.apply(qkv, rope_tables(cos, sin, 1, 3), index, 1, 3, 6, 0.4)
    t = qkv.view(7, 1, 5, 6)
    # HF's rotate-half RoPE, written out: x * cos + rotate_half(x) * sin, cos/sin repeated over both halves
    c, s_ = (torch.cat([a.view(7, 1, 1, 3)] * 2, -1) for a in (cos, sin))
    x = t[:, :, :4]
    qk = x * c + torch.cat([-x[..., 3:], x[..., :3]], -1) * s_
    for slot in ([0, 1, 2, 3], [0, 1, 4], [5, 6]):
        q = qk[slot, 0, :3].transpose(0, 1)  # [3 heads, len, 6]
        k, v = qk[slot, 0, 3][None], t[slot, 0, 4][None]
        want = torch.nn.functional.scaled_dot_product_attention(q, k.expand(3, -1, -1), v.expand(3, -1, -1),
                                                                is_causal=True, scale=0.4)
        got = out[slot].view(len(slot), 3, 6).transpose(0, 1)
        # a shared prompt's rows (0, 1) are read from the first slot; its later positions are its own
        rows = slice(None) if slot[0] != 0 or len(slot) == 4 else slice(2, None)
        assert (got[:, rows] - want[:, rows]).abs().max().item() <= 1e-6, slot


def _compare(model, mb, loss=lambda out: out.float().pow(2).mean()):
    def run(lean):
        model.lean = lean
        model.zero_grad(set_to_none=True)
        out = model(mb.tokens, mb.position_ids, None, packed_seq_params=mb.local_packed_seq_params())
        loss(out).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    meg, meg_g = run(False)
    lean, lean_g = run(True)
    assert lean.shape == meg.shape and meg.abs().max() > 0.05
    assert (lean - meg).abs().max().item() <= 2e-5
    assert set(lean_g) == set(meg_g) and len(meg_g) > 10
    for name, grad in meg_g.items():
        assert (lean_g[name] - grad).abs().max().item() <= 2e-5 * max(1.0, grad.abs().max().item()), name


@pytest.mark.parametrize("arch", ["qwen2", "llama_tied", "qwen2_no_native_kernels"])
def test_lean_forward_matches_megatron_logits_and_grads(tmp_path, layout, arch, monkeypatch):
    from megatron_oreal.checkpoint.hf_io import load_hf_weights
    from megatron_oreal.mcore.hf_config import load_hf_config
    from megatron_oreal.mcore.model import build_policy

    if arch.startswith("qwen2"):
        make_tiny_qwen2(tmp_path, seed=3, layers=3)
    else:
        make_tiny_llama(tmp_path, seed=3, tie=True, heads=4, kv_heads=1)
        cfg = load_hf_config(tmp_path)
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = build_policy(cfg if not arch.startswith("qwen2") else load_hf_config(tmp_path), layout)
    load_hf_weights(model, tmp_path, layout)
    assert model.lean_off_reason() is None
    if arch.endswith("no_native_kernels"):  # the PyTorch code a machine without a C compiler runs
        from megatron_oreal import native

        monkeypatch.setattr(native, "_loaded", [None])
    _compare(model, _row(_grouped_batch()))


def test_lean_forward_token_rm_scores_and_grads(tmp_path, layout):
    from megatron_oreal.checkpoint.hf_io import load_hf_weights
    from megatron_oreal.mcore.hf_config import load_hf_config
    from megatron_oreal.mcore.model import build_token_rm

    make_tiny_qwen2(tmp_path, seed=5)
    rm = build_token_rm(load_hf_config(tmp_path), layout)
    load_hf_weights(rm, tmp_path, layout)
    with torch.no_grad():  # the head starts at zero (every score 0): give it weights to compare
        head = rm.output_layer.weight
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(2)))
    mb = _row(_grouped_batch())
    _compare(rm, mb, loss=lambda out: (out[..., 0] * torch.linspace(-1, 1, out.shape[1])).sum())


def test_unsupported_models_keep_megatrons_forward(tmp_path, layout):
    from megatron_oreal.mcore.hf_config import load_hf_config
    from megatron_oreal.mcore.model import build_policy

    make_tiny_qwen2(tmp_path, seed=1)
    recompute = build_policy(load_hf_config(tmp_path), layout, recompute_granularity="full",
                             recompute_method="uniform", recompute_num_layers=1)
    assert "recompute" in recompute.lean_off_reason()
    model = build_policy(load_hf_config(tmp_path), layout)
    model.lean = False
    assert model.lean_off_reason() == "lean = False"
