"""Resumable run checkpoints: atomic publication, a `latest` pointer, pruning, RNG and loop state.

Layout of RUN_DIR/checkpoints:

    step_000010/             one published checkpoint (never modified after the rename)
      <component>/           written by that component's writer (e.g. a Megatron dist checkpoint)
      state.json             step, data cursor, best eval, ... (rank 0)
      rng/rank_00000.pt      Python / NumPy / torch RNG states of each rank
      COMPLETE               written last inside the temporary folder
    latest                   the name of the newest complete checkpoint, replaced atomically

A save writes into `.tmp_step_000010/`, and only when every rank has finished does rank 0 rename it
and then replace `latest`. A crash (kill -9, full disk) at any moment therefore leaves `latest`
pointing at the previous good checkpoint; leftover temporary folders are removed at the next save.
The writers/readers are callables so this module knows nothing about Megatron.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

_NAME = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the path and the part."""


def _noop() -> None:
    pass


@dataclass
class RunCheckpointer:
    run_dir: Path
    keep: int = 2
    rank: int = 0
    barrier: Callable[[], None] = _noop

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.root = self.run_dir / "checkpoints"

    # ---------------------------------------------------------------- save
    def save(self, step: int, writers: dict[str, Callable[[Path], None]], state: dict) -> Path:
        """Collective: every rank calls it with the same step and writers."""
        name = f"step_{step:06d}"
        final = self.root / name
        tmp = self.root / f".tmp_{name}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp_step_*"):
                shutil.rmtree(stale, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        self.barrier()
        failure: BaseException | None = None
        try:
            for component, write in writers.items():
                write(tmp / component)
            fault_point("save_written", step)  # the components are on disk, COMPLETE is not
            torch.save(capture_rng(), tmp / "rng" / f"rank_{self.rank:05d}.pt")
            if self.rank == 0:
                _write_json(tmp / "state.json", {"step": step, **state})
        except OSError as exc:  # ENOSPC, EIO, ...: the previous checkpoint stays published
            failure = exc
        except CheckpointException as exc:
            # A write failed inside a distributed (Megatron/torch DCP) save. DCP gathers every rank's
            # write result, so all ranks raise this at the same point and meet again below.
            failure = OSError(_describe_dcp_failure(exc))
        failed = _any_rank(failure is not None)
        if failed:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            self.barrier()
            where = f" ({failure})" if failure is not None else " (on another rank)"
            raise CheckpointError(
                f"saving checkpoint {final} failed{where}; `latest` still points at {self.latest_name()!r}"
            ) from failure
        if self.rank == 0:
            (tmp / "COMPLETE").write_text("ok\n")
            if final.exists():  # re-saving the same step (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            fault_point("save_renamed", step)  # published under its name, `latest` not moved yet
            _write_text_atomic(self.root / "latest", name + "\n")
            self._prune()
        self.barrier()
        return final

    def _prune(self) -> None:
        steps = sorted(p for p in self.root.iterdir() if _NAME.match(p.name))
        latest = self.latest_name()
        for old in steps[: max(len(steps) - self.keep, 0)]:
            if old.name != latest:
                shutil.rmtree(old, ignore_errors=True)

    # ---------------------------------------------------------------- load
    def latest_name(self) -> str | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        return pointer.read_text().strip() or None

    def latest(self) -> Path | None:
        name = self.latest_name()
        if name is None:
            return None
        path = self.root / name
        if not (path / "COMPLETE").exists():
            raise CheckpointError(f"{self.root / 'latest'} points at {path}, which is missing or incomplete")
        return path

    def load(self, path: Path, readers: dict[str, Callable[[Path], None]]) -> dict:
        """Collective: restores each component, this rank's RNG, and returns state.json."""
        path = Path(path)
        state_file = path / "state.json"
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{state_file}: cannot read run state: {exc}") from None
        for component, read in readers.items():
            if not (path / component).exists():
                raise CheckpointError(f"{path}: has no {component!r} (found: {sorted(p.name for p in path.iterdir())})")
            try:
                read(path / component)
            except CheckpointError:
                raise
            except (Exception, CheckpointException) as exc:  # name the part that failed (DCP raises a BaseException)
                raise CheckpointError(f"{path / component}: cannot load {component}: {exc}") from exc
        rng_file = path / "rng" / f"rank_{self.rank:05d}.pt"
        if rng_file.exists():
            restore_rng(torch.load(rng_file, weights_only=False))
        return state


# Test-only fault injection, read from the environment so that a test drives the real CLI:
#   OREAL_TEST_FAULT="point:step:action[:times],..."   e.g. "save_written:2:kill,rollout:1:raise:2"
# actions: kill (SIGKILL itself: a kill -9 at an exact moment, no timing races), term (SIGTERM
# itself: a preemption arriving mid-stage), enospc (OSError ENOSPC: a full disk), raise
# (RuntimeError: a crashing engine). `times` (default: always) bounds how often it fires.
FAULT_ENV = "OREAL_TEST_FAULT"
_fired: dict[str, int] = {}


def fault_point(point: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) < 3 or parts[0] != point or parts[1] != str(step):
            continue
        if len(parts) > 3 and _fired.get(item, 0) >= int(parts[3]):
            continue
        _fired[item] = _fired.get(item, 0) + 1
        action = parts[2]
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<{FAULT_ENV} at {point}>")
        elif action == "raise":
            raise RuntimeError(f"injected fault ({FAULT_ENV}) at {point}, step {step}")
        else:
            raise ValueError(f"{FAULT_ENV}: unknown action {action!r} in {item!r}")


def capture_rng() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _describe_dcp_failure(exc: CheckpointException) -> str:
    """'write failed on rank 1: No space left on device' from DCP's {rank: (exception, traceback)}; the
    details exist on the coordinator only, the other ranks say so."""
    failures = getattr(exc, "failures", None) or {}
    if not failures:
        return "a rank's write failed (the coordinating rank's error has the details)"
    parts = []
    for rank in sorted(failures):
        err = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
        parts.append(f"rank {rank}: {str(err).removeprefix('Worker failure: ')}")
    return "write failed on " + "; ".join(parts)


def _any_rank(flag: bool) -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _write_json(path: Path, obj: dict) -> None:
    _write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
