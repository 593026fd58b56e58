"""Speed of the CPU engine on the embedded default's shape (not collected by pytest; run by hand):

    python tests/unit/rollout/bench_cpu_engine.py [--threads 2] [--hf-forward] [--step-table] [--hf-generate] [--model DIR]

32 prompts x 8 samples x 30 new tokens from the 0.6M-param 4-layer Qwen2 of the tiny task
(tiny_task_calibration.md §2). A random model rarely emits the stop token, so every row runs the
full 30 tokens: the worst case. Prints wall and process CPU seconds per call (median of 5).
--model examples/tiny/model --prompts 16 --new 32 is tools/bench_vs_trl.py's rollout shape (its
trained-from-here model stops early, so rows drop out and per-step overhead weighs more).
--hf-forward also times the engine with lean=False (every decode step an HF forward), interleaved
with the lean engine call by call, so the ratio holds on a loaded machine. --step-table prints one
decode step's milliseconds (lean vs HF forward, same run) at batch 1 (pure overhead) to 256 rows.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ for helpers

from helpers.tiny_hf import make_tiny_qwen2  # noqa: E402

from megatron_oreal.data.char_tokenizer import build_tokenizer  # noqa: E402
from megatron_oreal.data.templates import apply_template  # noqa: E402
from megatron_oreal.rollout.cpu_engine import CPUEngine  # noqa: E402
from megatron_oreal.rollout.engine import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--new", type=int, default=30)
    ap.add_argument("--model", default="", help="an HF folder with its tokenizer instead of the random tiny model")
    ap.add_argument("--hf-forward", action="store_true", help="also time the engine's HF-forward decode (lean=False), A/B")
    ap.add_argument("--step-table", action="store_true", help="ms per decode step, lean vs HF forward, by batch rows")
    ap.add_argument("--hf-generate", action="store_true", help="also time transformers' generate on the same work")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        from transformers import AutoTokenizer

        out, tok = Path(args.model), AutoTokenizer.from_pretrained(args.model)
    else:
        tok = build_tokenizer()
        out = Path("/tmp/bench_cpu_engine_model")
        make_tiny_qwen2(out, vocab_size=len(tok), hidden=128, layers=4, heads=4, kv_heads=2, ffn=256, tie=True)
    engines = {"lean": CPUEngine(out, tok)}
    if args.hf_forward:
        engines["hf-forward"] = CPUEngine(out, tok, lean=False)
    engine = engines["lean"]
    params = sum(p.numel() for p in engine.model.parameters())
    rng = torch.Generator().manual_seed(0)
    qs = [f"Compute {int(torch.randint(10, 99, (1,), generator=rng))}+{int(torch.randint(1, 9, (1,), generator=rng))}"
          f"*{int(torch.randint(1, 9, (1,), generator=rng))}.\n" for _ in range(args.prompts)]
    prompts = [apply_template(tok, q, "none") for q in qs]
    sp = SamplingParams(n=args.n, temperature=1.0, max_new_tokens=args.new, stop_token_ids=(tok.eos_token_id,), seed=0)
    for e in engines.values():
        e.generate(prompts, sp)  # warm-up
    walls = {k: [] for k in engines}
    cpus = {k: [] for k in engines}
    tokens = {}
    for i in range(5):
        for name, e in engines.items():  # interleaved: load changes hit both alike
            t, c = time.perf_counter(), time.process_time()
            outs = e.generate(prompts, sp.with_seed(i))
            walls[name].append(time.perf_counter() - t)
            cpus[name].append(time.process_time() - c)
            tokens[name] = [o.token_ids for group in outs for o in group]
    for name in engines:
        print(f"CPUEngine ({name}): {params} params, {args.prompts}x{args.n} samples, "
              f"{sum(map(len, tokens[name]))} new tokens, {args.threads} threads: "
              f"wall {statistics.median(walls[name]):.3f} s (min {min(walls[name]):.3f}), cpu {statistics.median(cpus[name]):.3f} s")
    if args.hf_forward:
        same = tokens["lean"] == tokens["hf-forward"]
        print(f"lean / hf-forward wall (median): {statistics.median(walls['lean']) / statistics.median(walls['hf-forward']):.2f}; "
              f"same tokens: {same}")
    if args.step_table:
        step_table(engines["lean"], CPUEngine(out, tok, lean=False))
    if args.hf_generate:
        model = engine.model.__class__.from_pretrained(out, dtype=torch.float32).eval()
        tok.padding_side = "left"
        batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
        t = time.perf_counter()
        model.generate(**batch, do_sample=True, num_return_sequences=args.n, max_new_tokens=args.new, min_new_tokens=args.new,
                       top_k=0, pad_token_id=tok.pad_token_id)
        print(f"transformers generate, same work: wall {time.perf_counter() - t:.3f} s")


def _step_ms(engine: CPUEngine, rows: int, steps: int = 20, prompt_len: int = 20) -> float:
    """Best-of-3 mean milliseconds of one decode step over `steps` steps after a prefill of `rows` prompts."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, engine.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(rows)]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            cache, logits, key_mask = engine._prefill(prompts, 1, steps + 1)
            if engine.lean is not None:
                engine.lean.prepare(prompt_len + steps + 1)
            token, pos = logits.argmax(-1), torch.full((rows,), prompt_len)
            t = time.perf_counter()
            for s in range(steps):
                if engine.lean is not None:
                    logits = engine.lean.step(token, pos, cache.layers, key_mask)
                else:
                    logits = engine.model(input_ids=token[:, None], attention_mask=key_mask[..., : prompt_len + s + 1],
                                          position_ids=pos[:, None], past_key_values=cache, use_cache=True,
                                          logits_to_keep=1).logits[:, -1]
                pos = pos + 1
            best = min(best, (time.perf_counter() - t) / steps * 1e3)
    return best


def step_table(lean: CPUEngine, hf: CPUEngine) -> None:
    for rows in (1, 16, 64, 128, 256):
        a, b = _step_ms(lean, rows), _step_ms(hf, rows)
        print(f"decode step, {rows:>3} rows: lean {a:.2f} ms, hf-forward {b:.2f} ms, ratio {a / b:.2f}")


if __name__ == "__main__":
    main()
