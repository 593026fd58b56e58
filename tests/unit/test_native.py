"""megatron_oreal.native: the C kernels against the PyTorch code they replace, and the fallbacks.

- Each kernel (RMSNorm, SwiGLU, RoPE rotation, slot attention forward and backward, decode attention)
  gives the PyTorch path's values and gradients to float round-off, on shapes with GQA and a shared
  prompt; the reductions are deterministic (the same bits on a second run).
- The lean forward (Megatron parity, tests/unit/mcore/test_lean_forward.py) and the lean decode
  (tests/unit/rollout/test_lean_decode.py) run on the kernels whenever they load; here the same
  engine with and without them gives the same greedy tokens.
- No compiler, MEGATRON_OREAL_NATIVE=0 or a failing build: kernels() is None, the reason is logged,
  nothing else changes.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from megatron_oreal import native

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on PATH")


@pytest.fixture
def kernels():
    native.reset()
    lib = native.kernels()
    assert lib is not None, "cc is on PATH, so the kernels must build (see the log for the compiler's message)"
    yield lib
    native.reset()


class _Torch:
    """Within the block every caller takes its PyTorch code (native.kernels() is None)."""

    def __enter__(self):
        self.saved = list(native._loaded)
        native._loaded[:] = [None]

    def __exit__(self, *exc):
        native._loaded[:] = self.saved


def _fwd_bwd(fn, inputs, grad):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad)
    return out.detach(), [t.grad for t in inputs]


def _close(a, b, tol=2e-5):
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= tol * scale, (a - b).abs().max().item()


@needs_cc
def test_rms_norm_and_swiglu_match_torch_and_are_deterministic(kernels):
    from megatron_oreal.mcore.lean_forward import _RMSNorm, _SwiGLU

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(300, 96, generator=g), torch.randn(96, generator=g)
    fc1 = torch.randn(300, 2 * 80, generator=g) * 4  # silu's tails and its middle
    for fn, inputs, grad_shape in ((lambda a, b: _RMSNorm.apply(a, b, 1e-6), (x, w), x.shape),
                                   (_SwiGLU.apply, (fc1,), (300, 80))):
        grad = torch.randn(grad_shape, generator=g)
        out, grads = _fwd_bwd(fn, inputs, grad)
        with _Torch():
            want, want_grads = _fwd_bwd(fn, inputs, grad)
        _close(out, want)
        for a, b in zip(grads, want_grads):
            _close(a, b)
        again, grads2 = _fwd_bwd(fn, inputs, grad)
        assert torch.equal(again, out) and all(torch.equal(a, b) for a, b in zip(grads, grads2))


def _shared_prompt_row():
    """A packed row of two prompts with three and two responses (shared prompts), plus RoPE tables."""
    from megatron_oreal.mcore.lean_forward import rope_tables
    from megatron_oreal.mcore.packing import pack_sequences
    from megatron_oreal.types import TrainBatch, TrainSequence

    g = torch.Generator().manual_seed(4)
    rand = lambda n: torch.randint(1, 50, (n,), generator=g).tolist()
    seqs = []
    for prompt_len, resp_lens in ((5, (3, 9, 1)), (2, (20, 4))):
        prompt = rand(prompt_len)
        seqs += [TrainSequence(prompt, rand(n + 1), 1.0, True) for n in resp_lens]
    mb = pack_sequences(TrainBatch(seqs), list(range(len(seqs))), share_prompts=True)
    assert mb.shares_prompts
    head_dim = 8
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = mb.position_ids[0].float()[:, None] * inv_freq
    return mb, rope_tables(angles.cos(), angles.sin(), 2, 3), head_dim


@needs_cc
def test_slot_attention_matches_the_torch_path_with_shared_prompts(kernels):
    from megatron_oreal.mcore.cpu_attention import slot_layout
    from megatron_oreal.mcore.lean_forward import _NativeSlotAttention, _SlotAttention, native_slot_plan, slot_index

    mb, tables, d = _shared_prompt_row()
    n = mb.tokens.shape[1]
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(n, 2 * (3 + 2) * d, generator=g)
    grad = torch.randn(n, 2 * 3 * d, generator=g)
    plan = native_slot_plan(mb.slots, mb.cu_seqlens, n)
    index = slot_index(slot_layout(mb.slots, n), n, 2, 3)
    out, (dqkv,) = _fwd_bwd(lambda t: _NativeSlotAttention.apply(t, tables, plan, 2, 3, d, 0.35), [qkv], grad)
    with _Torch():
        want, (want_d,) = _fwd_bwd(lambda t: _SlotAttention.apply(t, tables, index, 2, 3, d, 0.35), [qkv], grad)
    _close(out, want, 1e-5)
    _close(dqkv, want_d, 1e-5)
    again, (dqkv2,) = _fwd_bwd(lambda t: _NativeSlotAttention.apply(t, tables, plan, 2, 3, d, 0.35), [qkv], grad)
    assert torch.equal(again, out) and torch.equal(dqkv2, dqkv)


def test_slot_plan_owners_and_segments():
    from megatron_oreal.mcore.lean_forward import native_slot_plan

    mb, _, _ = _shared_prompt_row()
    n = mb.tokens.shape[1]
    slots, lens, owner, segs = native_slot_plan(mb.slots, mb.cu_seqlens, n)
    assert segs.tolist() == [0, 3, 5]  # two prompts: slots 0-2 and 3-4
    assert lens.tolist() == [5 + 3, 5 + 9, 5 + 1, 2 + 20, 2 + 4]
    owned = slots[owner.bool()].sort().values
    assert owned.tolist() == list(range(n))  # every position computed exactly once
    assert owner[1, :5].sum() == 0 and owner[0, :5].all()  # the prompt by its first slot
    bad = mb.slots.clone()
    bad[0, 1] = mb.cu_seqlens[1]  # a position of the second prompt's segment
    with pytest.raises(ValueError, match="spans two segments"):
        native_slot_plan(bad, mb.cu_seqlens, n)


@needs_cc
def test_decode_attention_matches_torch_and_writes_the_cache(kernels):
    from megatron_oreal.rollout.cpu_engine import _PreallocLayer
    from megatron_oreal.rollout.lean_decode import LeanDecoder

    b, hq, hkv, d, cap, filled = 5, 4, 2, 16, 12, 7
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(b, (hq + 2 * hkv) * d, generator=g)
    cos, sin = torch.randn(b, hq + hkv, d, generator=g), torch.randn(b, hq + hkv, d, generator=g)
    mask = torch.zeros(b, 1, 1, cap)
    mask[1, ..., :3] = float("-inf")  # a left-padded row

    def cache():
        layer = _PreallocLayer(cap)
        layer.update(torch.randn(b, hkv, filled, d, generator=torch.Generator().manual_seed(9)),
                     torch.randn(b, hkv, filled, d, generator=torch.Generator().manual_seed(10)))
        return layer

    dec = LeanDecoder.__new__(LeanDecoder)  # only the shapes are read by the attention step
    dec.head_dim, dec.q_heads, dec.kv_heads, dec._scratch = d, hq, hkv, None
    a, b_ = cache(), cache()
    for key_mask in (mask, None):
        got = dec._attend_native(kernels, qkv, cos, sin, a, key_mask)
        want = dec._attend(qkv, cos, sin, b_, key_mask)
        _close(got, want, 1e-5)
        assert a.length == b_.length
        _close(a._kt[..., : a.length], b_._kt[..., : b_.length], 1e-6)
        assert torch.equal(a._v[:, :, : a.length], b_._v[:, :, : b_.length])


@needs_cc
def test_engine_greedy_tokens_equal_with_and_without_kernels(kernels, tmp_path):
    from transformers import AutoModelForCausalLM

    from helpers.tiny_hf import make_tiny_qwen2
    from megatron_oreal.rollout.cpu_engine import CPUEngine
    from megatron_oreal.rollout.engine import SamplingParams

    make_tiny_qwen2(tmp_path, vocab_size=48, hidden=64, layers=2, heads=4, kv_heads=2, tie=False, seed=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompts = [[5, 9, 11], [7, 3, 20, 31, 8, 2], [40]]
    sp = SamplingParams.greedy_eval(16, ())
    engine = CPUEngine(model, threads=1)
    assert engine.lean is not None and engine.lean._native is kernels
    with_kernels = [o[0].token_ids for o in engine.generate(prompts, sp)]
    engine.lean._native = None
    without = [o[0].token_ids for o in engine.generate(prompts, sp)]
    assert with_kernels == without and len({tuple(t) for t in with_kernels}) == 3


def test_off_switch_missing_compiler_and_failed_build(monkeypatch, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="megatron_oreal.native")
    monkeypatch.setenv("MEGATRON_OREAL_CACHE", str(tmp_path))
    try:
        native.reset()
        monkeypatch.setenv("MEGATRON_OREAL_NATIVE", "0")
        assert native.kernels() is None and "MEGATRON_OREAL_NATIVE=0" in caplog.text

        native.reset()
        monkeypatch.delenv("MEGATRON_OREAL_NATIVE")
        monkeypatch.setenv("CC", "no-such-compiler-here")
        assert native.kernels() is None and "no C compiler" in caplog.text

        if shutil.which("cc") is not None:
            native.reset()
            monkeypatch.setenv("CC", "cc")
            broken = tmp_path / "broken.c"
            broken.write_text("this is not C\n")
            monkeypatch.setattr(native, "SOURCE", broken)
            assert native.kernels() is None and "broken.c failed" in caplog.text
            assert not list((tmp_path / "native").glob("*.so*"))  # nothing half-written left behind
    finally:
        native.reset()


@needs_cc
def test_build_is_cached_by_key(tmp_path):
    cc = shutil.which("cc")
    first = native.build(cc, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(cc, tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert first.name.startswith("cpu_kernels-") and first.suffix == ".so"
