"""End to end on CPU with the real SGLang server: `python -m megatron_oreal train examples/tiny/oreal.yaml
rollout.engine=sglang steps=3` (rollout, reward, update, weight sync, eval, checkpoint), stopped after step 2
and resumed (a second server start), with the server's log in the run folder. Two server starts."""

import json
from pathlib import Path

import pytest

from helpers.sglang_cpu import CPU_SERVER_ARGS, REPO, sglang_python
from helpers.torchrun import run_torchrun

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(3000)]  # a server start takes minutes on a loaded machine
MAIN = REPO / "megatron_oreal" / "__main__.py"


def test_train_tiny_with_sglang_checkpoint_and_resume(tmp_path):
    run = tmp_path / "R"
    # 64 of the 1000 held-out problems: three evaluations of all 1000 would dominate the run on 2 cores
    heldout = (REPO / "examples" / "tiny" / "data" / "heldout.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "heldout64.jsonl").write_text("".join(heldout[:64]))
    args = ["train", str(REPO / "examples" / "tiny" / "oreal.yaml"), "rollout.engine=sglang", "steps=3",
            f"run_dir={run}",
            # the CPU server (rollout/sglang_engine.py CPU_SERVER_FLAGS) from the CPU SGLang env
            f"rollout.sglang_python={sglang_python()}", "rollout.sglang_device=cpu",
            "rollout.sglang_deterministic=false", f"rollout.sglang_server_args={json.dumps(CPU_SERVER_ARGS)}",
            "rollout.sglang_launch_timeout_s=1800",
            # 3 steps: warm-up must be shorter; a checkpoint and an eval at step 2, fewer prompts per step
            "policy.optim.warmup_steps=1", "token_rm.optim.warmup_steps=1", "algo.actor_freeze_steps=1",
            "checkpoint.every=2", "eval.every=2", "data.prompts_per_step=8",
            f"data.eval_file={tmp_path / 'heldout64.jsonl'}"]
    run_torchrun(MAIN, 1, args + ["--max-steps", "2"], timeout=1400)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000002"
    out = run_torchrun(MAIN, 1, args, timeout=1400)
    assert "resumed from" in out
    rows = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-1] == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_pass1_final"] is not None
    assert (run / "hf" / "config.json").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    synced = [e.value for e in acc.Scalars("sync/bytes")] if "sync/bytes" in acc.Tags()["scalars"] else []
    assert synced and all(v > 0 for v in synced), acc.Tags()["scalars"]
    log = (run / "sglang_server_rank0.log").read_text(errors="replace")
    assert log.count("Uvicorn running") == 2 or log.count("The server is fired up") == 2, log[-2000:]
