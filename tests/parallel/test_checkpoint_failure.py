"""A full disk on one rank mid-way through a distributed save: every rank gets the same clear error,
nothing hangs, and the previous checkpoint stays published (ckpt_fail_worker.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.tiny_hf import make_tiny_qwen2
from helpers.torchrun import run_torchrun

WORKER = Path(__file__).with_name("ckpt_fail_worker.py")


@pytest.mark.slow
def test_one_rank_full_disk_fails_every_rank_together(tmp_path):
    make_tiny_qwen2(tmp_path / "hf", layers=2, seed=3)
    run_dir = tmp_path / "run"
    out = run_torchrun(WORKER, 2, [tmp_path / "hf", run_dir], timeout=300)
    lines = sorted(x for x in out.splitlines() if x.startswith("CHECK "))
    assert len(lines) == 2, out
    for rank, line in enumerate(lines):
        assert line.startswith(f"CHECK rank{rank} latest=step_000001 CheckpointError"), line
        assert "step_000002 failed" in line and "'step_000001'" in line, line
    assert "write failed on rank 1: [Errno 28] No space left on device" in lines[0]  # the coordinator knows why
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000001"
    assert (ckpts / "step_000001" / "COMPLETE").exists()
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000001"]  # the partial save is gone
