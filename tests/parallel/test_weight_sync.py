"""Issue 5: a TP=2 x PP=2 policy synced into the CPU engine equals its HF export bit for bit, greedy
generations equal transformers' on that export, and a training step changes them exactly as the new
export does."""

import json
from pathlib import Path

import pytest

from helpers.tiny_hf import make_tiny_qwen2
from helpers.torchrun import run_torchrun


@pytest.mark.slow
def test_sync_tp2_pp2_matches_export(tmp_path):
    make_tiny_qwen2(tmp_path / "hf", tie=False)
    run_torchrun(Path(__file__).with_name("sync_worker.py"), 4, [tmp_path / "hf", tmp_path / "out"], timeout=400)
    r = json.loads((tmp_path / "out" / "result.json").read_text())
    for phase in ("a", "b"):
        assert r[f"{phase}_names_equal"] and r[f"{phase}_bit_equal"], phase
        assert r[f"{phase}_sync_tensors"] == 2 + 1 + 2 * 12  # embed, norm, lm_head + 12 per layer (2 layers)
        assert r[f"{phase}_sync_buckets"] > 1
        assert r[f"{phase}_generations"] == r[f"{phase}_hf_generations"]
    assert r["a_generations"] != r["b_generations"]  # the step changed what the engine samples
