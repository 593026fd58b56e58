"""Jobs on a real local Slurm (see conftest.py): the tiny-run sbatch script, preemption and requeue.

The job script under test is always the real examples/slurm/tiny_cpu.sbatch. The first tests run
tests/slurm/standin_train.py through OREAL_TRAIN_CMD (same launch path: srun, dist_env, gloo,
PreemptionHandler, finish_preemption) to check the rendezvous and the step accounting exactly and
quickly; the last one runs the real trainer (the script's own `python -m megatron_oreal train`)
on a tiny model through a preemption, a self-requeue and a resume.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.torchrun import pythonpath
from megatron_oreal.launch.signals import EXIT_PREEMPTED

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "slurm" / "tiny_cpu.sbatch"
STANDIN = [sys.executable, "tests/slurm/standin_train.py"]


@pytest.fixture
def jobs():
    """Job ids submitted by a test; cancelled at teardown so a failed test leaves nothing queued."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


def _submit(jobs: list[str], out_dir: Path, train_cmd: list[str], *extra: str) -> str:
    env = dict(os.environ, OREAL_TRAIN_CMD=" ".join(train_cmd), PYTHONPATH=pythonpath(REPO))
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={REPO}", f"--output={out_dir}/%x-%j.out", "--export=ALL", *extra, str(SCRIPT)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, f"sbatch {SCRIPT} failed: {proc.stderr}"
    jobs.append(proc.stdout.strip().split(";")[0])
    return jobs[-1]


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    fields = dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)
    return fields


def _wait(what: str, predicate, timeout: float, job_id: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], timeout=30)
    text = log.read_text() if log is not None and log.exists() else "(no log)"
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; job {job_id}: {_job(job_id)}\nlog:\n{text}")


def _finished(job_id: str):
    state = _job(job_id).get("JobState", "")
    return state if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") else None


def test_tiny_sbatch_two_ranks_allreduce(slurm_cluster, jobs, tmp_path):
    """2 tasks from the sbatch script find each other via dist_env() and all-reduce over gloo."""
    t0 = time.monotonic()
    job = _submit(jobs, tmp_path, [*STANDIN, "--state-dir", str(tmp_path), "--steps", "3"])
    log = tmp_path / f"oreal-tiny-{job}.out"
    state = _wait("the job to finish", lambda: _finished(job), 300, job, log)
    text = log.read_text()
    assert state == "COMPLETED", f"job {job} ended {state}:\n{text}"
    result = json.loads((tmp_path / "result.json").read_text())
    host = socket.gethostname().split(".")[0]
    ranks = sorted(result["ranks"])
    # [rank, local_rank, local_world_size, hostname, master_addr, master_port]
    assert [r[:3] for r in ranks] == [[0, 0, 2], [1, 1, 2]]
    assert {r[4] for r in ranks} == {host}  # MASTER_ADDR from `scontrol show hostnames`
    assert {r[5] for r in ranks} == {20000 + int(job) % 20000}
    assert result["allreduce_sum"] == 1 + 2
    assert result["state"]["total"] == 3 * (1 + 2) and result["state"]["step"] == 3
    (run,) = result["state"]["runs"]
    assert run == {"restart_count": 0, "start_step": 0, "launcher": "slurm", "world_size": 2,
                   "stop_step": 3, "signal": None, "exit_code": 0}  # fmt: skip
    assert f"rendezvous {host}:{20000 + int(job) % 20000}" in text
    assert "step exited with status 0" in text
    print(f"2-rank sbatch job: {time.monotonic() - t0:.1f} s")


def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, jobs, tmp_path):
    """USR1 to the batch shell -> flag file -> ranks stop at a step boundary, save, exit 75, self-requeue
    -> the requeued run resumes from the saved step and finishes."""
    t0 = time.monotonic()
    steps = 6
    job = _submit(jobs, tmp_path, [*STANDIN, "--state-dir", str(tmp_path), "--steps", str(steps), "--step-seconds", "1"])
    log = tmp_path / f"oreal-tiny-{job}.out"
    progress = tmp_path / "progress"
    _wait("step 2", lambda: progress.exists() and progress.read_text().strip() not in ("", "1"), 300, job, log)
    # What `#SBATCH --signal=B:USR1@120` does at the time limit, without waiting for it.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
    t_signal = time.monotonic()
    info = _wait("the requeued run to finish", lambda: _finished(job) and _job(job), 400, job, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", f"job {job} ended {info['JobState']}:\n{text}"
    assert info["Restarts"] == "1", f"expected exactly one requeue:\n{text}"
    state = json.loads((tmp_path / "state.json").read_text())
    first, second = state["runs"]
    assert first["restart_count"] == 0 and first["signal"] == "SIGUSR1"
    assert first["exit_code"] == EXIT_PREEMPTED
    assert 2 <= first["stop_step"] < steps, "the run must stop at a step boundary after the signal, not at the end"
    assert second["restart_count"] == 1 and second["start_step"] == first["stop_step"]  # resumed, not restarted
    assert second["stop_step"] == steps and second["signal"] is None
    assert state["total"] == steps * (1 + 2)  # every step counted exactly once across the two runs
    # The log (appended across restarts) shows the forwarding, the requeue, the exit code and the rerun.
    assert "batch shell got USR1: asking the ranks to stop via" in text
    assert text.count("stop requested (SIGUSR1 via") == 2  # both ranks saw the flag file
    assert "received SIGUSR1" not in text  # no signal reached the tasks (or their children)
    assert "requeued Slurm job" in text
    assert f"exit {EXIT_PREEMPTED}" in text or f"exit code {EXIT_PREEMPTED}" in text
    assert "restart 1:" in text and "step exited with status 0" in text
    print(f"preempt+requeue job: {time.monotonic() - t0:.1f} s ({time.monotonic() - t_signal:.1f} s after USR1)")


_CANCEL_PROBE = """
import sys, time
from megatron_oreal.launch.signals import PreemptionHandler, requeue_if_slurm
with PreemptionHandler() as p:
    print("ready", flush=True)
    while not p.requested:
        time.sleep(0.05)
    print("got", p.signal_name, "requeued:", requeue_if_slurm(), flush=True)
"""


def test_user_scancel_is_not_requeued(slurm_cluster, jobs, tmp_path):
    """A plain `scancel` also sends SIGTERM, but the user's cancel must win over our self-requeue."""
    probe = tmp_path / "probe.py"
    probe.write_text(_CANCEL_PROBE)
    env = dict(os.environ, PYTHONPATH=pythonpath(REPO))
    proc = subprocess.run(
        ["sbatch", "--parsable", "--requeue", "-n1", f"--chdir={REPO}", f"--output={tmp_path}/cancel-%j.out",
         "--export=ALL", f"--wrap=srun {sys.executable} {probe}"],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    )  # fmt: skip
    job = proc.stdout.strip().split(";")[0]
    jobs.append(job)
    log = tmp_path / f"cancel-{job}.out"
    _wait("the probe to start", lambda: log.exists() and "ready" in log.read_text(), 120, job, log)
    subprocess.run(["scancel", job], check=True, timeout=30)
    _wait("the probe's answer", lambda: "requeued:" in log.read_text(), 60, job, log)
    text = log.read_text()
    assert "got SIGTERM requeued: False" in text, text
    assert "not RUNNING: not requeueing" in text
    info = _wait("the job to end", lambda: _finished(job) and _job(job), 60, job, log)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0"



def _tiny_assets(root: Path, steps: int = 5) -> Path:
    """The e2e tests' tiny run, `steps` steps, checkpoint every step, no periodic eval."""
    from helpers.tiny_run import write_tiny_run

    return write_tiny_run(root, steps=steps, eval_rows=4, eval_every=0, html_every=0)


# Long enough that the USR1 sent after the first checkpoint lands before the run ends: a step and its
# checkpoint take ~0.3 s here, and with 5 steps the signal once arrived after the last one (the run
# finished normally; the fused CPU kernels had made the steps faster).
PREEMPTED_RUN_STEPS = 12


def test_real_trainer_preempted_requeued_resumes(slurm_cluster, jobs, tmp_path):
    """The real `python -m megatron_oreal train` through tiny_cpu.sbatch (2 ranks): USR1 after the first
    checkpoint -> stop at a step boundary, checkpoint, exit 75, requeue -> resume from that step -> finish."""
    t0 = time.monotonic()
    steps = PREEMPTED_RUN_STEPS
    cfg = _tiny_assets(tmp_path, steps)
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=pythonpath(REPO))
    env.pop("OREAL_TRAIN_CMD", None)  # the script's own command
    proc = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={REPO}", f"--output={tmp_path}/%x-%j.out", "--export=ALL", str(SCRIPT),
         str(cfg), f"run_dir={run_dir}"],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    )  # fmt: skip
    job = proc.stdout.strip().split(";")[0]
    jobs.append(job)
    log = tmp_path / f"oreal-tiny-{job}.out"
    latest = run_dir / "checkpoints" / "latest"
    _wait("the first checkpoint", latest.exists, 600, job, log)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)
    info = _wait("the requeued run to finish", lambda: _finished(job) and _job(job), 900, job, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"job {job}: {info}\n{text}"
    m = re.search(r"SIGUSR1 received: checkpoint written at step (\d+), exiting with code (\d+)", text)
    assert m, text
    stopped = int(m.group(1))
    assert 1 <= stopped < steps and int(m.group(2)) == EXIT_PREEMPTED
    assert f"Exited with exit code {EXIT_PREEMPTED}" in text  # srun saw the documented code on the ranks
    assert "requeued Slurm job" in text and "restart 1:" in text
    assert re.search(rf"resumed from \S+step_{stopped:06d} at step {stopped}", text), text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and latest.read_text().strip() == f"step_{steps:06d}"
    print(f"real tiny trainer, preempted at step {stopped} and resumed: {time.monotonic() - t0:.1f} s")
