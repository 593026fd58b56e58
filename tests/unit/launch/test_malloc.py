"""keep_freed_memory: a 40 MiB block freed and allocated again re-uses mapped pages (no page faults);
with glibc's defaults (OREAL_KEEP_FREED_MEMORY=0) every allocation of it is a fresh mmap that faults
in all its pages. Each side runs in its own process (mallopt changes the process for good)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from helpers.torchrun import pythonpath

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PROBE = """
import ctypes, resource
from megatron_oreal.launch.malloc import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
size = 40 << 20
def touch():
    p = libc.malloc(size)
    libc.memset(p, 1, size)
    libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    touch()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
"""


def _probe(keep: str) -> tuple[str, int]:
    env = dict(os.environ, OREAL_KEEP_FREED_MEMORY=keep, PYTHONPATH=pythonpath(REPO))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_freed_blocks_stay_mapped_only_when_kept():
    applied, faults = _probe("1")
    default_applied, default_faults = _probe("0")
    assert (applied, default_applied) == ("True", "False")
    pages = (40 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert default_faults >= 0.9 * pages  # glibc's default: mmapped per allocation, every page faulted in
    assert faults <= 0.01 * pages  # kept: the heap's pages are reused
