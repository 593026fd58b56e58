"""Run by the CPU SGLang env's python (tests/sglang_server/test_fp8_loader.py): load our block-FP8 sync payload into
the parameters sglang 0.5.21's own Fp8LinearMethod creates for a block-quantised Linear (the layer an FP8
server loads synced weights into), then dequantise with sglang's block_quant_dequant.

argv: IN.pt OUT.json. IN.pt: {"config": quantization_config, "layers": {name: {"w": bf16 original,
"q": our float8 weight, "s": our weight_scale_inv}}}. Writes per layer what the test asserts.
"""

import json
import sys

import torch
from sglang.srt.layers.quantization.fp8 import Fp8Config, Fp8LinearMethod
from sglang.srt.layers.quantization.fp8_utils import block_quant_dequant
from sglang.srt.model_loader.weight_utils import default_weight_loader


def main():
    data = torch.load(sys.argv[1])
    cfg = Fp8Config.from_config(data["config"])  # what the server parses from the injected quantization_config
    method = Fp8LinearMethod(cfg)
    out = {"block": list(cfg.weight_block_size), "serialized": cfg.is_checkpoint_fp8_serialized}
    for name, t in data["layers"].items():
        n, k = t["w"].shape
        layer = torch.nn.Module()
        # skip_block_quant_check: its checks (fp8.py:568-592) concern TP>1 or merged partitions and read the
        # server's published parallel config, absent outside a server; this is one TP=1 partition.
        method.create_weights(layer, k, [n], k, n, torch.bfloat16, skip_block_quant_check=True,
                              weight_loader=default_weight_loader)
        r = {}
        for pname, ours in (("weight", t["q"]), ("weight_scale_inv", t["s"])):
            p = getattr(layer, pname)
            r[pname] = {"sglang": [str(p.dtype), list(p.shape)], "ours": [str(ours.dtype), list(ours.shape)]}
            p.weight_loader(p, ours)
        deq = block_quant_dequant(layer.weight.data, layer.weight_scale_inv.data, cfg.weight_block_size,
                                  torch.float32)
        w = t["w"].float()
        s_full = t["s"].repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
        bound = torch.maximum(w.abs() * 2.0**-4, s_full * 2.0**-10)  # sync/fp8.py's error bound
        r["within_bound"] = bool(((deq - w).abs() <= bound * (1 + 1e-6)).all())
        r["max_rel_err"] = float(((deq - w).abs() / w.abs().clamp_min(1e-12)).max())
        r["bitwise_loaded"] = bool(torch.equal(layer.weight.data.view(torch.uint8), t["q"].view(torch.uint8))
                                   and torch.equal(layer.weight_scale_inv.data, t["s"]))
        out[name] = r
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
