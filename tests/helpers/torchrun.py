"""Launch a worker script under torchrun with a free port and a hard timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script, nproc: int, args=(), timeout: float = 300, env: dict | None = None) -> str:
    """Run `torchrun --nproc_per_node nproc script *args`; return stdout.

    Raises AssertionError with the workers' stderr tail on a non-zero exit or a timeout (a dead gloo
    peer or checkpoint writer can hang, so every launch is bounded).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, full_env.get("PYTHONPATH", "")) if p)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired as e:
        err = (e.stderr or b"")[-6000:]
        err = err.decode(errors="replace") if isinstance(err, bytes) else err
        raise AssertionError(f"torchrun {script} (nproc={nproc}) timed out after {timeout}s\n{err}") from None
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script} (nproc={nproc}) exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc.stdout
