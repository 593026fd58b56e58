"""PreemptionHandler, finish_preemption, requeue_if_slurm and agree_any."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from helpers.torchrun import process_alive, pythonpath, run_torchrun
from megatron_oreal.launch.signals import EXIT_PREEMPTED, PreemptionHandler, requeue_if_slurm

WORKER = Path(__file__).with_name("preempt_worker.py")
REPO = Path(__file__).resolve().parents[3]


def test_exit_code_is_distinct_from_crashes_and_signal_deaths():
    assert EXIT_PREEMPTED == 75  # EX_TEMPFAIL; documented in signals.py and examples/slurm/common.sh
    assert EXIT_PREEMPTED not in (0, 1, 2) and EXIT_PREEMPTED < 128
    common = (REPO / "examples" / "slurm" / "common.sh").read_text()
    assert f"OREAL_EXIT_PREEMPTED={EXIT_PREEMPTED}" in common


def test_sigterm_mid_stage_finishes_stage_saves_exits_then_resumes(tmp_path):
    env = dict(os.environ, PYTHONPATH=pythonpath(REPO))
    cmd = [sys.executable, str(WORKER), "single", "--dir", str(tmp_path), "--steps", "4", "--stage-seconds", "0.6"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in proc.stdout:  # wait until stage 2 is running, then interrupt it
            if line.strip() == "stage 2 start":
                proc.send_signal(signal.SIGTERM)
                break
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "stage 3 start" not in rest  # stopped at the boundary after the interrupted stage
    assert "received SIGTERM: stopping after this stage" in err
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["step"] == 2 and state["signal"] == "SIGTERM"
    assert min(state["stages"]) >= 0.6  # the interrupted stage ran to its end
    # The rerun resumes at stage 3 and finishes.
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:3] == ["stage", "3", "start"]
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["step"] == 4 and len(state["stages"]) == 4 and state["signal"] is None


def test_handler_records_first_signal_and_keeps_handlers_while_stopping():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as h:
        assert not h.requested and h.signal_name is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert h.requested and h.signal_name == "SIGUSR1" and h.count == 2
        assert h.should_stop()  # no process group: the local flag
    # A stop is under way: a late SIGTERM (e.g. from `scontrol requeue`) must not kill the exit.
    assert signal.getsignal(signal.SIGTERM) == h._handle
    h.uninstall(keep_if_requested=False)
    assert signal.getsignal(signal.SIGUSR1) is before
    with PreemptionHandler():
        pass
    assert signal.getsignal(signal.SIGUSR1) is before  # nothing requested: restored on exit


def test_install_outside_main_thread_is_an_error():
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, PreemptionHandler().install)))
    t.start()
    t.join()
    assert "main thread" in str(errors[0].value)


class FakeScontrol:
    """Records scontrol calls; answers `show job` with the given state and `requeue` with rc."""

    def __init__(self, state: str | None, requeue_rc: int = 0):
        self.state, self.requeue_rc, self.calls = state, requeue_rc, []

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd[1:])
        if cmd[1] == "show":
            if self.state is None:
                return subprocess.CompletedProcess(cmd, 1, "", "slurm_load_jobs error")
            return subprocess.CompletedProcess(cmd, 0, f"JobId=42 JobName=x JobState={self.state} Reason=None\n", "")
        return subprocess.CompletedProcess(cmd, self.requeue_rc, "", "Invalid job id" if self.requeue_rc else "")


def test_requeue_only_under_slurm_and_only_when_running():
    fake = FakeScontrol("RUNNING")
    assert requeue_if_slurm({}, runner=fake) is False and fake.calls == []  # not a Slurm job
    assert requeue_if_slurm({"SLURM_JOB_ID": "42"}, runner=fake) is True
    assert fake.calls == [["show", "job", "-o", "42"], ["requeue", "42"]]
    # scancel / time limit: the job is already COMPLETING when the tasks get SIGTERM.
    for state in ("COMPLETING", "CANCELLED", "TIMEOUT"):
        fake = FakeScontrol(state)
        assert requeue_if_slurm({"SLURM_JOB_ID": "42"}, runner=fake) is False
        assert ["requeue", "42"] not in fake.calls
    fake = FakeScontrol(None)  # state unreadable: still try
    assert requeue_if_slurm({"SLURM_JOB_ID": "42"}, runner=fake) is True
    fake = FakeScontrol("RUNNING", requeue_rc=1)  # rejected: reported, not raised
    assert requeue_if_slurm({"SLURM_JOB_ID": "42"}, runner=fake) is False


@pytest.mark.slow
def test_ranks_agree_to_stop_at_the_same_step():
    """Only rank 1 is signalled (mid stage 2); both ranks stop after stage 2 and return EXIT_PREEMPTED."""
    out = run_torchrun(WORKER, 2, ["dist", "--steps", "5", "--stage-seconds", "0.4"], timeout=180)
    lines = sorted((json.loads(x) for x in out.splitlines() if x.startswith("{")), key=lambda d: d["rank"])
    assert lines == [
        {"rank": 0, "stop_step": 2, "requested": False, "signal": None, "code": EXIT_PREEMPTED},
        {"rank": 1, "stop_step": 2, "requested": True, "signal": "SIGUSR1", "code": EXIT_PREEMPTED},
    ]


def test_flag_file_requests_a_stop_without_a_signal(tmp_path, monkeypatch):
    flag = tmp_path / "oreal-preempt-7.0"
    monkeypatch.setenv("OREAL_PREEMPT_FILE", str(flag))
    with PreemptionHandler() as h:  # the path comes from the environment, as common.sh sets it
        assert h.flag_file == str(flag) and not h.requested
        flag.write_text("SIGUSR1\n")
        assert h.requested and h.signal_name == "SIGUSR1" and h.count == 0
    h.uninstall(keep_if_requested=False)  # give pytest its own handlers back
    assert not PreemptionHandler(flag_file="").requested  # "" turns the file off


EARLY = """
import os, signal, sys, time
from megatron_oreal.launch import signals
signals.install_early()
os.kill(os.getpid(), signal.SIGUSR1)   # arrives while 'imports' are still running
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.1)
h = signals.PreemptionHandler(flag_file="").install()
print(h.requested, h.signal_name, h.count)
"""


def test_signals_before_the_loop_are_recorded_not_fatal():
    """A USR1 in the first seconds used to kill the trainer with 138: install_early records it and
    the loop's handler takes it over."""
    res = subprocess.run([sys.executable, "-c", EARLY], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=pythonpath(REPO)))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "SIGUSR1", "2"]
    assert "received SIGUSR1 while starting: stopping before the first step" in res.stderr


CHILDREN = """
import multiprocessing as mp, os, signal, sys, time
from megatron_oreal.launch.signals import PreemptionHandler, shield_children

def child_main(q):
    q.put(os.getpid())
    time.sleep(1.0)   # signals arrive here, before the child installs anything (default action: death)

if __name__ == "__main__":
    h = PreemptionHandler(flag_file="").install()
    ctx = mp.get_context(sys.argv[1])
    q = ctx.Queue()
    with shield_children():
        p = ctx.Process(target=child_main, args=(q,))
        p.start()
    pid = q.get(timeout=30)
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR1):
        os.kill(pid, sig)
    os.kill(os.getpid(), signal.SIGUSR1)  # and the trainer itself still gets its stop request
    p.join(30)
    print(p.exitcode, h.requested, h.signal_name, h.count)
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_children_started_under_the_shield_survive_the_job_step_signals(tmp_path, method):
    """`scancel --signal=USR1` signals every process; a writer/verifier child must not die of it, and
    a forked child's inherited handler must not act (only the trainer records one stop)."""
    script = tmp_path / "children.py"
    script.write_text(CHILDREN)
    res = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=pythonpath(REPO)))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["0", "True", "SIGUSR1", "1"], res.stdout + res.stderr
    assert res.stderr.count("received SIGUSR1") == 1  # the trainer's; a forked child stays silent


ORPHAN = """
import multiprocessing as mp, os, signal, sys, time
from megatron_oreal.launch.signals import exit_with_parent, ignore_preemption_signals

def child_main(q, watch):
    ignore_preemption_signals()  # as every CLI child does: a SIGTERM would not end it either
    if watch:
        exit_with_parent(poll_s=0.1)
    q.put(os.getpid())
    time.sleep(60)  # a server waiting for connections that never come (Megatron's writer Manager)

if __name__ == "__main__":
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=child_main, args=(q, sys.argv[1] == "watch"))
    p.start()
    print(q.get(timeout=60), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the trainer dies without shutting its children down
"""


@pytest.mark.parametrize("watch", [True, False])
def test_spawned_child_exits_when_the_trainer_is_killed(tmp_path, watch):
    """After a kill -9 of its parent a child that ignores SIGTERM stays forever unless it watches the
    parent (exit_with_parent, run by every CLI child in megatron_oreal/__main__.py)."""
    import time

    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    out = tmp_path / "out.txt"
    with open(out, "w") as f:  # a file, not a pipe: the orphan keeps its copy of the descriptor open
        code = subprocess.run([sys.executable, str(script), "watch" if watch else "plain"], stdout=f,
                              stderr=subprocess.STDOUT, timeout=120, env=dict(os.environ, PYTHONPATH=pythonpath(REPO))).returncode
    assert code == -signal.SIGKILL, out.read_text()
    child = int(out.read_text().split()[0])
    deadline = time.monotonic() + 5.0
    while process_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert process_alive(child) is not watch
    finally:
        if process_alive(child):
            os.kill(child, signal.SIGKILL)
