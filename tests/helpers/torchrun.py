"""Launch a worker under torchrun with a free port and a hard timeout."""

from __future__ import annotations

import os
import socket
import sys

from helpers.session import run_in_session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pythonpath(*paths, env: dict | None = None) -> str:
    """PYTHONPATH for a child: `paths` first, then the one it would inherit (an image that installs
    packages through PYTHONPATH keeps them)."""
    inherited = (os.environ if env is None else env).get("PYTHONPATH", "")
    return os.pathsep.join(str(p) for p in (*paths, inherited) if p)


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
    full_env["PYTHONPATH"] = pythonpath(repo, os.path.join(repo, "tests"), env=full_env)
    res, timed_out = run_in_session(cmd, full_env, timeout)
    out, err = res.stdout, res.stderr
    if timed_out:
        raise AssertionError(f"torchrun {script} (nproc={nproc}) timed out after {timeout}s\n"
                             f"--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-6000:]}")
    if res.returncode != 0:
        raise AssertionError(
            f"torchrun {script} (nproc={nproc}) exited {res.returncode}\n"
            f"--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-8000:]}"
        )
    return out


def process_alive(pid: int) -> bool:
    """pid exists and is not a zombie (an exited child its parent has not reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def leftover_processes(key: str, value: str, wait_s: float = 5.0) -> list[int]:
    """Pids of live processes whose environment has key=value (a marker given to one launch), after
    waiting up to wait_s for them to go: what a launch left behind (Linux /proc; [] elsewhere)."""
    import time

    marker = f"{key}={value}".encode()

    def scan() -> list[int]:
        found = []
        for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except OSError:  # gone meanwhile, or not ours to read
                continue
            if marker in env and process_alive(int(entry)):
                found.append(int(entry))
        return found

    deadline = time.monotonic() + wait_s
    while (pids := scan()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids
