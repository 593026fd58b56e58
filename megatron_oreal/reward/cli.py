"""`python -m megatron_oreal verify --pairs FILE.jsonl [--workers N] [--timeout S]`.

Scores `{"solution", "gold"[, "expected"][, "finish_reason"]}` lines with the worker pool and
prints accuracy against `expected` (where given), counts per reason and throughput.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time


class PairsError(ValueError):
    pass


def read_pairs(path: str) -> list[dict]:
    """Parse the JSONL file; the first bad line raises PairsError naming file and line."""
    rows = []
    with open(path, "rb") as f:  # bytes: a non-UTF-8 line is reported by number, not as a traceback
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PairsError(f"{path}:{lineno}: not UTF-8 (byte {exc.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PairsError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise PairsError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for key in ("solution", "gold"):
                if not isinstance(row.get(key), str):
                    raise PairsError(f"{path}:{lineno}: missing or non-string {key!r}")
            if "expected" in row and not isinstance(row["expected"], bool):
                raise PairsError(f"{path}:{lineno}: 'expected' must be true or false")
            rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_oreal verify", description="Score solution/gold pairs with the math verifier.")
    parser.add_argument("--pairs", required=True, help="JSONL with solution/gold[/expected] per line")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (0: in-process, no timeout)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per case before the worker is killed")
    parser.add_argument("--stop-word", default=None, help="responses not ending with it are truncated")
    args = parser.parse_args(argv)

    try:
        rows = read_pairs(args.pairs)
    except (OSError, PairsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from megatron_oreal.reward.pool import Verifier

    start = time.perf_counter()
    with Verifier(workers=args.workers, timeout=args.timeout, stop_word=args.stop_word) as verifier:
        results = verifier.verify_batch(rows)
    seconds = time.perf_counter() - start

    reasons = collections.Counter(r.reason for r in results)
    judged = [(r.correct, row["expected"]) for r, row in zip(results, rows) if "expected" in row]
    print(f"cases: {len(rows)}  correct: {sum(r.correct for r in results)}")
    if judged:
        agree = sum(got == want for got, want in judged)
        print(f"accuracy vs expected: {agree}/{len(judged)} = {agree / len(judged):.4f}")
    print("reasons: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))
    print(f"throughput: {len(rows) / max(seconds, 1e-9):.1f} cases/s ({seconds:.2f} s, {args.workers} workers)")
    return 0
