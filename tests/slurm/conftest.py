"""A real one-node Slurm for the tests in this folder, started once per session when it is missing.

Order: a Slurm that already answers is used as is; otherwise, as root with apt-get, setup_slurm.sh
installs and starts one (and it is stopped again at the end of the session unless
OREAL_SLURM_KEEP=1); otherwise the tests skip, naming the reason. OREAL_REQUIRE_SLURM=1 turns
that skip into a failure (for CI machines that must run them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

SETUP = Path(__file__).with_name("setup_slurm.sh")
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
    """Yields when sbatch/srun/scontrol work against a local controller with an idle node."""
    started = False
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
        started = True
    yield
    if started and os.environ.get("OREAL_SLURM_KEEP") != "1":
        subprocess.run(["bash", str(SETUP), "stop"], capture_output=True, timeout=120)


def pytest_terminal_summary(terminalreporter):
    if "setup_s" in _timings:
        terminalreporter.write_line(f"local Slurm set up by tests/slurm/setup_slurm.sh in {_timings['setup_s']:.1f} s")
