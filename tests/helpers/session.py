"""Run a command in its own session with its output in files, then kill whatever of the session is left.

Files, not pipes: orphans of a killed process (verifier pool, checkpoint writers) would hold a pipe
open and keep `communicate()` waiting. The session is killed once the command is done or timed out,
which also ends those orphans.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile


def run_in_session(cmd: list[str], env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, bool]:
    """Returns (the finished process with its stdout/stderr text, whether it timed out)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read()), timed_out
