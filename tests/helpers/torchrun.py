"""Launch a worker under torchrun with a free port and a hard timeout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script, nproc: int, args=(), timeout: float = 300, env: dict | None = None,
                 module: bool = False) -> str:
    """Run `torchrun --nproc_per_node nproc script *args` (module=True: `torchrun -m script`); return stdout.

    Raises AssertionError with the workers' stderr tail on a non-zero exit or a timeout (a dead gloo
    peer or checkpoint writer can hang, so every launch is bounded). On timeout the whole process
    group (torchrun, its workers and their checkpoint-writer children) is killed.
    Worker scripts need an `if __name__ == "__main__":` guard; to launch a package's CLI use
    module=True (multiprocessing's spawn re-runs a script given by path, but not `pkg.__main__`).
    """
    target = ["-m", str(script)] if module else [str(script)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *target, *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # The repo for megatron_oreal, tests/ for `from helpers.say import say` in the workers.
    paths = (repo, os.path.join(repo, "tests"), full_env.get("PYTHONPATH", ""))
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    # Files, not pipes: orphans of a killed worker (verifier pool, checkpoint writers) would hold a
    # pipe open and make communicate() wait for them. The session is killed once torchrun is done.
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True, env=full_env, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun on timeout, and any leftover of its workers
            except ProcessLookupError:
                pass
            proc.wait()
        out_f.seek(0), err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    if timed_out:
        raise AssertionError(f"torchrun {script} (nproc={nproc}) timed out after {timeout}s\n"
                             f"--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-6000:]}")
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script} (nproc={nproc}) exited {proc.returncode}\n"
            f"--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-8000:]}"
        )
    return out
