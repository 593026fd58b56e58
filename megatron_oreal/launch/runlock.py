"""One trainer per run dir: an advisory lock on RUN_DIR/.lock, held by rank 0 for the run's life.

Two trainers on one run dir (a job resubmitted while the old one still runs) delete each other's
temporary checkpoints and write duplicate steps; the second one must refuse before it touches anything.

The lock is `flock` on RUN_DIR/.lock: the kernel releases it when the holding process exits in any
way (kill -9 included), so a lock left by a dead process on this host never blocks. The file also
records who holds it ({"host", "pid", "start", "started_at", "argv"}) so that the refusal can name
the holder, and for the two cases flock alone gets wrong:
  * flock still held, but by orphans of a dead trainer (a child that inherited the open file): the
    recorded pid is dead or was reused (its start time differs), so the lock is stale: taken over.
  * filesystems without flock (Lustre mounted `noflock`: ENOLCK/EOPNOTSUPP): the record decides; a
    holder on another host counts as alive while it refreshes the file's mtime (every HEARTBEAT_S, a
    daemon thread), stale after STALE_S without a refresh (a dead host).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class RunDirLocked(RuntimeError):
    """Another live trainer holds the run dir; the message names it."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive_here(pid: int, start: str | None) -> bool:
    now = _proc_start(pid)
    if now is None:
        try:
            os.kill(pid, 0)  # no /proc (not Linux): existence only
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not Path("/proc").is_dir()
    return start is None or now == start  # a different start time: the pid was reused


def describe(holder: dict) -> str:
    when = holder.get("started_at")
    since = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(when)) if when else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{since}"


class RunDirLock:
    def __init__(self, run_dir: str | Path, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.path = Path(run_dir) / LOCK_NAME
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.fd: int | None = None
        self.note = ""  # what acquire() found (a stale lock taken over), for the log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict) -> bool:
        if not holder.get("pid"):
            return True  # an empty/garbled record: its writer died before finishing it
        if holder.get("host") == socket.gethostname():
            return not _alive_here(int(holder["pid"]), holder.get("start"))
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return True
        return age > self.stale_s

    def acquire(self) -> RunDirLock:
        """Take the lock or raise RunDirLocked naming the holder. Nothing in the run dir is changed on refusal."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            locked = False
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            locked = None  # no flock on this filesystem: the record alone decides
        holder = self._read()
        if locked is False and not holder:  # the holder may be between its flock and its first write
            time.sleep(0.5)
            holder = self._read()
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            holder = {}  # our own record (a second acquire in the same process)
        if locked is not True and holder and not self._stale(holder):
            os.close(fd)
            raise RunDirLocked(f"run dir {self.path.parent} is in use by another trainer ({describe(holder)}; "
                               f"lock file {self.path}); stop that run or choose another run_dir")
        if holder:
            if locked is False or self._stale(holder):
                self.note = f"took over the stale lock of {describe(holder)} (that process is gone)"
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _proc_start(os.getpid()),
              "started_at": time.time(), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        self._thread = threading.Thread(target=self._beat, name="run-dir-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a full disk or a vanished dir: the lock is only as good as the file

    def release(self) -> None:
        """Clear the record and unlock (the kernel also unlocks on any exit)."""
        if self.fd is None:
            return
        self._stop.set()
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)  # closing the last descriptor drops the flock
        self.fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
