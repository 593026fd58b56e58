"""StageTimer accounting with a fake clock; TensorBoard scalars read back; the console line."""

import math

import torch

import pytest

from megatron_oreal.observability.tb import MetricsWriter, console_line, format_duration
from megatron_oreal.observability.timers import StageTimer, peak_memory_gb


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_stage_timer_accumulates_per_step():
    clock = FakeClock()
    timer = StageTimer(clock=clock, track_memory=False)
    with timer.stage("rollout"):
        clock.t += 3.0
    clock.t += 0.5  # untimed gap still counts in time/step
    for _ in range(2):  # a stage entered twice accumulates
        with timer.stage("policy"):
            clock.t += 1.25
    assert timer.elapsed("policy") == 2.5
    assert timer.step_end() == {"time/rollout": 3.0, "time/policy": 2.5, "time/step": 6.0}
    with timer.stage("reward"):
        clock.t += 2.0
    assert timer.step_end() == {"time/reward": 2.0, "time/step": 2.0}  # fresh step


def test_stage_timer_errors_and_exceptions():
    clock = FakeClock()
    timer = StageTimer(clock=clock, track_memory=False)
    with pytest.raises(ZeroDivisionError):
        with timer.stage("reward"):
            clock.t += 1.0
            1 / 0
    assert timer.elapsed("reward") == 1.0  # time is charged even when the stage raised
    with pytest.raises(RuntimeError, match="'a' entered while already running"):
        with timer.stage("a"):
            with timer.stage("a"):
                pass
    with timer.stage("b"):
        with pytest.raises(RuntimeError, match="inside stage"):
            timer.step_end()


def test_peak_memory_is_process_rss_on_cpu():
    gb = peak_memory_gb()
    assert 0.01 < gb < 64
    assert "memory/peak_gb" in StageTimer().step_end()


def test_step_cpu_seconds_count_this_process_work():
    import time

    timer = StageTimer()
    timer.step_end()
    t = time.process_time()
    while time.process_time() - t < 0.2:  # busy: CPU time accrues
        pass
    busy = timer.step_end()["cpu/step_s"]
    time.sleep(0.2)  # idle: wall time passes, CPU time does not
    idle = timer.step_end()["cpu/step_s"]
    assert busy >= 0.19 and idle < 0.1


_PEAK_PROBE = """
from megatron_oreal.observability.timers import peak_memory_gb
import torch
base = peak_memory_gb(reset=True)
x = torch.ones(50_000_000)  # 0.19 GiB, touched, then returned to the OS
del x
peak = peak_memory_gb(reset=True)
after = peak_memory_gb()
print(base, peak, after)
"""


def test_cpu_peak_memory_sees_a_freed_allocation_until_reset():
    import os
    import subprocess
    import sys

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no /proc/self/clear_refs: the CPU peak cannot be reset here")
    # A fresh process: inside the suite's long-lived one, earlier tests' freed memory can be reused
    # without raising the resident set, which says nothing about the reset.
    out = subprocess.run([sys.executable, "-c", _PEAK_PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    base, peak, after = map(float, out.stdout.split())
    assert peak >= base + 0.15
    assert after <= peak - 0.1  # the next step does not inherit this one's peak


def test_metrics_writer_rank0_only(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    import torch

    w = MetricsWriter(tmp_path / "tb", enabled=True, rank=0)
    n = w.write(3, {"loss/kl": 0.25, "reward/mean": torch.tensor(0.5), "bad": float("nan"),
                    "name": "text", "flag": True})
    w.write(4, {"loss/kl": 0.125})
    w.close()
    assert n == 2
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["loss/kl", "reward/mean"]
    assert [(e.step, e.value) for e in acc.Scalars("loss/kl")] == [(3, 0.25), (4, 0.125)]
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(3, 0.5)]  # same event as loss/kl
    other = MetricsWriter(tmp_path / "tb1", enabled=True, rank=1)
    assert other.write(0, {"x": 1.0}) == 0 and not (tmp_path / "tb1").exists()
    assert MetricsWriter(tmp_path / "tb2", enabled=False).write(0, {"x": 1.0}) == 0


def test_console_line():
    m = {"reward/mean": 0.125, "reward/pass_rate": 0.5625, "loss/positive": 0.41, "loss/kl": 0.002,
         "kl/ref": 0.0123, "time/step": 41.2, "mfu": float("nan")}
    line = console_line(12, 90, m)
    assert line == ("step 12/90 | reward +0.125 | pass 56.2% | L+ 0.4100 | Lkl 0.0020 | kl 0.0123 | "
                    "mfu nan% | 41.2 s/step | ETA 53m34s")
    assert console_line(90, 90, {}, mean_step_s=10.0).endswith("10.0 s/step | ETA 0s")
    assert format_duration(9000) == "2h30m" and format_duration(math.inf) == "?"


def test_console_fields_are_reference_metrics():
    from megatron_oreal.observability.tb import CONSOLE_FIELDS, REFERENCE_METRICS

    # every loss/reward the console prints is one the reference trainer logs (docs/algorithm.md §11)
    assert {k for k, _, _ in CONSOLE_FIELDS if k.startswith(("loss/", "reward/", "kl/"))} <= set(REFERENCE_METRICS)
    assert REFERENCE_METRICS["loss/token_rm"] == "token_level_rm_loss"


def test_step_start_discards_work_between_steps():
    # start-up work (initial weight sync, step-0 eval) happens before the first step: not its time
    clock = FakeClock()
    timer = StageTimer(clock=clock, track_memory=False)
    with timer.stage("weight_sync"):
        clock.t += 40.0
    clock.t += 100.0  # step-0 eval, untimed
    timer.step_start()
    with timer.stage("rollout"):
        clock.t += 3.0
    clock.t += 1.0
    assert timer.step_end() == {"time/rollout": 3.0, "time/step": 4.0}
