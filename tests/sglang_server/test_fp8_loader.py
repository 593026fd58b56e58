"""The FP8 block-quantised sync payload (sync/fp8.py) against the loader code it targets in sglang 0.5.21.

An FP8 *server* cannot run on CPU (0.5.21's block-FP8 linear needs CUDA, or Intel AMX kernels of the real
sgl_kernel), so this checks the payload against what such a server loads it into: the parameters that
sglang's own Fp8LinearMethod.create_weights makes from the quantization_config our engine injects
(FP8_QUANT_CONFIG), its weight_loader, and its block_quant_dequant, run in the CPU SGLang env."""

import json
import os
import subprocess

import pytest

from helpers.sglang_cpu import REPO, sglang_python

pytestmark = pytest.mark.sglang


def test_fp8_payload_loads_into_sglang_block_fp8_parameters(tmp_path):
    import torch

    from megatron_oreal.rollout.sglang_engine import FP8_QUANT_CONFIG
    from megatron_oreal.sync.fp8 import quantize_named, scale_name

    g = torch.Generator().manual_seed(0)
    weights = {"model.layers.0.mlp.down_proj.weight": torch.randn(256, 384, generator=g).to(torch.bfloat16),
               "model.layers.0.self_attn.o_proj.weight": (torch.randn(300, 200, generator=g) * 1e-3).to(torch.bfloat16),
               "model.norm.weight": torch.randn(384, generator=g).to(torch.bfloat16)}
    sent = dict(quantize_named(list(weights.items())))
    assert sent["model.norm.weight"].dtype == torch.bfloat16 and scale_name("model.norm.weight") not in sent
    layers = {n: {"w": w, "q": sent[n], "s": sent[scale_name(n)]} for n, w in weights.items() if w.dim() == 2}
    torch.save({"config": FP8_QUANT_CONFIG, "layers": layers}, tmp_path / "in.pt")
    script = REPO / "tests" / "sglang_server" / "fp8_loader_check.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"SGLANG_USE_CPU_ENGINE": "1"}
    res = subprocess.run([sglang_python(), str(script), str(tmp_path / "in.pt"), str(tmp_path / "out.json")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["block"] == [128, 128] and out["serialized"] is True
    for name in layers:
        r = out[name]
        assert r["weight"]["sglang"] == r["weight"]["ours"] == ["torch.float8_e4m3fn", list(weights[name].shape)]
        assert r["weight_scale_inv"]["sglang"] == r["weight_scale_inv"]["ours"], name
        assert r["bitwise_loaded"] and r["within_bound"], (name, r)
