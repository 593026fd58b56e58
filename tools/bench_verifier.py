"""Benchmark (not a test): our verifier vs Math-Verify on the same labelled cases, in one run.

    python tools/bench_verifier.py [--cases FILE ...] [--workers 2] [--mv-workers 2] [--repeat N]

Default cases: the external sets in tests/assets/external/ (Math-Verify's own test cases and the
MATH-500/GSM8K/AIME24/AMC23 answer pairs; see the README there). Prints accuracy against the
`expected` labels per category for both verifiers side by side, throughput (cases/s, wall clock
including pool start-up), and our slowest cases.

Math-Verify (pinned in requirements-bench.txt) lives in its own venv so the project's venv stays as
it is: `--setup` creates it (default ~/.cache/megatron-oreal/bench-venv) and this script runs
Math-Verify there as a child process (`--mv-python`), in `--mv-workers` processes, on the same
cases. A case carrying `mv` settings (Math-Verify's own tests) is replayed with those settings, as its
tests do; other cases use `verify(parse(gold), parse(solution))` with bare answers wrapped in `$..$`.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's package, not another installed copy
EXTERNAL = ROOT / "tests" / "assets" / "external"
DEFAULT_CASES = [EXTERNAL / "math_verify_cases.jsonl", EXTERNAL / "math_data_pairs.jsonl"]
BENCH_VENV = Path(os.environ.get("MEGATRON_OREAL_BENCH_VENV", Path.home() / ".cache" / "megatron-oreal" / "bench-venv"))


def setup_venv(venv: Path) -> None:
    """Create the Math-Verify venv with the pinned versions of requirements-bench.txt."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-r", str(ROOT / "requirements-bench.txt")], check=True)


def _as_math(text: str) -> str:
    """Math-Verify reads LaTeX only inside `$...$`, `\\(...\\)` or a box; a bare answer (a dataset's
    gold, or a short final answer) is given to it wrapped, as its README does for golds."""
    if any(m in text for m in ("$", "\\boxed", "\\(", "\\[")) or "\n" in text or len(text) > 200:
        return text
    return f"${text}$"


def _math_verify_one(case: dict) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    try:
        mv = case.get("mv")
        if mv is None:
            return bool(verify(parse(_as_math(case["gold"])), parse(_as_math(case["solution"]))))
        if mv["match_types"] is None:  # their test called verify(parse(gold), parse(pred)) as is
            return bool(verify(parse(case["gold"]), parse(case["solution"])))
        targets = [LatexExtractionConfig(boxed_match_priority=0) if t == "latex" else ExprExtractionConfig() for t in mv["match_types"]]
        return bool(verify(parse(case["gold"], targets), parse(case["solution"], targets), float_rounding=mv["precision"],
                           strict=mv["strict"], allow_set_relation_comp=mv["allow_set_relation_comp"]))
    except Exception:
        return False


def run_math_verify_here(cases: list[dict], workers: int) -> tuple[list[bool], float]:
    start = time.perf_counter()
    if workers <= 1:
        got = [_math_verify_one(c) for c in cases]
    else:
        with mp.get_context("forkserver").Pool(workers) as pool:
            got = pool.map(_math_verify_one, cases, chunksize=8)
    return got, time.perf_counter() - start


def run_math_verify(cases: list[dict], workers: int, python: str) -> tuple[list[bool], float]:
    """In the Math-Verify venv's interpreter (a child process); timing is measured inside it."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "cases.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(cases))
        subprocess.run([python, __file__, "--mv-child", str(src), str(dst), "--mv-workers", str(workers)], check=True)
        out = json.loads(dst.read_text())
    return out["got"], out["seconds"]


def run_ours(cases: list[dict], workers: int, timeout: float, strict_hedging: bool) -> tuple[list[bool], float, list]:
    from megatron_oreal.reward import Verifier

    start = time.perf_counter()
    with Verifier(workers=workers, timeout=timeout, strict_hedging=strict_hedging) as verifier:
        results = verifier.verify_batch([(c["solution"], c["gold"]) for c in cases])
    return [r.correct for r in results], time.perf_counter() - start, [r.reason for r in results]


def per_category(cases: list[dict], got: list[bool]) -> dict[str, list[int]]:
    out = collections.defaultdict(lambda: [0, 0])
    for ok, c in zip(got, cases):
        out[c["category"]][0] += ok == c["expected"]
        out[c["category"]][1] += 1
    return out


def slowest(cases: list[dict], n: int) -> list[tuple[float, dict]]:
    """Each case judged alone in this process (no pool), slowest first: the time-limit check."""
    from megatron_oreal.reward.judge import judge

    judge(r"\boxed{x^2+2x+1}", "(x+1)^2")  # imports sympy and the parser, as the pool's forkserver does
    times = []
    for c in cases:
        t = time.perf_counter()
        judge(c["solution"], c["gold"])
        times.append((time.perf_counter() - t, c))
    return sorted(times, key=lambda x: -x[0])[:n]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", action="append", help="JSONL (repeatable); default: tests/assets/external/*")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mv-workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=1, help="repeat the case list (longer, steadier timing)")
    parser.add_argument("--strict-hedging", action="store_true", help="ours with the strict hedging rule")
    parser.add_argument("--mv-python", default=str(BENCH_VENV / "bin" / "python"))
    parser.add_argument("--setup", action="store_true", help=f"create the Math-Verify venv ({BENCH_VENV}) first")
    parser.add_argument("--slowest", type=int, default=5, help="time each case alone and list the slowest N")
    parser.add_argument("--mv-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.mv_child:
        src, dst = args.mv_child
        got, seconds = run_math_verify_here(json.loads(Path(src).read_text()), args.mv_workers)
        Path(dst).write_text(json.dumps({"got": got, "seconds": seconds}))
        return 0
    if args.setup and not Path(args.mv_python).exists():
        setup_venv(BENCH_VENV)

    paths = args.cases or [str(p) for p in DEFAULT_CASES]
    cases = [json.loads(line) for p in paths for line in Path(p).read_text(encoding="utf-8").splitlines() if line.strip()]
    cases = cases * args.repeat
    load = os.getloadavg()[0]
    print(f"{len(cases)} cases from {', '.join(Path(p).name for p in paths)}; {mp.cpu_count()} CPUs, load {load:.1f}")
    # ours, Math-Verify, ours again: the mean of our two runs brackets theirs in time, so a machine
    # load that drifts during the run (other jobs) shifts both sides alike
    ours, ours_a, reasons = run_ours(cases, args.workers, args.timeout, args.strict_hedging)
    have_mv = Path(args.mv_python).exists()
    if have_mv:
        theirs, theirs_s = run_math_verify(cases, args.mv_workers, args.mv_python)
    else:
        print(f"(no Math-Verify venv at {args.mv_python}: run with --setup; its column is left empty)")
        theirs, theirs_s = [None] * len(cases), float("nan")
    again, ours_b, _ = run_ours(cases, args.workers, args.timeout, args.strict_hedging)
    ours_s = (ours_a + ours_b) / 2
    if again != ours:
        print("note: our two runs disagree on", sum(a != b for a, b in zip(again, ours)), "cases (timeouts?)")

    ours_cat, theirs_cat = per_category(cases, ours), per_category(cases, theirs)
    print(f"\n| category | cases | ours | Math-Verify 0.9.0 |\n|---|---|---|---|")
    for cat in sorted(ours_cat):
        (a, n), (b, _) = ours_cat[cat], theirs_cat[cat]
        print(f"| {cat} | {n} | {a / n:.1%} | {f'{b / n:.1%}' if have_mv else '-'} |")
    a = sum(x[0] for x in ours_cat.values())
    b = sum(x[0] for x in theirs_cat.values())
    theirs_all = f"**{b / len(cases):.2%}** ({b})" if have_mv else "-"
    print(f"| **all** | {len(cases)} | **{a / len(cases):.2%}** ({a}) | {theirs_all} |\n")
    print(f"ours ({args.workers} workers + parent): {len(cases) / ours_s:8.1f} cases/s ({ours_s:.2f} s: mean of {ours_a:.2f} s before and {ours_b:.2f} s after Math-Verify)")
    if have_mv:
        print(f"math-verify ({args.mv_workers} proc): {len(cases) / theirs_s:8.1f} cases/s ({theirs_s:.2f} s)")
        print(f"speed-up: {theirs_s / ours_s:.1f}x   (load at start {load:.1f}, at end {os.getloadavg()[0]:.1f})")
    print("our reasons: " + ", ".join(f"{k}={v}" for k, v in sorted(collections.Counter(reasons).items())))
    if args.slowest:
        print(f"\nslowest cases judged alone, in-process:")
        for sec, c in slowest(cases[: len(cases) // args.repeat], args.slowest):
            print(f"  {sec * 1000:8.1f} ms  {c['category']}  gold={c['gold'][:60]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
