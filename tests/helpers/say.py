"""One line to stdout in one write(2), so lines from several ranks sharing a pipe never interleave.

`print(a, b, flush=True)` is several writes when Python runs unbuffered (PYTHONUNBUFFERED=1, as CI
sets it): two ranks then produce `{rank 1}{rank 0}\n\n`. A single write of at most PIPE_BUF (4096)
bytes to a pipe is atomic (POSIX), so each worker line goes out whole.
"""

from __future__ import annotations

import os


def say(*parts) -> None:
    line = (" ".join(str(p) for p in parts) + "\n").encode()
    if len(line) > 4096:
        raise ValueError(f"a worker line of {len(line)} bytes can interleave with other ranks' output; keep it under 4096")
    os.write(1, line)
