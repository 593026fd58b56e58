"""`python -m megatron_oreal profile CONFIG --steps N [--trace-steps a:b]`: run N steps, print a table.

The table (per stage: seconds, share of the step, tokens/s, MFU, weight-sync GB/s, peak memory) is a
pure function of the per-step metrics the trainer reports (`time/<stage>`, `tokens/s`, `mfu`,
`sync/gbps`, `memory/peak_gb`), so it is tested on synthetic metrics. `TraceWindow` is the optional
PyTorch-profiler trace over a chosen step range (as NeMo-RL's
`NRL_NSYS_PROFILE_STEP_RANGE=3:5`, docs/nsys-profiling.md, and slime's `--use-pytorch-profiler`,
docs/en/developer_guide/profiling.md); NVTX ranges come from
`timers.StageTimer` on GPUs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Mapping, Sequence

# Per-stage rates come from `<metric>/<stage>` keys (e.g. `tokens/s/rollout`). A metric reported
# without a stage suffix belongs to the first of these stages present in the step (train.py times the
# whole training side as "train"); plain `tokens/s` is a whole-step rate and goes on the step row.
_STAGE_RATE_DEFAULTS = {"tokens/s": (), "mfu": ("train", "policy"), "sync/gbps": ("weight_sync",)}


def parse_step_range(text: str) -> tuple[int, int]:
    """'3:5' -> (3, 5), inclusive 0-based step indices; '4' -> (4, 4)."""
    try:
        if ":" in text:
            a, b = (int(x) for x in text.split(":", 1))
        else:
            a = b = int(text)
    except ValueError:
        raise ValueError(f"--trace-steps {text!r}: expected a:b (e.g. 3:5)") from None
    if a < 0 or b < a:
        raise ValueError(f"--trace-steps {text!r}: need 0 <= a <= b")
    return a, b


def _mean(values: Sequence[float]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def summarize(steps: Sequence[Mapping[str, float]], skip_first: int = 1) -> dict:
    """Mean per-stage seconds and rates over the steps, skipping `skip_first` warm-up steps when more
    remain (the first step pays compilation, allocator growth and engine start-up)."""
    if not steps:
        raise ValueError("profile: no step metrics to summarise")
    used = list(steps[skip_first:]) if len(steps) > skip_first else list(steps)
    stages: list[str] = []
    for m in used:
        for key in m:
            if key.startswith("time/") and key != "time/step" and key[5:] not in stages:
                stages.append(key[5:])
    mean_stage = {s: _mean([m.get(f"time/{s}", 0.0) for m in used]) for s in stages}
    step_s = _mean([m["time/step"] for m in used if "time/step" in m]) or sum(mean_stage.values())
    step_times = [float(m["time/step"]) for m in used if "time/step" in m]
    rates: dict[str, dict[str, float]] = {s: {} for s in stages}
    for metric, owners in _STAGE_RATE_DEFAULTS.items():
        owner = next((o for o in owners if o in stages), None)
        for s in stages:
            value = _mean([m[f"{metric}/{s}"] for m in used if f"{metric}/{s}" in m])
            if value is None and s == owner:
                value = _mean([m[metric] for m in used if metric in m])
            if value is not None:
                rates[s][metric] = value
    peak = [m["memory/peak_gb"] for m in used if "memory/peak_gb" in m]
    return {
        "steps": len(used), "stages": mean_stage, "step_s": step_s, "rates": rates,
        "tokens/s": _mean([m["tokens/s"] for m in used if "tokens/s" in m]),
        "mfu": _mean([m["mfu"] for m in used if "mfu" in m]),
        "peak_gb": max(peak) if peak else None,
        "step_median_s": statistics.median(step_times) if step_times else None,
        "cpu_median_s": statistics.median(cpu) if (cpu := [float(m["cpu/step_s"]) for m in used
                                                            if "cpu/step_s" in m]) else None,
    }


# What bounds the figure (README "Profiling"): on a GPU the CUDA allocator's peak; on a CPU the peak
# resident set of the step. Activations are held for one micro-batch at a time (PP=1; at PP>1 for at
# most PP in flight), and a micro-batch holds at most policy.micro_batch_tokens tokens (or one longer
# sequence), so the activation part grows with micro_batch_tokens, not with the batch size.
_PEAK_NOTE = " (per step; activations bounded by policy.micro_batch_tokens)"


def format_profile_table(steps: Sequence[Mapping[str, float]], skip_first: int = 1) -> str:
    """The per-stage table as text (see module doc). Empty cells are '-'."""
    s = summarize(steps, skip_first)
    step_s = s["step_s"]

    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else fmt.format(value)

    header = f"{'stage':<14}{'seconds':>10}{'share':>8}{'tokens/s':>12}{'MFU':>8}{'sync GB/s':>11}"
    lines = [f"profile: mean over {s['steps']} step(s)", header, "-" * len(header)]
    for name, sec in s["stages"].items():
        r = s["rates"][name]
        share = sec / step_s if step_s else None
        lines.append(f"{name:<14}{sec:>10.3f}{cell(share, '{:.1%}'):>8}{cell(r.get('tokens/s'), '{:.0f}'):>12}"
                     f"{cell(r.get('mfu'), '{:.1%}'):>8}{cell(r.get('sync/gbps'), '{:.2f}'):>11}")
    other = step_s - sum(s["stages"].values())
    if other > 1e-3 * max(step_s, 1e-9):
        lines.append(f"{'(untimed)':<14}{other:>10.3f}{other / step_s:>8.1%}")
    lines.append("-" * len(header))
    lines.append(f"{'step':<14}{step_s:>10.3f}{'100.0%':>8}{cell(s['tokens/s'], '{:.0f}'):>12}"
                 f"{cell(s['mfu'], '{:.1%}'):>8}{'':>11}")
    lines.append(f"median step: {cell(s['step_median_s'], '{:.3f} s')} wall, "
                 f"{cell(s['cpu_median_s'], '{:.3f} s')} CPU (this process)")
    lines.append(f"peak memory: {cell(s['peak_gb'], '{:.2f} GiB')}{_PEAK_NOTE}")
    return "\n".join(lines)


class TraceWindow:
    """PyTorch-profiler trace over the steps [first, last]; call `step_begin(i)`/`step_end(i)` each step.

        window = TraceWindow(run_dir / "trace", (3, 5))
        for i in range(n):
            window.step_begin(i); ...; window.step_end(i)
        window.close()

    Outside the window it costs nothing. The trace (Chrome JSON, for chrome://tracing or Perfetto)
    is written when the window closes, one file per rank: `trace_rank{rank}_steps{a}-{b}.json`.
    """

    def __init__(self, out_dir: str | Path, steps: tuple[int, int] | None, rank: int = 0,
                 record_shapes: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.steps = steps
        self.rank = rank
        self.record_shapes = record_shapes
        self._prof = None
        self.written: Path | None = None

    def step_begin(self, step: int) -> None:
        if self.steps is None or step != self.steps[0] or self._prof is not None:
            return
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._prof = profile(activities=activities, record_shapes=self.record_shapes, with_stack=False)
        self._prof.__enter__()

    def step_end(self, step: int) -> None:
        if self._prof is None:
            return
        self._prof.step()
        if self.steps is not None and step >= self.steps[1]:
            self.close()

    def close(self) -> None:
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        a, b = self.steps
        self.written = self.out_dir / f"trace_rank{self.rank}_steps{a}-{b}.json"
        prof.export_chrome_trace(str(self.written))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_oreal profile",
                                     description="Run N training steps and print a per-stage table.")
    parser.add_argument("config", help="run config YAML")
    parser.add_argument("--steps", type=int, default=3, help="steps to run (default 3; the first is warm-up)")
    parser.add_argument("--trace-steps", default="",
                        help="PyTorch-profiler trace for steps a:b, counted from 0 at this command's first step")
    parser.add_argument("--metrics-out", default="",
                        help="also write every step's metrics to this JSON file (a list, one dict per step)")
    parser.add_argument("--take-turns", default="", metavar="FILE:ME:OTHER",
                        help="run in lockstep with another process (e.g. tools/bench_vs_trl.py --paired): after "
                             "each step hand the turn to OTHER through FILE and wait for it back "
                             "(observability/turns.py)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_intermixed_args(argv)
    if args.steps <= 0:
        parser.error("--steps must be > 0")
    from megatron_oreal.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        trace_steps = parse_step_range(args.trace_steps) if args.trace_steps else None
        turns = None
        if args.take_turns:
            from megatron_oreal.observability.turns import Turns

            turns = Turns.from_spec(args.take_turns)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        from megatron_oreal import train
    except ImportError as exc:
        print(f"error: the trainer is not available ({exc})", file=sys.stderr)
        return 2
    from megatron_oreal.launch.env import dist_env

    rank = dist_env().rank
    window = TraceWindow(Path(cfg.run_dir) / "profile", trace_steps, rank=rank)
    steps: list[dict] = []

    def on_step(*args) -> None:
        # The trainer calls on_step(step, metrics) (or on_step(metrics)) after each step; the trace
        # window brackets whole steps, counted from the first step this command ran.
        metrics = args[-1]
        step = len(steps)
        steps.append(dict(metrics))
        window.step_end(step)
        if turns is not None:  # after time/step was taken, before the next step's clock starts
            turns.pass_and_wait()
        window.step_begin(step + 1)

    window.step_begin(0)
    try:
        train.run(cfg, max_steps=args.steps, on_step=on_step)
    finally:
        window.close()
        if turns is not None:
            turns.finish()
    if rank == 0:
        print(format_profile_table(steps))
        if args.metrics_out:
            import json

            plain = [{k: v for k, v in m.items() if isinstance(v, (int, float, str, bool))} for m in steps]
            Path(args.metrics_out).write_text(json.dumps(plain, indent=1) + "\n")
        if window.written:
            print(f"trace: {window.written}")
    return 0
