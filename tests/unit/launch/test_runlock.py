"""The run-dir lock (launch/runlock.py): a second trainer refuses naming the holder; locks of dead
processes (killed -9, orphans holding the flock, a reused pid, a silent host) are recognised as stale."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_oreal.launch import runlock
from megatron_oreal.launch.runlock import RunDirLock, RunDirLocked

HOLD = """
import sys, time
from megatron_oreal.launch.runlock import RunDirLock
lock = RunDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


TRY = """
import sys
from megatron_oreal.launch.runlock import RunDirLock, RunDirLocked
try:
    RunDirLock(sys.argv[1]).acquire()
    print("acquired")
except RunDirLocked as exc:
    print("refused:", exc)
"""


REPO = str(Path(__file__).resolve().parents[3])
ENV = {**os.environ, "PYTHONPATH": REPO}


def holder(run_dir):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_trainer_refuses_naming_the_holder_then_takes_over_after_kill9(tmp_path):
    first = holder(tmp_path)
    try:
        record = (tmp_path / ".lock").read_text()
        with pytest.raises(RunDirLocked) as err:
            RunDirLock(tmp_path).acquire()
        msg = str(err.value)
        assert "\n" not in msg
        assert msg.startswith(f"run dir {tmp_path} is in use by another trainer (pid {first.pid} on host "
                              f"{socket.gethostname()} since ")
        assert (tmp_path / ".lock").read_text() == record  # the first trainer's lock is untouched
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    lock = RunDirLock(tmp_path).acquire()  # the kernel dropped the flock with the process
    assert lock.note == f"took over the stale lock of {runlock.describe(json.loads(record))} (that process is gone)"
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert (tmp_path / ".lock").read_text() == ""  # released: no holder recorded
    RunDirLock(tmp_path).acquire().release()


def test_flock_held_by_an_orphan_of_a_dead_trainer_is_stale(tmp_path):
    """A forked child keeps the inherited flock after its trainer died: the recorded pid decides."""
    code = HOLD.replace('print("locked", flush=True)\ntime.sleep(60)',
                        'import os\nif os.fork() == 0:\n    time.sleep(60)\nelse:\n    print("locked", flush=True)\n'
                        '    time.sleep(60)')
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                         start_new_session=True, env=ENV)
    try:
        assert p.stdout.readline().strip() == "locked"
        p.send_signal(signal.SIGKILL)  # the trainer dies; its forked child lives on holding the flock
        p.wait()
        lock = RunDirLock(tmp_path).acquire()
        assert lock.note.startswith(f"took over the stale lock of pid {p.pid} ")
        try:  # and now we hold it for a third trainer
            third = subprocess.run([sys.executable, "-c", TRY, str(tmp_path)], capture_output=True, text=True,
                                   env=ENV)
            assert f"refused: run dir {tmp_path} is in use by another trainer (pid {os.getpid()} " in third.stdout
        finally:
            lock.release()
    finally:
        os.killpg(p.pid, signal.SIGKILL)


def _no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")


def test_without_flock_the_record_decides(tmp_path, monkeypatch):
    """Lustre `noflock`: a live pid here, or a host whose heartbeat is fresh, holds; else stale."""
    monkeypatch.setattr(runlock.fcntl, "flock", _no_flock)
    path = tmp_path / ".lock"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = {"host": socket.gethostname(), "pid": sleeper.pid, "start": runlock._proc_start(sleeper.pid),
                "started_at": time.time()}
        path.write_text(json.dumps(live))
        with pytest.raises(RunDirLocked, match=f"pid {sleeper.pid} on host"):
            RunDirLock(tmp_path).acquire()
        path.write_text(json.dumps({**live, "start": "1"}))  # same pid, another start time: reused
        assert "stale lock" in RunDirLock(tmp_path).acquire().note
    finally:
        sleeper.kill()
        sleeper.wait()
    other = {"host": "node-that-died", "pid": 4242, "started_at": time.time()}
    path.write_text(json.dumps(other))
    with pytest.raises(RunDirLocked, match="pid 4242 on host node-that-died"):
        RunDirLock(tmp_path, stale_s=300).acquire()  # its heartbeat (the file's mtime) is fresh
    old = time.time() - 600
    os.utime(path, (old, old))
    assert "pid 4242 on host node-that-died" in RunDirLock(tmp_path, stale_s=300).acquire().note


def test_heartbeat_refreshes_the_lock_file(tmp_path):
    lock = RunDirLock(tmp_path, heartbeat_s=0.05).acquire()
    try:
        old = time.time() - 600
        os.utime(tmp_path / ".lock", (old, old))
        time.sleep(0.3)
        assert time.time() - (tmp_path / ".lock").stat().st_mtime < 5
    finally:
        lock.release()
