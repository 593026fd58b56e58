"""`python -m megatron_oreal eval --model HF_DIR --data FILE.jsonl`: greedy pass@1 of any HF model.

The evaluation protocol of docs/algorithm.md §5.2 (zero-shot, greedy, one sample, the training system prompt)
on any JSONL set (MATH-500, GSM8K, AIME24, AMC23: the field names are found automatically), with a
per-subject / per-level breakdown, the verifier's reasons, and a predictions file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_oreal eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model folder (weights + tokenizer)")
    parser.add_argument("--data", required=True, help="JSONL file of problems with gold answers")
    parser.add_argument("--prompt-key", default=None, help="field of the problem (default: question/problem/prompt)")
    parser.add_argument("--answer-key", default=None, help="field of the answer (default: gold_answer/answer)")
    parser.add_argument("--system-prompt", default="oreal", help="preset name (oreal, none) or literal text")
    parser.add_argument("--prompt-format", default="chat", help="'chat' or a format string with {prompt}")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N rows only")
    parser.add_argument("--stop-token-ids", default="",
                        help="comma-separated ids that end a response (default: eos + the chat template's "
                             "end-of-turn token + generation_config.json's end tokens)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--engine", default="cpu", choices=["cpu", "sglang"])
    parser.add_argument("--workers", type=int, default=2, help="verifier worker processes")
    parser.add_argument("--timeout", type=float, default=5.0, help="verifier seconds per answer")
    parser.add_argument("--out", default=None, help="predictions JSONL (default: <model>/eval_<data>.jsonl)")
    args = parser.parse_args(argv)

    from megatron_oreal.data.prompts import DataError, check_prompt_lengths, load_eval_set
    from megatron_oreal.data.templates import TemplateError, load_tokenizer, tokenize_prompts
    from megatron_oreal.reward.pool import Verifier
    from megatron_oreal.rollout import build_engine
    from megatron_oreal.rollout.engine import SamplingParams
    from megatron_oreal.rollout.stops import default_stop_ids
    from megatron_oreal.stages import Comm, evaluate

    if not (Path(args.model) / "config.json").is_file():
        print(f"error: --model {args.model!r} has no config.json (expected a Hugging Face model folder)", file=sys.stderr)
        return 2
    try:
        prompts = load_eval_set(args.data, args.prompt_key, args.answer_key, limit=args.limit)
        tokenizer = load_tokenizer(args.model)
        tokenize_prompts(prompts, tokenizer, args.system_prompt, args.prompt_format)
        max_pos = json.loads((Path(args.model) / "config.json").read_text()).get("max_position_embeddings") or 0
        check_prompt_lengths(prompts, 0, int(max_pos), "eval")
    except (DataError, TemplateError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        stops = [int(t) for t in args.stop_token_ids.split(",") if t.strip()] or default_stop_ids(tokenizer, args.model)
    except ValueError as exc:
        print(f"error: --stop-token-ids {args.stop_token_ids!r}: {exc}", file=sys.stderr)
        return 2
    sampling = SamplingParams.greedy_eval(args.max_new_tokens, stops)
    engine = build_engine(args.engine, args.model, tokenizer)
    t0 = time.time()
    print(f"evaluating {args.model} on {len(prompts)} problems from {args.data} ...", flush=True)
    with Verifier(workers=args.workers, timeout=args.timeout) as verifier:
        result = evaluate(engine, prompts, sampling, tokenizer, verifier, Comm(), batch_size=args.batch_size)
    engine.close()
    seconds = time.time() - t0
    out = Path(args.out or Path(args.model) / f"eval_{Path(args.data).stem}.jsonl")
    with open(out, "w") as f:
        for p in result.predictions:
            f.write(json.dumps(p) + "\n")
    print(result.table())
    print(f"{len(prompts)} problems in {seconds:.1f}s; predictions: {out}")
    return 0
