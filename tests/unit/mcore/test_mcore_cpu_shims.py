"""Each CPU shim is still needed: the upstream call it serves fails without it and works with it.

Runs in a fresh subprocess (the shims patch torch process-wide). Shims are applied one at a time,
in an order where each call's other needs are already met, so a failure before a shim is applied
is that shim's failure. If an upgrade of torch or megatron-core makes a shim redundant, this test
fails and names it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

CHILD = textwrap.dedent(
    r"""
    import inspect, torch
    from megatron_oreal.mcore.cpu_shims import SHIM_NAMES, apply_cpu_shims

    def causal_mask():
        from megatron.core.transformer.utils import get_default_causal_mask
        return get_default_causal_mask(4)

    def rope_on_device():
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
        return RotaryEmbedding(16, 1.0, use_cpu_initialization=False)

    def rng_seed():
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)

    def synchronize():
        from megatron.core.pipeline_parallel import p2p_communication
        if "torch.cuda.synchronize()" not in inspect.getsource(p2p_communication):
            raise SystemExit("upstream p2p_communication no longer calls torch.cuda.synchronize()")
        torch.cuda.synchronize()

    def clip_grads():
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
        p = torch.nn.Parameter(torch.ones(3))
        p.grad = torch.ones(3)
        clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=10.0)
        assert torch.allclose(p.grad, torch.full((3,), 0.1), atol=1e-6)

    def tensor_cuda():
        from megatron.core.models.common.language_module import language_module
        if "weight.data.cuda()" not in inspect.getsource(language_module):
            raise SystemExit("upstream language_module no longer calls weight.data.cuda()")
        return torch.zeros(2).cuda()

    CALLS = {"current_device": rope_on_device, "factories": causal_mask, "rng": rng_seed,
             "synchronize": synchronize, "tensor_type": clip_grads, "tensor_cuda": tensor_cuda}
    applied = []
    for name in SHIM_NAMES:
        try:
            CALLS[name]()
            print(f"NOT-NEEDED {name}")
        except (AssertionError, RuntimeError, TypeError) as e:
            print(f"FAILS-WITHOUT {name}: {type(e).__name__}: {str(e)[:80]}")
        applied += apply_cpu_shims(skip=tuple(n for n in SHIM_NAMES if n != name))
        CALLS[name]()
        print(f"WORKS-WITH {name}")
    assert apply_cpu_shims() == [], "apply_cpu_shims must be idempotent"
    print("APPLIED", ",".join(applied))
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shims apply only without CUDA")
def test_each_cpu_shim_is_still_needed():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    out = proc.stdout
    from megatron_oreal.mcore.cpu_shims import SHIM_NAMES

    for name in SHIM_NAMES:
        assert f"FAILS-WITHOUT {name}:" in out, f"shim {name!r} looks unnecessary now:\n{out}"
        assert f"WORKS-WITH {name}" in out, out
    assert f"APPLIED {','.join(SHIM_NAMES)}" in out


def test_unknown_shim_name_is_an_error():
    from megatron_oreal.mcore.cpu_shims import apply_cpu_shims

    with pytest.raises(ValueError, match="unknown CPU shim"):
        apply_cpu_shims(skip=("typo",))
