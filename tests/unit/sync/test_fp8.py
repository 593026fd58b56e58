"""Block FP8 (e4m3, 128x128): scale layout, the derived per-element error bound, edge blocks."""

import math

import pytest
import torch

from megatron_oreal.sync.fp8 import (FP8_MAX, dequantize_block_fp8, quantize_block_fp8, quantize_named,
                                     scale_name, should_quantize)


def _bound(w, s_full):
    # |w - q*s| <= max(2^-4 |w|, 2^-10 s): half an ulp of e4m3 (3 mantissa bits) for normals,
    # half the subnormal spacing 2^-9 below 2^-6 (sync/fp8.py docstring). 1e-6 covers the fp32 divide.
    return torch.maximum(w.abs() * 2.0**-4, s_full * 2.0**-10) * (1 + 1e-6)


def _expand(s, rows, cols):
    return s.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (1, 129), (127, 5)])
def test_scale_shape_and_error_bound(shape):
    rows, cols = shape
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    # a wide dynamic range inside blocks, so both the normal and the subnormal branch are exercised
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-4, 1, cols)[None, :]
    q, s = quantize_block_fp8(w.to(torch.bfloat16))
    w = w.to(torch.bfloat16).float()
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and tuple(s.shape) == (math.ceil(rows / 128), math.ceil(cols / 128))
    deq = dequantize_block_fp8(q, s)
    err = (deq - w).abs()
    assert bool((err <= _bound(w, _expand(s, rows, cols))).all()), float((err / _bound(w, _expand(s, rows, cols))).max())
    # the bound is tight-ish: rounding (not truncation, which would reach 2^-3) uses most of it
    rel = (err / w.abs().clamp_min(1e-30))[w.abs() > 64 * _expand(s, rows, cols) * 2.0**-6]
    assert 2.0**-5 < float(rel.max()) <= 2.0**-4 * (1 + 1e-6)


def test_each_block_scale_is_its_amax_over_448():
    w = torch.zeros(200, 130)
    w[5, 7] = -3.0      # block (0, 0)
    w[150, 2] = 0.5     # block (1, 0)
    w[199, 129] = 44.8  # block (1, 1), the ragged corner
    q, s = quantize_block_fp8(w)
    assert torch.allclose(s, torch.tensor([[3.0 / 448, 1e-12 / 448], [0.5 / 448, 44.8 / 448]]))
    # the block maximum lands exactly on +-448 and dequantises exactly
    assert q[5, 7].float().item() == -FP8_MAX and q[199, 129].float().item() == FP8_MAX
    deq = dequantize_block_fp8(q, s)
    assert deq[5, 7].item() == pytest.approx(-3.0, rel=1e-6) and deq[150, 2].item() == pytest.approx(0.5, rel=1e-6)
    # an all-zero block stays exactly zero (no NaN from 0/0)
    assert torch.equal(deq[:128, 128:], torch.zeros(128, 2))


def test_which_tensors_are_quantized_and_naming():
    h = 256
    named = [
        ("model.embed_tokens.weight", torch.randn(512, h)),
        ("model.layers.0.input_layernorm.weight", torch.randn(h)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(h, h)),
        ("model.layers.0.self_attn.q_proj.bias", torch.randn(h)),
        ("model.layers.0.mlp.down_proj.weight", torch.randn(h, 300)),
        ("model.norm.weight", torch.randn(h)),
        ("lm_head.weight", torch.randn(512, h)),
    ]
    out = quantize_named(named)
    names = [n for n, _ in out]
    assert names == [
        "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight_scale_inv",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight_scale_inv",
        "model.norm.weight", "lm_head.weight",
    ]
    d = dict(out)
    assert d["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert tuple(d["model.layers.0.mlp.down_proj.weight_scale_inv"].shape) == (2, 3)
    assert d["lm_head.weight"] is named[-1][1] and d["model.embed_tokens.weight"].dtype == torch.float32
    assert not should_quantize("model.layers.0.mlp.gate.weight", torch.randn(8, h))  # MoE router
    with pytest.raises(ValueError, match="'x.bias' does not end in '.weight'"):
        scale_name("x.bias")
    with pytest.raises(ValueError, match="scale_inv shape \\(1, 1\\) does not match \\(2, 3\\)"):
        dequantize_block_fp8(d["model.layers.0.mlp.down_proj.weight"], torch.ones(1, 1))


def test_sglang_dequantizes_our_layout_the_same_way():
    pytest.importorskip("sglang")
    try:
        from sglang.srt.layers.quantization.fp8_utils import block_quant_dequant
    except Exception as exc:  # pragma: no cover - depends on the local sglang install
        pytest.skip(f"sglang installed but fp8_utils does not import here: {exc}")
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(5)) * torch.linspace(0.01, 3, 200)
    q, s = quantize_block_fp8(w)
    # SGLang's loader reads weight_scale_inv as [row blocks, col blocks] multipliers, as we write it
    assert torch.equal(block_quant_dequant(q, s, [128, 128], torch.float32), dequantize_block_fp8(q, s))
