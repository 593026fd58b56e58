"""Resumable run checkpoints: atomic publication, a `latest` pointer, pruning, RNG and loop state.

Layout of RUN_DIR/checkpoints:

    step_000010/             one published checkpoint (never modified after the rename)
      <component>/           written by that component's writer (e.g. a Megatron dist checkpoint)
      state.json             step, data cursor, best eval, ... (rank 0)
      rng/rank_00000.pt      Python / NumPy / torch RNG states of each rank
      MANIFEST.json          size + SHA-256 of every file above (integrity.py), checked on resume
      COMPLETE               written last inside the temporary folder
    latest                   the name of the newest complete checkpoint, replaced atomically

A save writes into `.tmp_step_000010/`, and only when every rank has finished does rank 0 rename it
and then replace `latest`. A crash (kill -9, full disk) at any moment therefore leaves `latest`
pointing at the previous good checkpoint; leftover temporary folders are removed at the next save.
A resume (`resume_point`) checks the checksums and falls back to the newest intact checkpoint, so
`keep` must be at least 2 for there to be one. The writers/readers are callables so this module
knows nothing about Megatron.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from megatron_oreal.checkpoint.diskfull import disk_full_error, is_disk_full, is_write_failure
from megatron_oreal.checkpoint.integrity import MANIFEST, verify, write_manifest

_NAME = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the path and the part."""


def _noop() -> None:
    pass


def _single(obj: object) -> list:
    return [obj]


def all_gather_object(obj: object) -> list:
    """torch.distributed.all_gather_object over the world (or [obj] without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


@dataclass
class RunCheckpointer:
    run_dir: Path
    keep: int = 2
    rank: int = 0
    barrier: Callable[[], None] = _noop
    world: int = 1
    all_gather: Callable[[object], list] = _single  # every rank's object, in rank order (checksums)

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
        failure = self._attempt(tmp, lambda: self._write_parts(tmp, step, writers, state))
        if not _any_rank(failure is not None):
            # Every rank's files are on disk: checksum them all (split over the ranks) before publishing.
            failure = self._attempt(tmp, lambda: write_manifest(tmp, rank=self.rank, world=self.world,
                                                                all_gather=self.all_gather))
        if not _any_rank(failure is not None) and self.rank == 0:
            failure = self._attempt(tmp, lambda: self._publish(tmp, final, name))
        if _any_rank(failure is not None):
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            self.barrier()
            where = f": {failure}" if failure is not None else " (on another rank)"
            raise CheckpointError(f"saving checkpoint {final} failed{where}; `latest` still points at "
                                  f"{self.latest_name()!r}, which is intact") from failure
        return final

    def _write_parts(self, tmp: Path, step: int, writers: dict, state: dict) -> None:
        for component, write in writers.items():
            write(tmp / component)
        fault_point("save_written", step)  # the components are on disk, COMPLETE is not
        torch.save(capture_rng(), tmp / "rng" / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            _write_json(tmp / "state.json", {"step": step, **state})

    def _publish(self, tmp: Path, final: Path, name: str) -> None:
        (tmp / "COMPLETE").write_text("ok\n")
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fault_point("save_renamed", int(name.split("_")[1]))  # published under its name, `latest` not moved yet
        _write_text_atomic(self.root / "latest", name + "\n")
        self._prune()

    def _attempt(self, tmp: Path, fn: Callable[[], object]) -> BaseException | None:
        """Run one part of a save; a write failure is returned (to be agreed on by every rank), a bug raised."""
        try:
            fn()
        except CheckpointException as exc:
            # A write failed inside a distributed (Megatron/torch DCP) save. DCP gathers every rank's
            # write result, so all ranks raise this at the same point and meet again in the caller.
            if is_disk_full(exc, tmp):
                return disk_full_error(tmp, _describe_dcp_failure(exc))
            return OSError(_describe_dcp_failure(exc))
        except OSError as exc:  # ENOSPC, EIO, ...: the previous checkpoint stays published
            return disk_full_error(tmp, f"({exc})") if is_disk_full(exc, tmp) else exc
        except RuntimeError as exc:  # torch's zip writer reports a full disk as "unexpected pos"
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            if is_disk_full(exc, tmp):
                return disk_full_error(tmp, f"({first})")
            if is_write_failure(exc):
                return OSError(f"write failed under {tmp}: {first}")
            raise
        return None

    def _prune(self) -> None:
        steps = sorted(p for p in self.root.iterdir() if _NAME.match(p.name))
        latest = self.latest_name()
        for old in steps[: max(len(steps) - self.keep, 0)]:
            if old.name != latest:
                shutil.rmtree(old, ignore_errors=True)

    # ---------------------------------------------------------------- load
    def latest_name(self) -> str | None:
        pointer = self.root / "latest"
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return name if _NAME.match(name) else None

    def latest(self) -> Path | None:
        name = self.latest_name()
        if name is None:
            return None
        path = self.root / name
        if not (path / "COMPLETE").exists():
            raise CheckpointError(f"{self.root / 'latest'} points at {path}, which is missing or incomplete")
        return path

    def _candidates(self) -> tuple[list[Path], str]:
        """Complete checkpoints to try, newest first: the one `latest` names, then older ones. A
        missing or garbled `latest` (an emptied file) falls back to the newest complete folder."""
        if not self.root.is_dir():
            return [], ""
        done = sorted((p for p in self.root.iterdir() if _NAME.match(p.name) and (p / "COMPLETE").exists()),
                      reverse=True)
        name = self.latest_name()
        note = ""
        if name is None:
            if (self.root / "latest").exists() and done:
                note = f"{self.root / 'latest'} is empty or unreadable; "
            return done, note
        return [p for p in done if p.name <= name], note

    def resume_point(self, log: Callable[[str], None] = print) -> Path | None:
        """Collective: the newest complete checkpoint whose files match their checksums, or None (a
        fresh run). Damaged ones are named (file and why); when an older intact one is used, they are
        renamed `<name>.damaged` (kept for inspection, out of `latest` and pruning). Raises
        CheckpointError when checkpoints exist but none is intact: never train from damaged weights."""
        candidates, note = self._candidates()
        if not candidates:
            if note or (self.latest_name() and not (self.root / self.latest_name()).exists()):
                raise CheckpointError(f"{self.root / 'latest'} names no complete checkpoint and none is left in "
                                      f"{self.root}; refusing to start over in a run dir that had checkpoints")
            return None
        damaged: list[tuple[Path, str]] = []
        for path in candidates:
            problems = verify(path, rank=self.rank, world=self.world, all_gather=self.all_gather)
            if problems is None:
                if self.rank == 0:
                    log(f"{path.name}: no {MANIFEST} (written before checksums): not verified")
                problems = []
            if not problems:
                break
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            damaged.append((path, f"{path / problems[0].split(': ', 1)[0]}: {problems[0].split(': ', 1)[1]}{more}"))
            if self.rank == 0:
                log(f"warning: checkpoint {path.name} is damaged: {damaged[-1][1]}")
        else:
            listing = "; ".join(why for _, why in damaged)
            raise CheckpointError(f"{note}no intact checkpoint in {self.root}: {listing}; nothing was changed "
                                  "(restore the files, or move the checkpoints away to start over)")
        if damaged or note:
            if self.rank == 0:
                moved = []
                for bad, _ in damaged:
                    aside = _free_name(bad.with_name(bad.name + ".damaged"))  # a step damaged twice keeps both
                    os.replace(bad, aside)
                    moved.append(f"{bad.name} renamed {aside.name}")
                _write_text_atomic(self.root / "latest", path.name + "\n")
                moved = ", ".join(moved)
                log(f"{note}resuming from {path.name}, the newest intact checkpoint" + (f" ({moved})" if moved else ""))
            self.barrier()
        return path

    def load(self, path: Path, readers: dict[str, Callable[[Path], None]]) -> dict:
        """Collective: restores each component, this rank's RNG, and returns state.json."""
        path = Path(path)
        state_file = path / "state.json"
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{state_file}: cannot read run state: {exc}") from None
        for component, read in readers.items():
            if not (path / component).exists():
                raise CheckpointError(f"{path}: has no {component!r} (found: {sorted(p.name for p in path.iterdir())})")
            try:
                read(path / component)
            except CheckpointError:
                raise
            except (Exception, CheckpointException) as exc:  # name the part that failed (DCP raises a BaseException)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise CheckpointError(f"{path / component}: cannot load {component}: {first}") from exc
        rng_file = path / "rng" / f"rank_{self.rank:05d}.pt"
        if rng_file.exists():
            try:
                states = torch.load(rng_file, weights_only=False)
            except Exception as exc:  # a truncated zip: "PytorchStreamReader failed reading zip archive"
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise CheckpointError(f"{rng_file}: cannot read RNG state: {first}") from None
            restore_rng(states)
        return state


# Test-only fault injection, read from the environment so that a test drives the real CLI:
#   OREAL_TEST_FAULT="point:step:action[:times],..."   e.g. "save_written:2:kill,rollout:1:raise:2"
# actions: kill (SIGKILL itself: a kill -9 at an exact moment, no timing races), term (SIGTERM
# itself: a preemption arriving mid-stage), enospc (OSError ENOSPC: a full disk), raise
# (RuntimeError: a crashing engine), wait (block until the file $OREAL_TEST_WAIT_FILE exists, at
# most 300 s: a run kept alive while a test starts a second one; FILE.waiting appears meanwhile). `times` (default: always) bounds
# how often it fires.
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
        elif action == "wait":
            release, deadline = os.environ.get("OREAL_TEST_WAIT_FILE", ""), time.monotonic() + 300
            if release:
                Path(release + ".waiting").touch()  # tells the test where the run is
            while release and not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.1)
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


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}{n}")
    return candidate


def _write_json(path: Path, obj: dict) -> None:
    _write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
