"""Recognise a full disk behind the many shapes its error takes, and say so in plain words.

Measured on a real full tmpfs (tests/e2e/test_full_disk.py):
  * Python file writes: OSError(ENOSPC) "No space left on device" (or EDQUOT over a quota);
  * torch.save (the zip writer): RuntimeError "[enforce fail at inline_container.cc:672] . unexpected
    pos 64 vs 0", or "basic_ios::clear: iostream error" when the end of the archive fails (seen in
    Megatron's save_common), or "PytorchStreamWriter failed writing file ..." - no errno at all;
  * safetensors' save_file: SafetensorError "Error while serializing: I/O error: No space left on
    device (os error 28)";
  * a distributed (DCP) save: CheckpointException wrapping one of the above per rank.
When the text has no errno, the free space of the target decides: a failed write leaves less free
than it was writing, so "nearly full" is below max(FULL_BYTES, 1 % of the filesystem, at most 64 GiB).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

FULL_BYTES = 1 << 20
_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
# torch's zip writer (C++ streams) on a failed write: no errno, no words about the disk.
_ZIP_WRITER = ("unexpected pos", "pytorchstreamwriter failed", "file write failed", "basic_ios::clear",
               "iostream error")


def _statvfs(path: str | os.PathLike):
    """statvfs of the nearest existing folder of `path` (None if unreadable)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return os.statvfs(p)
    except OSError:
        return None


def free_bytes(path: str | os.PathLike) -> int | None:
    st = _statvfs(path)
    return None if st is None else st.f_bavail * st.f_frsize


def _nearly_full(path: str | os.PathLike) -> bool:
    st = _statvfs(path)
    if st is None:
        return False
    free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    return free < max(FULL_BYTES, min(size // 100, 64 << 30))


def is_write_failure(exc: BaseException) -> bool:
    """torch's zip writer failing to write (full or not): worth one line, not a traceback."""
    return any(t in str(exc).lower() for t in _ZIP_WRITER)


def is_disk_full(exc: BaseException, path: str | os.PathLike | None = None) -> bool:
    """True when `exc` (or its cause/context, or a DCP per-rank failure) is a full disk or quota."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e).lower()
        if any(t in text for t in _TEXTS):
            return True
        if any(t in text for t in _ZIP_WRITER) and path is not None and _nearly_full(path):
            return True
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            for v in failures.values():
                stack.append(v[0] if isinstance(v, tuple) else v)
        stack += [e.__cause__, e.__context__]
    return False


@contextlib.contextmanager
def naming(path: str | os.PathLike):
    """An OSError raised by a write (not the open) carries no file name: give it `path`."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


class DiskFull(OSError):
    """ENOSPC with a sentence that names the path and what is intact; str() is that sentence."""

    def __str__(self) -> str:
        return self.strerror


def disk_full_error(path: str | os.PathLike, intact: str) -> DiskFull:
    """The one-line error for a full disk at `path`; `intact` says what is still good."""
    free = free_bytes(path)
    left = f" ({free >> 10} KiB free)" if free is not None else ""
    return DiskFull(errno.ENOSPC, f"no space left on device writing {path}{left}; {intact}")
