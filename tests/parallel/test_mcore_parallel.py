"""TP=2, PP=2 and TP2xPP2 (gloo, several CPU processes) against TP=1, and checkpoint resharding.

Three torchrun launches (see mcore_worker.py for what each checks): a 1-process TP=1 reference,
one 4-process launch that re-initialises the parallel state at TP2xPP2, TP2 (DP2) and PP2 (DP2),
and a 1-process reload of the TP2xPP2 checkpoint at TP=1.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.tiny_hf import make_tiny_qwen2
from helpers.torchrun import run_torchrun

WORKER = Path(__file__).with_name("mcore_worker.py")


@pytest.mark.slow
def test_layouts_match_tp1_and_checkpoints_reshard(tmp_path):
    for tie in (False, True):
        make_tiny_qwen2(tmp_path / f"hf_tie{int(tie)}", tie=tie, layers=2, seed=21)
    out = run_torchrun(WORKER, 1, ["ref", tmp_path], timeout=300)
    assert "CHECK ref losses" in out
    out = run_torchrun(WORKER, 4, ["layouts", tmp_path], timeout=500)
    for name in ("tp2pp2", "tp2pp1", "tp1pp2"):
        for tie in (0, 1):
            assert f"CHECK {name}_tie{tie} loss=" in out, out
    assert "CHECK ckpt_tp1_loaded_at_tp2pp2 bit-identical" in out
    assert out.count("CHECK gather_all rank") == 2  # the first rank of each of the 2 DP replicas
    assert out.count("CHECK rm_tp2 rank") == 4  # every rank (2 TP ranks x 2 DP replicas) has the full score
    out = run_torchrun(WORKER, 1, ["reload", tmp_path], timeout=300)
    assert "CHECK ckpt_tp2pp2_loaded_at_tp1 bit-identical" in out
