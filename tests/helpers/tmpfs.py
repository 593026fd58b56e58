"""A REAL small filesystem for full-disk tests: a tmpfs mounted for one test (root/CAP_SYS_ADMIN;
the test skips with the reason where mounting is not allowed), and a ballast file that fills it."""
from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest


@contextlib.contextmanager
def mounted_tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"oreal-test-{uuid.uuid4().hex[:8]}",
                          str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}); needs root/CAP_SYS_ADMIN")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(mnt: Path, leave: int = 0) -> Path:
    """Fill the filesystem with mnt/ballast, then free `leave` bytes; returns the ballast's path."""
    ballast = mnt / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    if leave:
        os.truncate(ballast, os.path.getsize(ballast) - leave)
    return ballast
