"""A pure-torch stand-in for the two `sgl_kernel` CPU ops that SGLang 0.5.21 imports on a CPU-only machine.

Written by us for the `sglang` test tier (tools/sglang_cpu/README.md). Matches sglang 0.5.21:
  - `assign_req_to_token_pool_cpu`: srt/mem_cache/allocation.py (`assign_req_to_token_pool_func`), the CPU
    twin of the triton kernel `assign_req_to_token_pool` in the same file;
  - `copy_all_layer_kv_cache_cpu`: kernels/ops/kvcache/cache_move.py, the CPU twin of the triton kernel
    `copy_all_layer_kv_cache_tiled`.
The real package (`sglang-kernel` 0.4.7) exists on PyPI only as a CUDA build that fails to import here.
Anything else may be imported (sglang imports e.g. `build_tree_kernel_efficient_cpu` for speculative
decoding at module level) but fails loudly when called, so no code path can silently run a wrong op.
"""
from __future__ import annotations

import ctypes

import torch

__version__ = "0.0.0+megatron-oreal-cpu-standin"


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """Row r = req_pool_indices[i] gets out_cache_loc's next (end-start) slots at columns [start, end)."""
    assert req_to_token.shape[1] == pool_len
    out = 0
    for i in range(req_pool_indices.numel()):
        s, e = int(start_offset[i]), int(end_offset[i])
        req_to_token[int(req_pool_indices[i]), s:e] = out_cache_loc[out:out + e - s].to(req_to_token.dtype)
        out += e - s


def copy_all_layer_kv_cache_cpu(data_ptrs: torch.Tensor, strides: torch.Tensor,
                                tgt_loc: torch.Tensor, src_loc: torch.Tensor) -> None:
    """For every buffer b (raw address data_ptrs[b], row size strides[b] bytes): row tgt[j] := row src[j].

    All source rows are read before any is written, as the triton kernel does (safe in place)."""
    src = [int(x) for x in src_loc.tolist()]
    tgt = [int(x) for x in tgt_loc.tolist()]
    for base, stride in zip(data_ptrs.tolist(), strides.tolist()):
        base, stride = int(base), int(stride)
        rows = [ctypes.string_at(base + s * stride, stride) for s in src]
        for t, row in zip(tgt, rows):
            ctypes.memmove(base + t * stride, row, stride)


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name}: not provided by megatron-oreal's CPU stand-in "
                                  f"(tools/sglang_cpu/stubs/sgl_kernel); this SGLang code path is untested on CPU")

    missing.__name__ = name
    return missing
