"""The paper's Fig. 2 on a laptop: REINFORCE, GRPO and the OREAL ladder on the tiny task, same budget.

    python tools/ablation.py examples/tiny/oreal.yaml --out runs/ablation [--methods reinforce,grpo,oreal]
                             [--steps 60] [k=v ...]

Each method is one `train` run of the same config with the method's `algo.*` overrides
(megatron_oreal/algo/ladder.py) and its own run dir; the held-out greedy pass@1 recorded every
`eval.every` steps is plotted against steps (PNG) and tabulated (Markdown). A method whose run dir
already has a summary.json is not re-run, so an interrupted ablation continues.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_oreal.algo.ladder import ABLATIONS, ablation_overrides  # noqa: E402

DEFAULT_METHODS = ("reinforce", "grpo", "reward_shaping", "behavior_cloning", "oreal")


def run_method(config: str, method: str, out: Path, steps: int | None, extra: list[str]) -> dict:
    run_dir = out / method
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
    subprocess.run(cmd, check=True)
    return json.loads(summary.read_text())


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for method, summary in results.items():
        hist = summary["eval_history"]
        ax.plot([h["step"] for h in hist], [100 * h["pass1"] for h in hist], marker="o", ms=3, label=method)
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out greedy pass@1 (%)")
    ax.set_title("Tiny arithmetic task: OREAL ablation (same budget)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def table(results: dict[str, dict]) -> str:
    lines = ["| method | initial | final | best (step) | wall s |", "|---|---|---|---|---|"]
    for method, s in results.items():
        best = f"{100 * s['eval_pass1_best']:.1f} ({s['eval_best_step']})" if s.get("eval_pass1_best") is not None else "-"
        lines.append(f"| {method} | {100 * s['eval_pass1_initial']:.1f} | {100 * s['eval_pass1_final']:.1f} | "
                     f"{best} | {s['wall_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="section.key=value applied to every method")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_intermixed_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in ABLATIONS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {sorted(ABLATIONS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {m: run_method(args.config, m, out, args.steps, args.overrides) for m in methods}
    plot(results, out / "ablation.png")
    text = table(results)
    (out / "ablation.md").write_text(text + "\n")
    print(text)
    print(f"plot: {out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
