"""End to end: `python -m megatron_oreal train` on a tiny model passes through every stage, at TP=1,
TP=2 and PP=2 (several CPU processes), checkpoints, resumes, and exports an HF model that loads."""

import json
from pathlib import Path

import pytest

from helpers.tiny_run import assert_same_weights, exported_weights, write_tiny_run
from helpers.torchrun import leftover_processes, run_torchrun

MAIN = Path(__file__).resolve().parents[2] / "megatron_oreal" / "__main__.py"
STAGES = ("time/rollout", "time/selection", "time/train", "time/weight_sync")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    return root, write_tiny_run(root, steps=2, eval_rows=8, eval_every=1, html_every=1)


def _check_run(run_dir: Path, steps: int = 2):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps
    assert summary["eval_pass1_initial"] is not None and summary["eval_pass1_final"] is not None
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:06d}"
    assert (run_dir / "hf" / "config.json").exists()
    tb = list((run_dir / "tb").glob("events.*"))
    assert tb, "no TensorBoard events"
    return summary


def _scalars(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tp1_all_stages_resume_and_export(assets):
    root, cfg = assets
    run_dir = root / "tp1"
    out = run_torchrun(MAIN, 1, ["train", cfg, f"run_dir={run_dir}", "--max-steps", "1"], timeout=300)
    assert "step 1/1 |" in out  # the console counts to where this run stops, not to `steps`
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000001"
    out = run_torchrun(MAIN, 1, ["train", cfg, f"run_dir={run_dir}"], timeout=300)  # resumes at step 1
    assert "resumed from" in out
    _check_run(run_dir)
    scalars = _scalars(run_dir)
    for key in STAGES + ("reward/mean", "loss/token_rm", "loss/kl", "sync/bytes", "eval/pass1"):
        assert key in scalars, f"{key} not logged; have {sorted(scalars)}"
    assert list((run_dir / "html").glob("step_*.html"))

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert model.config.vocab_size == 102


LAYOUTS = {"tp2": ("parallel.tensor=2",), "pp2": ("parallel.pipeline=2",),
           "dp2_distopt": ("parallel.distributed_optimizer=true",)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_two_steps_model_parallel_and_kill_resume(assets, name):
    """2 processes through every stage; at PP=2 and with the distributed optimizer over DP=2, a kill -9
    of the job during step 2 and a rerun of the same command end bit-identical to the uninterrupted run.
    The killed and resumed runs move their train state to the host during every rollout
    (policy.offload_train_state, mcore/offload.py): so the same comparison also shows that the loop's
    offload/reload choreography (Run.to_rollout / to_training, checkpoints taken while offloaded)
    changes nothing."""
    root, cfg = assets
    layout = LAYOUTS[name]
    run_dir = root / name
    run_torchrun(MAIN, 2, ["train", cfg, f"run_dir={run_dir}", *layout], timeout=400)
    _check_run(run_dir)
    scalars = _scalars(run_dir)
    for key in STAGES:
        assert key in scalars
    if name == "tp2":
        return
    killed = root / f"{name}_killed"
    layout = (*layout, "policy.offload_train_state=true")
    with pytest.raises(AssertionError, match="exited"):  # every rank SIGKILLs itself in step 2
        run_torchrun(MAIN, 2, ["train", cfg, f"run_dir={killed}", *layout], timeout=400,
                     env={"OREAL_TEST_FAULT": "train:1:kill", "OREAL_TEST_MARK": str(killed)})
    # nothing of the killed job stays behind (its checkpoint writers' Manager servers used to)
    assert leftover_processes("OREAL_TEST_MARK", str(killed)) == []
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_000001"
    out = run_torchrun(MAIN, 2, ["train", cfg, f"run_dir={killed}", *layout], timeout=400)
    assert "resumed from" in out
    _check_run(killed)
    assert_same_weights(exported_weights(run_dir), exported_weights(killed))  # kill + resume changed nothing
    rows = [(run_dir / "steps.jsonl").read_text(), (killed / "steps.jsonl").read_text()]
    assert rows[0] == rows[1]  # same prompts, rewards and kept sequences per step
