"""CPU engine vs `transformers`' `generate` on the same batch of real prompts, in one run.

    python tools/bench_generate.py --model DIR [--data F] [--limit 16] [--max-new-tokens 96]
                                   [--batch 16] [--n 4] [--threads 2] [--skip-sampled]

Greedy: both generate the first --limit problems of --data (chat template, no system prompt) in
batches of --batch; prints wall seconds, generated tokens/s, and how many responses are identical.
Sampled (temperature 1, top-p 0.95, --n samples per prompt): times both on the same prompts
(outputs differ by design: different random streams). Peak RSS (ru_maxrss) is printed after each phase;
the engine runs first, so its figure is the engine's own peak (plus the model load).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_oreal.data.prompts import load_eval_set  # noqa: E402
from megatron_oreal.data.templates import load_tokenizer, tokenize_prompts  # noqa: E402
from megatron_oreal.rollout.cpu_engine import CPUEngine  # noqa: E402
from megatron_oreal.rollout.engine import SamplingParams  # noqa: E402
from megatron_oreal.rollout.stops import default_stop_ids  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def hf_generate(model, prompts, stops, pad_id, batch, **kw) -> list[list[int]]:
    """transformers' generate, left-padded batches; each response cut after its first stop token."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.inference_mode():
            gen = model.generate(ids, attention_mask=mask, eos_token_id=stops, pad_token_id=pad_id, **kw)
        for row in gen[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), None)
            out.append(row if cut is None else row[: cut + 1])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", default=str(REPO / "examples/smollm2/data/gsm8k_test_first50.jsonl"))
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-sampled", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(args.model)
    prompts = load_eval_set(args.data, limit=args.limit)
    tokenize_prompts(prompts, tok, "none")
    ids = [p.input_ids for p in prompts]
    stops = default_stop_ids(tok, args.model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    print(f"{len(ids)} prompts (mean {sum(map(len, ids)) / len(ids):.0f} tokens), max_new_tokens {args.max_new_tokens}, "
          f"batch {args.batch}, {args.threads} threads, stop ids {stops}")

    engine = CPUEngine(args.model, tok, max_batch_rows=args.batch)
    print(f"after loading the engine: peak RSS {peak_rss_gb():.2f} GB")
    sp = SamplingParams.greedy_eval(args.max_new_tokens, stops)
    t = time.perf_counter()
    ours = [o[0].token_ids for o in engine.generate(ids, sp)]
    t_ours = time.perf_counter() - t
    print(f"engine greedy:      {t_ours:7.1f} s, {sum(map(len, ours)) / t_ours:6.1f} tokens/s; peak RSS {peak_rss_gb():.2f} GB")
    if not args.skip_sampled:
        spn = SamplingParams(n=args.n, temperature=1.0, top_p=0.95, max_new_tokens=args.max_new_tokens,
                             stop_token_ids=tuple(stops), seed=0)
        t = time.perf_counter()
        ours_s = [o.token_ids for g in engine.generate(ids, spn) for o in g]
        t_ours_s = time.perf_counter() - t
        print(f"engine sampled x{args.n}:  {t_ours_s:7.1f} s, {sum(map(len, ours_s)) / t_ours_s:6.1f} tokens/s; "
              f"peak RSS {peak_rss_gb():.2f} GB")
    engine.close()
    del engine

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    t = time.perf_counter()
    ref = hf_generate(model, ids, stops, pad, args.batch, do_sample=False, max_new_tokens=args.max_new_tokens)
    t_hf = time.perf_counter() - t
    print(f"HF generate greedy: {t_hf:7.1f} s, {sum(map(len, ref)) / t_hf:6.1f} tokens/s; peak RSS {peak_rss_gb():.2f} GB")
    same = sum(a == b for a, b in zip(ours, ref))
    print(f"greedy responses identical: {same}/{len(ids)}; engine/HF time ratio {t_ours / t_hf:.2f}")
    if not args.skip_sampled:
        torch.manual_seed(0)
        t = time.perf_counter()
        ref_s = hf_generate(model, [p for p in ids for _ in range(args.n)], stops, pad, args.batch, do_sample=True,
                            temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=args.max_new_tokens)
        t_hf_s = time.perf_counter() - t
        print(f"HF generate sampled x{args.n}: {t_hf_s:7.1f} s, {sum(map(len, ref_s)) / t_hf_s:6.1f} tokens/s; "
              f"engine/HF time ratio {t_ours_s / t_hf_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
