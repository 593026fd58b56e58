"""End to end on the built-in credit task: `train examples/credit/oreal.yaml` for a few small steps from
the shipped starting model, and the token-weight pages that tools/credit_rm_share.py reads."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_credit_task_trains_and_writes_token_weights(tmp_path):
    run_dir = tmp_path / "credit"
    cmd = [sys.executable, "-m", "megatron_oreal", "train", "examples/credit/oreal.yaml", f"run_dir={run_dir}",
           "steps=3", "data.prompts_per_step=4", "rollout.sampling.n=4", "data.eval_limit=8", "eval.every=0",
           "algo.actor_freeze_steps=1", "policy.optim.warmup_steps=1", "token_rm.optim.warmup_steps=1",
           "checkpoint.export_hf=false", "eval.keep_best=false"]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=600, capture_output=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_pass1_initial"] is not None
    pages = sorted((run_dir / "html").glob("step_*.json"))
    # a page per step that trained something (a step whose groups were all right or all wrong has none)
    assert pages and {p.stem for p in pages} <= {"step_000001", "step_000002", "step_000003"}
    assert all(p.with_suffix(".html").exists() for p in pages)

    sys.path.insert(0, str(ROOT / "tools"))
    import credit_rm_share as crs

    from megatron_oreal.data import credit

    seqs = [s for p in pages for s in json.loads(p.read_text())]
    assert seqs, "no trained sequences on any page"
    for s in seqs:
        credit.deciding_value(s["prompt"])  # every prompt is a credit problem
        assert len(s["weights"]) == len(s["tokens"]) and all(0.0 <= w <= 1.0 for w in s["weights"])
    # one pair per mixed prompt: as many correct as incorrect sequences on each page
    for p in pages:
        page = json.loads(p.read_text())
        assert sum(s["is_positive"] for s in page) * 2 == len(page)
    rows = crs.decisive_negatives(pages)
    stats = crs.shares(rows)
    assert stats["responses"] == len(rows)
