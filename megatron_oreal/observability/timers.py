"""Per-stage wall-clock timers and peak memory for the training loop.

    timer = StageTimer()
    with timer.stage("rollout"):
        ...
    metrics = timer.step_end()   # {"time/rollout": 12.3, ..., "time/step": 40.1, "memory/peak_gb": 61.0}

On GPUs each stage is bracketed by `torch.cuda.synchronize()` (kernels are asynchronous: without it a
stage would be charged for the previous stage's queued work) and an NVTX range of the same name, so an
Nsight Systems timeline shows the loop's stages (slime, verl and NeMo-RL all do this;
e.g. verl docs/perf/nsight_profiling.md, NeMo-RL docs/nsys-profiling.md).
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from typing import Callable, Iterator

import torch


def _cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def peak_memory_gb(reset: bool = False) -> float:
    """Peak memory of this rank since the last reset: CUDA max allocated when CUDA is in use, else the
    process's peak resident set (Linux VmHWM; `reset` clears it through /proc/self/clear_refs, so each
    step reports its own peak). Where neither file is usable: the resident set now."""
    if _cuda():
        peak = torch.cuda.max_memory_allocated() / 2**30
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return peak
    peak = _vm_hwm_bytes()
    if peak is None:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    if reset:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # "5" resets the peak RSS (proc(5)); the pages themselves stay
        except OSError:
            pass
    return peak / 2**30


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range on GPUs (visible in nsys), nothing on the CPU."""
    if not _cuda():
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


class StageTimer:
    """Accumulates seconds per stage within a step; `step_end()` returns them and starts a new step.

    A stage entered twice in one step (e.g. two forward passes timed as "forward") accumulates.
    `sync` defaults to synchronising only when CUDA is in use; `clock` is injectable for tests.
    """

    def __init__(self, sync: bool | None = None, clock: Callable[[], float] = time.perf_counter,
                 track_memory: bool = True) -> None:
        self._sync = sync
        self._clock = clock
        self._track_memory = track_memory
        self._times: OrderedDict[str, float] = OrderedDict()
        self._active: list[str] = []
        self._step_start = clock()
        self._cpu_start = time.process_time()

    def _synchronize(self) -> None:
        if (self._sync if self._sync is not None else _cuda()) and _cuda():
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if name in self._active:
            raise RuntimeError(f"StageTimer: stage {name!r} entered while already running (nested twice)")
        self._synchronize()
        self._active.append(name)
        start = self._clock()
        try:
            with nvtx_range(name):
                yield
                self._synchronize()
        finally:
            self._times[name] = self._times.get(name, 0.0) + (self._clock() - start)
            self._active.remove(name)

    def elapsed(self, name: str) -> float:
        return self._times.get(name, 0.0)

    def step_start(self) -> None:
        """Start a step's clock here, discarding stage times since the last step_end: work between steps
        (the initial weight sync, the step-0 or periodic eval, checkpoints) is not any step's time."""
        if self._active:
            raise RuntimeError(f"StageTimer.step_start() inside stage(s) {self._active}")
        self._times = OrderedDict()
        self._step_start = self._clock()

    def step_end(self) -> dict[str, float]:
        """Metrics of the finished step: `time/<stage>`, `time/step` (wall, including untimed gaps),
        `memory/peak_gb` (then the peak is reset so the next step reports its own) and `cpu/step_s`
        (this process's CPU seconds), the last two unless track_memory=False."""
        if self._active:
            raise RuntimeError(f"StageTimer.step_end() inside stage(s) {self._active}")
        now = self._clock()
        out = {f"time/{k}": v for k, v in self._times.items()}
        out["time/step"] = now - self._step_start
        if self._track_memory:
            out["memory/peak_gb"] = peak_memory_gb(reset=True)
            # CPU seconds this process spent in the step (all its threads): unlike wall time it barely
            # moves when other jobs share the cores, so it is what tools/bench_vs_trl.py compares too.
            cpu = time.process_time()
            out["cpu/step_s"] = cpu - self._cpu_start
            self._cpu_start = cpu
        self._times = OrderedDict()
        self._step_start = now
        return out
