"""Block-wise FP8 (e4m3) quantisation of Linear weights for an FP8 SGLang engine.

Layout: the DeepSeek-V3 / SGLang "block FP8" checkpoint format (`quantization_config:
{quant_method: fp8, weight_block_size: [128, 128]}`): for each quantised `X.weight` [r, c] the engine
receives `X.weight` as float8_e4m3fn [r, c] and `X.weight_scale_inv` as float32
[ceil(r/128), ceil(c/128)], one scale per 128x128 block, with `weight ~= q * weight_scale_inv`
(the multiplier that *dequantises*, despite the name). slime re-quantises the same way on sync
(slime/backends/megatron_utils/megatron_to_hf/processors/quantizer_fp8.py), verl too
(verl/utils/sglang/sglang_fp8_utils.py `quant_weights_by_name`, block 128x128).

Per block: scale_inv = amax(|w|) / 448 (448 = the largest finite e4m3fn), q = round(w / scale_inv).
Edge blocks of shapes not divisible by 128 are zero-padded for the amax only; the padding never
reaches q. An all-zero block gets a tiny positive scale so that 0/scale stays 0 (no NaN).

Error bound (checked by tests/unit/sync/test_fp8.py): e4m3 has 3 mantissa bits, so
round-to-nearest of a scaled value y in the normal range (|y| >= 2^-6) errs by at most half an ulp,
2^-4 |y|; below it (subnormals, spacing 2^-9) by at most 2^-10. Scaling back by s = scale_inv:
    |w - q*s| <= max(2^-4 |w|, 2^-10 s)   per element.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0
_MIN_AMAX = 1e-12  # scale floor for all-zero blocks

# HF weights that stay in high precision in block-FP8 checkpoints: embeddings and the output head
# (slime docs/en/advanced/low-precision.md: only TE Linear layers in FP8), norms (1-D anyway) and the
# MoE router gate (`mlp.gate.weight`, kept bf16 in DeepSeek/Qwen-MoE FP8 checkpoints).
SKIP_SUBSTRINGS = ("embed_tokens", "embed", "lm_head", "norm", "mlp.gate.weight")


def should_quantize(name: str, tensor: torch.Tensor) -> bool:
    """True for the 2-D `*.weight` of a Linear layer (not embeddings, lm_head, norms, router)."""
    if tensor.dim() != 2 or not name.endswith(".weight"):
        return False
    if not tensor.is_floating_point() or tensor.dtype == FP8_DTYPE:
        return False
    return not any(s in name for s in SKIP_SUBSTRINGS)


def scale_name(weight_name: str) -> str:
    """`a.b.weight` -> `a.b.weight_scale_inv` (the checkpoint key SGLang's fp8 loader expects)."""
    if not weight_name.endswith(".weight"):
        raise ValueError(f"scale_name: {weight_name!r} does not end in '.weight'")
    return weight_name + "_scale_inv"


def scale_shape(shape: tuple[int, int] | torch.Size, block: int = BLOCK) -> tuple[int, int]:
    rows, cols = shape
    return math.ceil(rows / block), math.ceil(cols / block)


def quantize_block_fp8(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [r, c] (any float dtype) -> (q float8_e4m3fn [r, c], scale_inv float32 [ceil(r/b), ceil(c/b)])."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_block_fp8: expected a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    nr, nc = scale_shape((rows, cols), block)
    w = weight.detach().float()
    padded = w.new_zeros(nr * block, nc * block)
    padded[:rows, :cols] = w
    blocks = padded.view(nr, block, nc, block)  # [block row, row in block, block col, col in block]
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(_MIN_AMAX)  # [nr, nc]
    scale_inv = amax / FP8_MAX
    scaled = blocks / scale_inv[:, None, :, None]
    # The clamp only guards fp32 rounding of amax/448*448; the cast rounds to nearest-even.
    q = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.view(nr * block, nc * block)[:rows, :cols].contiguous()
    return q, scale_inv.contiguous()


def dequantize_block_fp8(
    q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of `quantize_block_fp8` (up to the FP8 rounding): q * scale_inv per block."""
    rows, cols = q.shape
    if tuple(scale_inv.shape) != scale_shape((rows, cols), block):
        raise ValueError(
            f"dequantize_block_fp8: scale_inv shape {tuple(scale_inv.shape)} does not match "
            f"{scale_shape((rows, cols), block)} for a [{rows}, {cols}] weight in {block}x{block} blocks"
        )
    expanded = scale_inv.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (q.float() * expanded).to(dtype)


def quantize_named(
    named: Iterable[tuple[str, torch.Tensor]], block: int = BLOCK
) -> list[tuple[str, torch.Tensor]]:
    """Replace every quantisable `X.weight` by (`X.weight` fp8, `X.weight_scale_inv` fp32); other
    tensors pass through unchanged, in order."""
    out: list[tuple[str, torch.Tensor]] = []
    for name, tensor in named:
        if should_quantize(name, tensor):
            q, s = quantize_block_fp8(tensor, block)
            out.append((name, q))
            out.append((scale_name(name), s))
        else:
            out.append((name, tensor))
    return out
