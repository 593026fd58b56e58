"""Preemption: catch SIGTERM/SIGUSR1, let the current stage finish, checkpoint, exit, requeue.

A signal handler here only records that a stop was asked for; the training loop polls
`handler.should_stop()` between stages (never inside a collective), so every rank stops at the same
step boundary, saves a consistent checkpoint and exits with `EXIT_PREEMPTED`.

Where the requests come from (measured on Slurm 22.05, see tests/slurm/):
  * `#SBATCH --signal=B:USR1@300`: USR1 to the batch shell ~5 min (up to a minute early) before
    the time limit; examples/slurm/common.sh turns it into the file $OREAL_PREEMPT_FILE, which
    `requested` checks (only rank 0 has to see it: `should_stop()` ORs over ranks).
  * USR1 sent to the tasks directly (`scancel --signal=USR1 <job>`, `--signal=USR1@N` without B:):
    Slurm delivers it to every process of the task, children included, so worker processes should
    call `ignore_preemption_signals()`.
  * preemption with a GraceTime, `scancel`, and the time limit itself: SIGTERM to the tasks,
    then SIGKILL after KillWait.
  * under torchrun, torchrun itself catches SIGTERM and passes it to the workers, killing them
    ~30 s later (torch/distributed/elastic/multiprocessing/api.py); a USR1 would kill torchrun
    (it handles only TERM/INT/HUP/QUIT), which is one more reason for the flag file.

Requeue. A job that ends by itself during a preemption grace period ends COMPLETED and Slurm
does not requeue it, so the trainer requeues itself: after the checkpoint is complete on every rank
(after a barrier), one rank calls `requeue_if_slurm()`. Only a RUNNING job is requeued: after a
user's `scancel` (or at the time limit itself) the job is already COMPLETING when the SIGTERM
arrives, and the user's cancel must win. The requeued run sees SLURM_RESTART_COUNT >= 1 and resumes from the
checkpoint.

This module imports neither Megatron nor torch at import time (torch only inside `agree_any`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping

# Exit status of a run that stopped on a preemption signal after saving its checkpoint.
# 75 is EX_TEMPFAIL from sysexits.h ("temporary failure; the user is invited to retry"): it cannot
# be confused with a crash (1), a usage error (2) or a death by signal as shells report it (128+N,
# e.g. 143 for SIGTERM, 138 for SIGUSR1), so scripts can tell "stopped cleanly, resume me" apart.
EXIT_PREEMPTED = 75

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# A file whose appearance also asks for a stop (examples/slurm/common.sh sets it). The batch shell's
# USR1 warning is turned into this file rather than forwarded as a signal, because Slurm signals
# every process of a task: spawned/forkserver children (the verifier pool, Megatron's checkpoint
# writers) would die of the default USR1 action. Measured: a 2-rank tiny run whose USR1 was
# forwarded to the tasks lost such children and deadlocked in the next checkpoint.
PREEMPT_FILE_ENV = "OREAL_PREEMPT_FILE"


# Signals that arrive before the loop's handler exists (imports, config, model building take seconds
# to minutes, and a USR1 with the default action kills the process with 138): `install_early()`, the
# first thing the CLI does, records them here, and PreemptionHandler.install() takes them over.
_early: dict = {"name": None, "count": 0, "at": None, "pid": None}


def _early_handle(signum: int, frame) -> None:  # noqa: ARG001 - signal handler signature
    if os.getpid() != _early["pid"]:
        return  # a forked child (checkpoint writer): only the trainer acts on a stop
    _early["count"] += 1
    if _early["name"] is None:
        _early["name"], _early["at"] = signal.Signals(signum).name, time.monotonic()
    os.write(2, f"[oreal] received {signal.Signals(signum).name} while starting: stopping before the first step\n"
             .encode())


def install_early() -> None:
    """Record preemption signals from now on (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _early["pid"] = os.getpid()
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, _early_handle)


class PreemptionHandler:
    """Records the first preemption signal; the loop polls `requested` / `should_stop()` between stages.

    Use as a context manager (or `install()` / `uninstall()`), from the main thread:

        with PreemptionHandler() as preempt:
            for step in ...:
                run_stages(...)
                if preempt.should_stop():          # all ranks agree
                    save_checkpoint(...)
                    return finish_preemption(rank == 0, torch.distributed.barrier)
    """

    def __init__(self, signals: Iterable[int] = PREEMPTION_SIGNALS, flag_file: str | None = None):
        self.signals = tuple(signal.Signals(s) for s in signals)
        # None: take it from $OREAL_PREEMPT_FILE; "" : no file.
        self.flag_file = os.environ.get(PREEMPT_FILE_ENV, "") if flag_file is None else flag_file
        self.signal_name: str | None = None  # name of the first signal received, e.g. "SIGUSR1"
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self.count = 0  # signals received so far (a second one changes nothing: we still finish the stage)
        self._previous: dict[signal.Signals, object] = {}
        self._pid = os.getpid()

    @property
    def requested(self) -> bool:
        if self.signal_name is None and self.flag_file and os.path.exists(self.flag_file):
            try:
                text = open(self.flag_file).read().strip()
            except OSError:
                text = ""
            self.signal_name = text or "SIGUSR1"
            self.received_at = time.monotonic()
            _log(f"stop requested ({self.signal_name} via {self.flag_file}): stopping after this stage")
        return self.signal_name is not None

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        if os.getpid() != self._pid:
            # A forked child (Megatron's checkpoint writers fork) inherits this handler; Slurm signals
            # it too. Only the trainer decides to stop; the child finishes its write.
            return
        self.count += 1
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            self.received_at = time.monotonic()
        # os.write, not print: print from a handler can hit a reentrant buffered-writer error.
        os.write(2, f"[oreal] received {signal.Signals(signum).name}: stopping after this stage\n".encode())

    def install(self) -> PreemptionHandler:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must run in the main thread (Python delivers signals there)")
        self._pid = os.getpid()
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        if _early["name"] is not None and _early["pid"] == self._pid and self.signal_name is None:
            self.signal_name, self.received_at = _early["name"], _early["at"]
            self.count += _early["count"]
        return self

    def uninstall(self, keep_if_requested: bool = True) -> None:
        """Restore the previous handlers, except while a stop is under way.

        After a stop was requested the process is saving and exiting, and `scontrol requeue` sends
        it SIGTERM on purpose: with the default action restored, that SIGTERM would kill the
        teardown and turn the documented exit 75 into 143 (seen with the real trainer on Slurm).
        Slurm's SIGKILL after KillWait still ends a process that hangs.
        """
        if keep_if_requested and self.requested:
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def should_stop(self, group=None) -> bool:
        """True on every rank when any rank received a signal (a collective: call it on all ranks)."""
        return agree_any(self.requested, group)


def finish_preemption(is_main: bool, barrier=None, environ: Mapping[str, str] | None = None) -> int:
    """After every rank has saved its checkpoint: requeue once, then return EXIT_PREEMPTED on all ranks.

    The order matters. `srun --kill-on-bad-exit` ends the whole step as soon as one task exits
    non-zero, and `scontrol requeue` ends the running job (SIGTERM, SIGKILL after KillWait), so:
    barrier (every shard is on disk) -> the main rank requeues -> barrier (nobody exits before the
    requeue was accepted) -> exit. The SIGTERM that the requeue sends lands in the installed
    handler and changes nothing. `barrier` is e.g. `torch.distributed.barrier` (None: one process).
    """
    if barrier is not None:
        barrier()
    if is_main:
        requeue_if_slurm(environ)
    if barrier is not None:
        barrier()
    return EXIT_PREEMPTED


def agree_any(flag: bool, group=None) -> bool:
    """Logical OR of `flag` over the ranks of `group` (MAX all-reduce); the flag itself without a process group.

    Signals reach ranks at slightly different times; without this, one rank could stop at step N
    and another at N+1, and the next collective would hang.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return bool(flag)
    device = "cpu"
    if dist.get_backend(group) == "nccl":  # NCCL reduces only CUDA tensors
        device = f"cuda:{torch.cuda.current_device()}"
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


@contextlib.contextmanager
def shield_children():
    """Block SIGTERM/SIGUSR1 in this thread while child processes are started (verifier pool,
    engine, Megatron's checkpoint writers and their spawned Manager).

    A child inherits the blocked mask across fork and exec, so a signal sent to the whole job step
    (`scancel --signal=USR1`) stays pending in it - harmless - until it sets SIG_IGN (then the
    pending one is discarded), instead of killing it with the default action in the moment before
    its own code runs. The trainer loses nothing: the other threads still take the signal, and what
    reached this thread is delivered to the handler when the block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_preemption_signals() -> None:
    """For worker-process initialisers (verifier pool, data loaders): leave preemption to the main process.

    Slurm signals every process of a step task, children included; a worker with the default
    action would die on SIGUSR1 (and on SIGTERM) before the trainer has saved. SIG_IGN is inherited
    across fork and exec, so the children of an ignoring process ignore too. Every spawned or
    forkserver child of the CLI runs this first (megatron_oreal/__main__.py, as `__mp_main__`).
    """
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def exit_with_parent(poll_s: float = 1.0) -> None:
    """For spawned children of the CLI: exit as soon as the process that started this one is gone.

    They ignore SIGTERM/SIGUSR1 (above), and one of them never ends by itself: Megatron's checkpoint
    writer starts a `multiprocessing` Manager, a server that waits for connections forever. When the
    trainer dies without shutting it down (kill -9, the OOM killer, Slurm's SIGKILL after KillWait) it
    stayed behind, ~270 MB per rank, measured after tests/e2e's kill -9 runs. A daemon thread
    polls the parent pid (PR_SET_PDEATHSIG would fire when the starting *thread* ends, and the
    trainer may start children from short-lived threads) and exits with status 0 when it changes.
    """
    parent = os.getppid()
    if parent <= 1:
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _log(msg: str) -> None:
    print(f"[oreal] {msg}", file=sys.stderr, flush=True)


def slurm_job_state(job_id: str, runner=subprocess.run) -> str | None:
    """JobState from `scontrol show job -o <id>` (e.g. RUNNING, CANCELLED); None when it cannot be read."""
    try:
        out = runner(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    for field in out.stdout.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None


def requeue_if_slurm(environ: Mapping[str, str] | None = None, *, runner=subprocess.run) -> bool:
    """`scontrol requeue $SLURM_JOB_ID` when running under Slurm; True when the requeue was accepted.

    Call it once (one rank), after the checkpoint is complete on every rank: Slurm ends the running
    job when it requeues it. Not under Slurm (no SLURM_JOB_ID), or when the job is not RUNNING
    (`scancel` makes it COMPLETING before the tasks see SIGTERM: the user's cancel must win), it
    does nothing and returns False. When the state cannot be read it still tries.
    """
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        return False
    if runner is subprocess.run and shutil.which("scontrol") is None:
        _log(f"cannot requeue Slurm job {job_id}: scontrol is not on PATH")
        return False
    state = slurm_job_state(job_id, runner)
    if state is not None and state != "RUNNING":
        # Measured (Slurm 22.05): after `scancel` the tasks get SIGTERM while the job is already
        # COMPLETING; the time limit ends it the same way. Only a RUNNING job (USR1 warning,
        # preemption grace period, an admin's signal) is asking to be resumed later.
        _log(f"Slurm job {job_id} is {state} (cancelled or ending), not RUNNING: not requeueing")
        return False
    try:
        out = runner(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _log(f"scontrol requeue {job_id} failed: {exc}")
        return False
    if out.returncode != 0:
        _log(f"scontrol requeue {job_id} failed (rc {out.returncode}): {(out.stderr or out.stdout).strip()}")
        return False
    _log(f"requeued Slurm job {job_id} (it restarts with SLURM_RESTART_COUNT incremented)")
    return True
