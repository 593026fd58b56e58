"""The paper's Fig. 2 on a laptop: REINFORCE, GRPO and the OREAL ladder on the tiny task, same budget.

    python tools/ablation.py examples/tiny/oreal.yaml --out runs/ablation [--methods reinforce,grpo,oreal]
                             [--steps 60] [--seeds 0,1,2 [--jobs 3]] [k=v ...]

Each method is one `train` run of the same config with the method's `algo.*` overrides
(megatron_oreal/algo/ladder.py) and its own run dir; the held-out greedy pass@1 recorded every
`eval.every` steps is plotted against steps (PNG) and tabulated (Markdown). A method whose run dir
already has a summary.json is not re-run, so an interrupted ablation continues.

With --seeds, each method runs once per seed (`seed`, `data.seed` and `rollout.sampling.seed` set to
it) in `DIR/<method>/seed<N>/`, and `DIR/<method>/summary.json` aggregates them: the mean pass@1 per
evaluation step (`eval_history`), the per-seed finals, their mean and sample standard deviation; the
plot shows the mean with a min-max band.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_oreal.algo.ladder import ABLATIONS, ablation_overrides  # noqa: E402

DEFAULT_METHODS = ("reinforce", "grpo", "reward_shaping", "behavior_cloning", "oreal")


def run_method(config: str, method: str, out: Path, steps: int | None, extra: list[str],
               run_dir: Path | None = None, log_to_file: bool = False) -> dict:
    run_dir = run_dir or out / method
    summary = run_dir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    # "oreal" is the config itself (the tiny recipe tunes e.g. the actor freeze); the rest override algo.*.
    overrides = [] if method == "oreal" else ablation_overrides(method)
    overrides += [f"run_dir={run_dir}", "checkpoint.export_hf=false", "eval.keep_best=false"]
    if method != "oreal":  # the other methods train no token RM (ω = 1); don't pay for one
        overrides.append("token_rm.enabled=false")
    if steps is not None:
        overrides.append(f"steps={steps}")
    cmd = [sys.executable, "-m", "megatron_oreal", "train", config, *overrides, *extra]
    print(f"== {method}: {' '.join(cmd[3:])}", flush=True)
    if log_to_file:  # parallel runs: one log per run instead of interleaved output
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "ablation.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    else:
        subprocess.run(cmd, check=True)
    return json.loads(summary.read_text())


def seed_overrides(seed: int) -> list[str]:
    return [f"seed={seed}", f"data.seed={seed}", f"rollout.sampling.seed={seed}"]


def aggregate(runs: dict[int, dict]) -> dict:
    """Per-seed summaries -> one summary: mean pass@1 at each evaluation step, finals' mean and spread."""
    seeds = sorted(runs)
    steps = [h["step"] for h in runs[seeds[0]]["eval_history"]]
    for s in seeds:
        if [h["step"] for h in runs[s]["eval_history"]] != steps:
            raise ValueError(f"seed {s} evaluated at different steps than seed {seeds[0]}")
    by_step = [[runs[s]["eval_history"][i]["pass1"] for s in seeds] for i in range(len(steps))]
    finals = [runs[s]["eval_pass1_final"] for s in seeds]
    return {
        "seeds": seeds,
        "eval_history": [{"step": st, "pass1": statistics.fmean(v), "pass1_min": min(v), "pass1_max": max(v)}
                         for st, v in zip(steps, by_step)],
        "eval_pass1_initial": statistics.fmean(runs[s]["eval_pass1_initial"] for s in seeds),
        "eval_pass1_final": statistics.fmean(finals),
        "eval_pass1_final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
        "eval_pass1_final_per_seed": finals,
        "wall_seconds": sum(runs[s]["wall_seconds"] for s in seeds),
    }


def plot(results: dict[str, dict], path: Path, title: str = "OREAL ablation (same budget)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for method, summary in results.items():
        hist = summary["eval_history"]
        steps = [h["step"] for h in hist]
        line = ax.plot(steps, [100 * h["pass1"] for h in hist], marker="o", ms=3, label=method)[0]
        if "pass1_min" in hist[0]:
            ax.fill_between(steps, [100 * h["pass1_min"] for h in hist], [100 * h["pass1_max"] for h in hist],
                            color=line.get_color(), alpha=0.15)
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out greedy pass@1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def table(results: dict[str, dict]) -> str:
    if any("seeds" in s for s in results.values()):
        return seed_table(results)
    lines = ["| method | initial | final | best (step) | wall s |", "|---|---|---|---|---|"]
    for method, s in results.items():
        best = f"{100 * s['eval_pass1_best']:.1f} ({s['eval_best_step']})" if s.get("eval_pass1_best") is not None else "-"
        lines.append(f"| {method} | {100 * s['eval_pass1_initial']:.1f} | {100 * s['eval_pass1_final']:.1f} | "
                     f"{best} | {s['wall_seconds']:.0f} |")
    return "\n".join(lines)


def seed_table(results: dict[str, dict]) -> str:
    lines = ["| method | seeds | initial | final, mean ± std | per seed | wall s (all seeds) |", "|---|---|---|---|---|---|"]
    for method, s in results.items():
        per = ", ".join(f"{100 * v:.1f}" for v in s["eval_pass1_final_per_seed"])
        lines.append(f"| {method} | {len(s['seeds'])} | {100 * s['eval_pass1_initial']:.1f} | "
                     f"{100 * s['eval_pass1_final']:.1f} ± {100 * s['eval_pass1_final_std']:.1f} | {per} | "
                     f"{s['wall_seconds']:.0f} |")
    return "\n".join(lines)


def run_seeds(config: str, method: str, out: Path, steps: int | None, extra: list[str], seeds: list[int]) -> dict:
    summary = out / method / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    runs = {s: run_method(config, method, out, steps, extra + seed_overrides(s), out / method / f"seed{s}")
            for s in seeds}
    agg = aggregate(runs)
    summary.write_text(json.dumps(agg, indent=1))
    return agg


def _partial(config: str, method: str, out: Path, steps: int | None, extra: list[str], seeds: list[int]) -> None:
    """Run the seeds so far (no aggregate summary yet)."""
    for s in seeds:
        run_method(config, method, out, steps, extra + seed_overrides(s), out / method / f"seed{s}", log_to_file=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every method")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", default="", help="comma-separated seeds: one run per method and seed")
    parser.add_argument("--jobs", type=int, default=1, help="with --seeds: runs at a time (each its own process)")
    args = parser.parse_intermixed_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in ABLATIONS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {sorted(ABLATIONS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in args.seeds.split(",") if x]
    if seeds:
        # seed-major, so a run cut short still has every method at the first seeds; --jobs runs in parallel
        jobs = [(m, s) for s in seeds for m in methods]
        with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
            list(pool.map(lambda ms: _partial(args.config, ms[0], out, args.steps, args.overrides, [ms[1]]), jobs))
        results = {m: run_seeds(args.config, m, out, args.steps, args.overrides, seeds) for m in methods}
    else:
        results = {m: run_method(args.config, m, out, args.steps, args.overrides) for m in methods}
    plot(results, out / "ablation.png", f"{Path(args.config).parent.name}: OREAL ablation (same budget)")
    text = table(results)
    (out / "ablation.md").write_text(text + "\n")
    print(text)
    print(f"plot: {out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
