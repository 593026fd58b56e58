"""TensorBoard scalars (rank 0 only) and the one-line console progress report.

Metric names are flat `group/name` strings (`time/rollout`, `loss/positive`, `reward/mean`, ...) so
TensorBoard groups them by prefix, as slime (`perf/*`, slime/utils/train_metric_utils.py)
and verl (`timing_s/*`, verl/trainer/ppo/metric_utils.py) do.
"""

from __future__ import annotations

import math
import numbers
import threading
from pathlib import Path
from typing import Mapping


def _quiet_full_disk_in_writer_thread() -> None:
    """TensorBoard writes events from a thread; on a full disk that thread prints a traceback and the
    same OSError is raised again in the trainer at the next write/flush, where the CLI turns it into
    one line. Silence the thread's copy only (every other thread exception is printed as before)."""
    previous = threading.excepthook
    if getattr(previous, "_oreal_quiet", False):
        return

    def hook(args):
        from megatron_oreal.checkpoint.diskfull import is_disk_full

        if args.exc_value is not None and is_disk_full(args.exc_value):
            return
        previous(args)

    hook._oreal_quiet = True
    threading.excepthook = hook


class MetricsWriter:
    """Thin wrapper over `torch.utils.tensorboard.SummaryWriter`.

    A no-op unless `enabled` and `rank == 0`: other ranks may call it freely, so the loop needs no
    `if rank == 0` around logging. Non-scalar and non-finite values are skipped (a NaN loss is still
    printed on the console, where someone will see it).
    """

    def __init__(self, log_dir: str | Path, enabled: bool = True, rank: int = 0) -> None:
        self.active = bool(enabled) and rank == 0
        self._writer = None
        if self.active:
            from torch.utils.tensorboard import SummaryWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            _quiet_full_disk_in_writer_thread()
            self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, step: int, metrics: Mapping[str, object]) -> int:
        """Write every finite scalar of `metrics` at `step`; returns how many were written.

        All of a step's scalars go in one event (one Summary with a value per tag, as TensorFlow's
        merged summaries did): `add_scalar` per metric builds an event each, ~40 µs apiece, ~3 ms a
        step for the trainer's ~70 metrics (measured); readers see the same per-tag series."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        if self._writer is None:
            return 0
        values = []
        for key, value in metrics.items():
            if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
                value = value.item()  # 0-d tensors / numpy scalars
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            if not math.isfinite(float(value)):
                continue
            values.append(Summary.Value(tag=key, simple_value=float(value)))
        if values:
            self._writer.file_writer.add_summary(Summary(value=values), global_step=step)
        return len(values)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def format_duration(seconds: float) -> str:
    """12 -> '12s', 754 -> '12m34s', 9000 -> '2h30m'."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


# Logging parity with the reference trainer (docs/algorithm.md §11, [train_oreal.py:L901-931]): our metric key -> its name.
# The trainer logs these keys; the console line and TensorBoard read them from here.
REFERENCE_METRICS: dict[str, str] = {
    "reward/mean": "avg_judger_reward",
    "reward/pass_rate": "(pass rate, not in the reference log)",
    "advantage/mean": "avg_adv",
    "policy/entropy": "avg_gen_entropy",  # -mean log-prob of the sampled tokens
    "kl/ref": "avg_ref_kl",  # mean (logp - ref_logp)
    "loss/positive": "positive_loss",
    "loss/negative": "negative_loss",
    "loss/kl": "kl_loss",
    "loss/token_rm": "token_level_rm_loss",
    "response/mean_tokens": "avg_new_tokens",
    "grad_norm/policy": "actor grad norm",
    "grad_norm/token_rm": "token RM grad norm",
}

# (metric key, console label, format). Only keys present in the metrics are printed.
CONSOLE_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("reward/mean", "reward", "{:+.3f}"),
    ("reward/pass_rate", "pass", "{:.1%}"),
    ("loss/positive", "L+", "{:.4f}"),
    ("loss/negative", "L-", "{:.4f}"),
    ("loss/kl", "Lkl", "{:.4f}"),
    ("loss/token_rm", "Lrm", "{:.4f}"),
    ("kl/ref", "kl", "{:.4f}"),
    ("response/mean_tokens", "len", "{:.0f}"),
    ("tokens/s", "tok/s", "{:.0f}"),
    ("mfu", "mfu", "{:.1%}"),
)


def console_line(step: int, total_steps: int, metrics: Mapping[str, float],
                 mean_step_s: float | None = None) -> str:
    """One progress line per step, e.g.

    `step 12/90 | reward +0.125 | pass 56.2% | L+ 0.4100 | ... | 41.2 s/step | ETA 53m33s`

    `step` is 1-based (steps done). The ETA uses `mean_step_s` (a running mean the caller keeps) or,
    without it, this step's `time/step`.
    """
    width = len(str(total_steps))
    parts = [f"step {step:>{width}}/{total_steps}"]
    for key, label, fmt in CONSOLE_FIELDS:
        value = metrics.get(key)
        if value is None:
            continue
        try:
            parts.append(f"{label} {fmt.format(float(value))}")
        except (TypeError, ValueError):
            continue
    step_s = mean_step_s if mean_step_s is not None else metrics.get("time/step")
    if step_s is not None:
        parts.append(f"{float(step_s):.1f} s/step")
        parts.append(f"ETA {format_duration(float(step_s) * max(total_steps - step, 0))}")
    return " | ".join(parts)
