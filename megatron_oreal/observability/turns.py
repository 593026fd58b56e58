"""Two processes take turns, one training step each, so a side-by-side timing sees one machine.

Why: on a shared 2-core VM the speed drifts by tens of percent within seconds, so two trainers timed
one after the other (even in interleaved rounds of ~10 s) disagree by more than the effect being
measured. Run concurrently but in lockstep, step i of each side runs under the same conditions as
its neighbours on the other side, and per-step ratios cancel the drift. Only one side computes at a
time: the other sleeps in `pass_and_wait` (a 5 ms poll of a small file).

Protocol, through one file holding whose turn it is (written atomically):
    turns = Turns(path, me="grpo", other="trl")
    ... step ...                # time it
    turns.pass_and_wait()       # after every step, outside the timed region
    ... end of run ...
    turns.finish()              # at exit: hands the turn over for good and marks this side done
The first step of each side (its warm-up) may overlap the other's start-up; every later step runs
alone. A side whose partner has finished (or never started within `timeout`) no longer waits.
Used by `profile --take-turns` and tools/trl_grpo_side.py (stdlib only: it runs in TRL's venv too).
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class Turns:
    def __init__(self, path: str | os.PathLike, me: str, other: str, *, timeout: float = 900.0, poll: float = 0.005):
        if not me or not other or me == other or "\n" in me + other:
            raise ValueError(f"Turns: two different one-line names are needed, got {me!r} and {other!r}")
        self.path, self.me, self.other = Path(path), me, other
        self.timeout, self.poll = timeout, poll

    @classmethod
    def from_spec(cls, spec: str, **kw) -> "Turns":
        """From the command-line form FILE:ME:OTHER (FILE may itself contain ':')."""
        rest, sep, other = spec.rpartition(":")
        path, sep2, me = rest.rpartition(":")
        if not (sep and sep2 and path and me and other):
            raise ValueError(f"--take-turns {spec!r}: expected FILE:ME:OTHER")
        return cls(path, me, other, **kw)

    def _done_marker(self, name: str) -> Path:
        return self.path.with_name(f"{self.path.name}.done.{name}")

    def _write(self, name: str) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{self.me}.tmp")
        tmp.write_text(name)
        os.replace(tmp, self.path)

    def whose(self) -> str:
        try:
            return self.path.read_text()
        except FileNotFoundError:
            return ""

    def pass_and_wait(self) -> float:
        """Give the turn to the other side and sleep until it comes back (or the other side is done);
        returns the seconds waited."""
        self._write(self.other)
        t0 = time.perf_counter()
        while self.whose() != self.me and not self._done_marker(self.other).exists():
            if time.perf_counter() - t0 > self.timeout:
                break  # the partner hangs or died without finishing: go on alone
            time.sleep(self.poll)
        return time.perf_counter() - t0

    def finish(self) -> None:
        """This side runs no more steps: the other never waits for it again."""
        self._done_marker(self.me).touch()
        self._write(self.other)
