"""A real one-node Slurm for the tests in this folder, started once per session when it is missing.

Order: a Slurm that already answers is used as is; otherwise, as root with apt-get, setup_slurm.sh
installs and starts one (and it is stopped again at the end of the session unless
OREAL_SLURM_KEEP=1); otherwise the tests skip, naming the reason. OREAL_REQUIRE_SLURM=1 turns
that skip into a failure (for CI machines that must run them).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

SETUP = Path(__file__).with_name("setup_slurm.sh")
LOCK_FILE = "/tmp/oreal-slurm-tests.lock"
_timings: dict[str, float] = {}


def _usable() -> bool:
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["bash", str(SETUP), "status"], capture_output=True, timeout=60).returncode == 0


def _unavailable(reason: str):
    if os.environ.get("OREAL_REQUIRE_SLURM") == "1":
        pytest.fail(f"Slurm required (OREAL_REQUIRE_SLURM=1) but unavailable: {reason}")
    pytest.skip(f"no local Slurm: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster():
    """Yields when sbatch/srun/scontrol work against a local controller with an idle node.

    Several test sessions may share the machine: a lock file serialises the set-up, each session
    holds it shared while it uses Slurm, and the session that started the daemons stops them only
    if it can then take the lock exclusively (no other session is still using them).
    """
    # Read-only is enough for flock, and works when another user created the file.
    lock = os.open(LOCK_FILE, os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        started = _ensure_running()
    except BaseException:  # a skip, or a failure: release the lock at once
        os.close(lock)
        raise
    fcntl.flock(lock, fcntl.LOCK_SH)  # downgrade: others may set up / use it now
    yield
    try:
        if started and os.environ.get("OREAL_SLURM_KEEP") != "1":
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises when another session uses it
            subprocess.run(["bash", str(SETUP), "stop"], capture_output=True, timeout=120)
    except BlockingIOError:
        pass  # still in use: leave it running
    finally:
        os.close(lock)


def _ensure_running() -> bool:
    """True when this call started the daemons."""
    if not _usable():
        if os.geteuid() != 0:
            _unavailable("Slurm is not running and we are not root (run `sudo tests/slurm/setup_slurm.sh start`)")
        if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
            _unavailable("Slurm is not installed and apt-get is not available to install it")
        t0 = time.monotonic()
        proc = subprocess.run(["bash", str(SETUP), "start"], capture_output=True, text=True, timeout=600)
        _timings["setup_s"] = time.monotonic() - t0
        if proc.returncode != 0:
            _unavailable(f"setup_slurm.sh start failed (rc {proc.returncode}): {proc.stderr[-1500:]}")
        return True
    return False


def pytest_terminal_summary(terminalreporter):
    if "setup_s" in _timings:
        terminalreporter.write_line(f"local Slurm set up by tests/slurm/setup_slurm.sh in {_timings['setup_s']:.1f} s")
