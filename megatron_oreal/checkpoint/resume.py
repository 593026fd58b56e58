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

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

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
            torch.save(capture_rng(), tmp / "rng" / f"rank_{self.rank:05d}.pt")
            if self.rank == 0:
                _write_json(tmp / "state.json", {"step": step, **state})
        except OSError as exc:  # ENOSPC, EIO, ...: the previous checkpoint stays published
            failure = exc
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
            except Exception as exc:  # name the part that failed, keep the cause
                raise CheckpointError(f"{path / component}: cannot load {component}: {exc}") from exc
        rng_file = path / "rng" / f"rank_{self.rank:05d}.pt"
        if rng_file.exists():
            restore_rng(torch.load(rng_file, weights_only=False))
        return state


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
