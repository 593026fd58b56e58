"""Benchmark (not a test): our verifier vs Math-Verify on the same labelled cases.

    python tools/bench_verifier.py [--cases tests/assets/verifier_cases.jsonl] [--workers 2] [--mv-workers 1]

Prints, for each verifier, accuracy against the `expected` labels and throughput (cases/s, wall
clock including pool start-up). Math-Verify runs as it is normally used, `verify(parse(gold),
parse(solution))` in one process
(bare answers wrapped in `$...$`, see `_as_math`); `--mv-workers 2` spreads it over a multiprocessing pool too.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import time
from pathlib import Path

DEFAULT_CASES = Path(__file__).resolve().parents[1] / "tests" / "assets" / "verifier_cases.jsonl"


def _as_math(text: str) -> str:
    """Math-Verify reads LaTeX only inside `$...$`, `\\(...\\)` or a box; a bare answer (a dataset's
    gold, or a short final answer) is given to it wrapped, as its README does for golds."""
    if any(m in text for m in ("$", "\\boxed", "\\(", "\\[")) or "\n" in text or len(text) > 200:
        return text
    return f"${text}$"


def _math_verify_one(case: tuple[str, str]) -> bool:
    from math_verify import parse, verify

    solution, gold = case
    try:
        return bool(verify(parse(_as_math(gold)), parse(_as_math(solution))))
    except Exception:
        return False


def run_math_verify(cases: list[dict], workers: int) -> tuple[list[bool], float]:
    pairs = [(c["solution"], c["gold"]) for c in cases]
    start = time.perf_counter()
    if workers <= 1:
        got = [_math_verify_one(p) for p in pairs]
    else:
        with mp.get_context("forkserver").Pool(workers) as pool:
            got = pool.map(_math_verify_one, pairs, chunksize=8)
    return got, time.perf_counter() - start


def run_ours(cases: list[dict], workers: int, timeout: float) -> tuple[list[bool], float]:
    from megatron_oreal.reward import Verifier

    start = time.perf_counter()
    with Verifier(workers=workers, timeout=timeout) as verifier:
        results = verifier.verify_batch([(c["solution"], c["gold"]) for c in cases])
    return [r.correct for r in results], time.perf_counter() - start


def report(name: str, cases: list[dict], got: list[bool], seconds: float) -> None:
    agree = [g == c["expected"] for g, c in zip(got, cases)]
    per_cat = collections.defaultdict(lambda: [0, 0])
    for ok, c in zip(agree, cases):
        per_cat[c["category"]][0] += ok
        per_cat[c["category"]][1] += 1
    weak = ", ".join(f"{k} {a}/{n}" for k, (a, n) in sorted(per_cat.items()) if a < n)
    print(f"{name:<22} accuracy {sum(agree)}/{len(cases)} = {sum(agree) / len(cases):.4f}   "
          f"{len(cases) / seconds:8.1f} cases/s ({seconds:.2f} s)")
    if weak:
        print(f"{'':<22} misses by category: {weak}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=str(DEFAULT_CASES))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mv-workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=1, help="repeat the case list (longer, steadier timing)")
    args = parser.parse_args()

    cases = [json.loads(line) for line in Path(args.cases).read_text().splitlines() if line.strip()] * args.repeat
    print(f"{len(cases)} cases from {args.cases}; {mp.cpu_count()} CPUs")
    ours, ours_s = run_ours(cases, args.workers, args.timeout)
    report(f"ours ({args.workers} workers)", cases, ours, ours_s)
    theirs, theirs_s = run_math_verify(cases, args.mv_workers)
    report(f"math-verify ({args.mv_workers} proc)", cases, theirs, theirs_s)
    print(f"speed-up: {(len(cases) / ours_s) / (len(cases) / theirs_s):.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
