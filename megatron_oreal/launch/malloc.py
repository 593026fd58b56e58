"""Keep freed heap memory in the process instead of handing it back to the kernel (glibc only).

Why: the training step frees and re-allocates the same few-MiB activation and gradient tensors every
micro-batch. glibc's defaults return the top of the heap to the kernel once more than the (adaptive)
trim threshold is free, and serve blocks above the (adaptive) mmap threshold with fresh mmaps, so the
next step touches new pages and pays a minor page fault per 4 KiB: ~750-3,200 faults in each
`update` of the tiny task's `grpo` step, measured with getrusage; 0-1 with these settings.

`keep_freed_memory()` sets, through mallopt(3):
- M_MMAP_THRESHOLD = 64 MiB: blocks up to 64 MiB come from the heap (larger ones, e.g. a big model's
  buffers, are still mmapped and returned on free);
- M_TRIM_THRESHOLD = 1 GiB: up to 1 GiB free at the heap's top stays mapped;
- M_TOP_PAD = 16 MiB: the heap grows in 16 MiB steps.
The process's RSS then stays at its high-water mark instead of shrinking between steps (the peak is
unchanged). Setting any of these switches glibc's adaptive thresholds off, so all three are set.
`OREAL_KEEP_FREED_MEMORY=0` leaves glibc's defaults; on other C libraries it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # <malloc.h>
SETTINGS = ((M_MMAP_THRESHOLD, 64 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 16 << 20))


def keep_freed_memory() -> bool:
    """Apply SETTINGS with mallopt; True when glibc accepted all of them."""
    if os.environ.get("OREAL_KEEP_FREED_MEMORY", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
