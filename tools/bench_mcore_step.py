"""Forward+backward time of a ~20M-parameter Qwen2-shaped GPTModel on this machine (world of one).

    python tools/bench_mcore_step.py [--batch 8 --seq 512 --steps 3 --threads 2]

Default config: 4 layers, hidden 512, 8 heads, 4 KV groups, ffn 1408, vocab 8192 (fp32, local spec).
The loss is the vocab-parallel CE over the unpadded vocabulary (padding masked), as in training.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from megatron.core import tensor_parallel

    from megatron_oreal.mcore.model import build_policy, mask_padded_vocab
    from megatron_oreal.mcore.parallel import destroy_parallel, init_parallel

    hf = {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 8,
          "num_key_value_heads": 4, "intermediate_size": 1408, "vocab_size": 8192, "rms_norm_eps": 1e-6,
          "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False}
    layout = init_parallel(1, 1)
    model = build_policy(hf, layout, dtype=args.dtype, from_hf_weights=False)
    n = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 8192, (args.batch, args.seq + 1))
    pos = torch.arange(args.seq).unsqueeze(0).expand(args.batch, -1)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        logits = model(ids[:, :-1], pos, None)
        loss = tensor_parallel.vocab_parallel_cross_entropy(mask_padded_vocab(logits, 8192).float(), ids[:, 1:]).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        t0 = time.perf_counter()
        model(ids[:, :-1], pos, None)
        fwd = time.perf_counter() - t0
    tokens = args.batch * args.seq
    steady = min(times[1:]) if len(times) > 1 else times[0]
    print(f"params {n / 1e6:.1f} M ({args.dtype}), B={args.batch} S={args.seq}, {args.threads} threads, "
          f"load avg {os.getloadavg()[0]:.1f}")
    print(f"fwd+bwd: first {times[0]:.2f} s, steady {steady:.2f} s ({tokens / steady:.0f} tokens/s); "
          f"fwd only {fwd:.2f} s; loss {loss.item():.4f}")
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
