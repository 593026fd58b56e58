"""Weight-sync throughput on CPU, next to a plain memory copy of the same bytes.

    python tools/bench_sync.py                       # ~100M-param Qwen2-shaped dict, in-process
    torchrun --nproc_per_node 2 tools/bench_sync.py --tp 2   # Megatron TP=2 model -> gather -> sync

The first mode times the sync layer alone (rebucket -> flatten -> engine copy; optionally FP8).
The second builds the same model as a Megatron GPTModel at TP=2 and times the whole path the
trainer runs: checkpoint.gather.iter_hf_tensors (TP all-gather + HF layout) -> sync_weights ->
an in-process engine (copy into preallocated tensors, as the CPU engine's update_weights does).
The baseline is `torch` copying the same bytes: once as one contiguous block, once per tensor.
"""

from __future__ import annotations

import argparse
import time

import torch

# Qwen2-shaped, ~98M parameters with tied embeddings (25.2M embedding + 12 x 6.1M layers).
CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 768, "intermediate_size": 2048,
    "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 32768,
    "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "hidden_act": "silu",
}


def hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h), p + "mlp.down_proj.weight": (h, f),
        })
    return shapes


class CopyEngine:
    """Holds preallocated weights and copies into them, like CPUEngine.update_weights."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> None:
        self.weights = {n: torch.empty(s, dtype=dtype) for n, s in shapes.items()}

    def update_weights(self, named) -> None:
        for name, t in named:
            dst = self.weights.get(name)
            if dst is None or dst.dtype != t.dtype or dst.shape != t.shape:  # FP8 weights and scales
                self.weights[name] = dst = torch.empty(t.shape, dtype=t.dtype)
            dst.copy_(t)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def baselines(tensors: dict[str, torch.Tensor], repeats: int) -> list[tuple[str, float]]:
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    flat_src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    flat_dst = torch.empty_like(flat_src)
    dsts = {n: torch.empty_like(t) for n, t in tensors.items()}
    one = best_of(lambda: flat_dst.copy_(flat_src), repeats)
    per = best_of(lambda: [dsts[n].copy_(t) for n, t in tensors.items()], repeats)
    return [("torch copy, one block", one), ("torch copy, per tensor", per)]


def report(rows: list[tuple[str, float]], nbytes: int, header: str) -> None:
    print(header)
    for name, secs in rows:
        print(f"  {name:<44s} {secs * 1e3:9.1f} ms  {nbytes / secs / 1e9:7.2f} GB/s")


def bench_local(args) -> None:
    from megatron_oreal.sync import InProcessTransport, sync_weights

    torch.manual_seed(0)
    shapes = hf_shapes(CONFIG)
    tensors = {n: torch.randn(s).to(torch.bfloat16) for n, s in shapes.items()}
    params = sum(t.numel() for t in tensors.values())
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    bucket = args.bucket_mb << 20
    rows = baselines(tensors, args.repeats)
    for label, kw, flat in (("sync_weights, flattened buckets", {}, True),
                            ("sync_weights, no staging copy (flat=False)", {}, False),
                            ("sync_weights, FP8 block quantise + flatten", {"fp8": True}, True)):
        engine = CopyEngine(shapes, torch.bfloat16)
        run = lambda: sync_weights(tensors.items(), InProcessTransport(engine, flat=flat), bucket_bytes=bucket, **kw)
        rows.append((label, best_of(run, args.repeats)))
    m = sync_weights(tensors.items(), InProcessTransport(CopyEngine(shapes, torch.bfloat16)), bucket_bytes=bucket)
    report(rows, nbytes, f"{params / 1e6:.1f}M params, {nbytes / 1e6:.1f} MB bf16, {m.buckets} buffers of "
                         f"<= {args.bucket_mb} MB, {torch.get_num_threads()} threads, best of {args.repeats} "
                         f"(GB/s = bf16 source bytes / time)")


def bench_tp(args) -> None:
    import torch.distributed as dist

    from megatron_oreal.checkpoint.gather import iter_hf_tensors
    from megatron_oreal.mcore import parallel
    from megatron_oreal.mcore.model import build_policy
    from megatron_oreal.sync import InProcessTransport, sync_weights

    layout = parallel.init_parallel(tp=args.tp, pp=1)
    model = build_policy(CONFIG, layout, dtype="bf16", from_hf_weights=False)
    bucket = args.bucket_mb << 20
    dst = layout.tp_rank == 0
    shapes = hf_shapes(CONFIG)
    engine = CopyEngine(shapes, torch.bfloat16) if dst else None

    def gather_only():
        for b in iter_hf_tensors(model, layout, bucket_bytes=bucket):
            pass

    def full_sync():
        source = iter_hf_tensors(model, layout, bucket_bytes=bucket)
        if not dst:
            for _ in source:
                pass
            return
        sync_weights(source, InProcessTransport(engine), bucket_bytes=bucket)

    rows = []
    for label, fn in (("gather only (TP all-gather + HF layout)", gather_only), ("gather + sync_weights", full_sync)):
        dist.barrier()
        rows.append((label, best_of(lambda: (fn(), dist.barrier()), args.repeats)))
    if dst:
        got = {n: tuple(t.shape) for n, t in engine.weights.items()}
        if got != shapes:
            raise SystemExit(f"gather delivered other HF names/shapes than expected: {sorted(set(got) ^ set(shapes))[:5]}")
        tensors = {n: t.clone() for n, t in engine.weights.items()}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        params = sum(t.numel() for t in tensors.values())
        report(baselines(tensors, args.repeats) + rows, nbytes,
               f"Megatron TP={args.tp} on CPU/gloo, {params / 1e6:.1f}M params, {nbytes / 1e6:.1f} MB bf16, "
               f"buckets of <= {args.bucket_mb} MB, best of {args.repeats}")
    parallel.destroy_parallel()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=0, help="run under torchrun at this TP size (0 = in-process dict)")
    ap.add_argument("--bucket-mb", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    bench_tp(args) if args.tp else bench_local(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
