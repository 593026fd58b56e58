"""Reliability of `python -m megatron_oreal train` on a tiny CPU run: kill -9 at exact moments, SIGTERM,
a full disk, non-finite numbers, a crashing engine, a timed-out verifier, and bad input.

Faults are injected through the real CLI by the test-only $OREAL_TEST_FAULT hook
(checkpoint/resume.py `fault_point`): a process that SIGKILLs itself at a named point is a kill -9
at an exact moment, with no timing races. Runs are single processes (world of one, no torchrun), so
the exit status is the trainer's own. One uninterrupted reference run is shared by every comparison.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers.session import run_in_session
from helpers.tiny_run import assert_same_weights, exported_weights
from helpers.tmpfs import fill, mounted_tmpfs

from megatron_oreal.data import arith
from megatron_oreal.data.tiny_model import TinySize, make_random_tiny_model
from megatron_oreal.launch.signals import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[2]
MAIN = REPO / "megatron_oreal" / "__main__.py"

CONFIG = """
steps: 3
seed: 0
data: {{train_file: {root}/train.jsonl, eval_file: {root}/eval.jsonl, prompts_per_step: 2, system_prompt: none}}
rollout:
  sampling: {{n: 4, max_new_tokens: 8, max_total_length: 48, top_p: 1.0}}
algo: {{advantage: reinforce, selection: all, actor_freeze_steps: 1}}
policy: {{hf_path: {root}/hf, dtype: fp32, micro_batch_tokens: 256, optim: {{lr: 1e-3, min_lr: 1e-4, warmup_steps: 1}}}}
token_rm: {{optim: {{lr: 1e-3, min_lr: 1e-4, warmup_steps: 1}}}}
checkpoint: {{every: 1, keep: 2}}
eval: {{every: 1, max_new_tokens: 8, keep_best: true}}
log: {{html_every: 0, tensorboard: false}}
reward: {{workers: 1}}
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    make_random_tiny_model(root / "hf", seed=0, size=TinySize(layers=1, hidden=32, heads=2, kv_heads=1, ffn=64))
    arith.write_prompts_jsonl(root / "train.jsonl", arith.make_problems(12, seed=0, split="train"))
    arith.write_prompts_jsonl(root / "eval.jsonl", arith.make_problems(4, seed=0, split="heldout"))
    cfg = root / "run.yaml"
    cfg.write_text(CONFIG.format(root=root))
    return root, cfg


def train(cfg, run_dir, *overrides, fault: str = "", timeout: float = 240) -> subprocess.CompletedProcess:
    """One `train` process (its own session, so leftovers of a killed run are killed with it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OREAL_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    if fault:
        env["OREAL_TEST_FAULT"] = fault
    cmd = [sys.executable, str(MAIN), "train", str(cfg), f"run_dir={run_dir}", *overrides]
    res, timed_out = run_in_session(cmd, env, timeout)  # leftovers of a kill -9 are killed with the session
    if timed_out:
        raise AssertionError(f"train timed out after {timeout}s\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def latest(run_dir: Path) -> str | None:
    p = run_dir / "checkpoints" / "latest"
    return p.read_text().strip() if p.exists() else None


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "steps.jsonl").read_text().splitlines()]


def no_traceback(res) -> None:
    assert "Traceback" not in res.stderr, res.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(assets):
    root, cfg = assets
    run_dir = root / "ref"
    ok(train(cfg, run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    recs = records(run_dir)
    assert [r["step"] for r in recs] == [1, 2, 3] and all(len(r["uids"]) == 2 for r in recs)
    return run_dir, exported_weights(run_dir), recs, summary


@pytest.mark.slow
def test_kills_sigterm_and_full_disk_resume_bit_identical(assets, reference):
    """Six interruptions of one run, each resumed by the same command; the end equals the reference.

    checkpoint k = after k steps. Each row: fault, expected exit, `latest` afterwards.
    """
    root, cfg = assets
    ref_dir, ref_w, ref_recs, ref_summary = reference
    run_dir = root / "interrupted"
    kill = -signal.SIGKILL
    plan = [
        ("train:0:kill", kill, None),  # mid-step 1, before any checkpoint: starts over
        ("save_written:2:kill", kill, "step_000001"),  # mid-save (components written, no COMPLETE)
        ("save_renamed:2:kill", kill, "step_000001"),  # published dir, `latest` not yet moved
        ("save_written:2:enospc", 1, "step_000001"),  # full disk during a save
        ("sync:1:term", EXIT_PREEMPTED, "step_000002"),  # SIGTERM mid-step 2: finish it, save, exit 75
        ("sync:2:kill", kill, "step_000002"),  # after the update of step 3, before the weight sync
    ]
    for fault, code, expect_latest in plan:
        res = train(cfg, run_dir, fault=fault)
        assert res.returncode == code, f"{fault}: exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
        assert latest(run_dir) == expect_latest, fault
        if expect_latest:
            assert (run_dir / "checkpoints" / expect_latest / "COMPLETE").exists()
        if fault.endswith("enospc"):
            no_traceback(res)
            errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
            assert len(errors) == 1 and "No space left on device" in errors[0], res.stderr[-2000:]
            assert "step_000002" in errors[0] and "'step_000001'" in errors[0]
            assert not list((run_dir / "checkpoints").glob(".tmp_*"))  # the partial save is removed
        if fault.endswith("term"):
            assert "SIGTERM received: checkpoint written at step 2, exiting with code 75" in res.stdout
    res = ok(train(cfg, run_dir))
    assert "resumed from" in res.stdout and "step_000002" in res.stdout
    assert latest(run_dir) == "step_000003"
    assert_same_weights(exported_weights(run_dir), ref_w)  # bit-identical final weights
    assert records(run_dir) == ref_recs  # same prompts per step, same rewards, same kept sequences
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("eval_history", "eval_pass1_initial", "eval_pass1_best", "eval_best_step"):
        assert summary[key] == ref_summary[key], key


@pytest.mark.slow
def test_nonfinite_loss_skips_updates_then_aborts(assets):
    """eta = NaN makes every actor loss NaN (the RM's stays finite): the frozen step 1 reports it, steps 2
    and 3 skip the actor update (logged), and the actor ends bit-identical to the start; with a limit of
    2 the run stops at step 2 with one clear message and keeps its last checkpoint."""
    root, cfg = assets
    run_dir = root / "nan"
    res = ok(train(cfg, run_dir, "algo.negative_loss_factor=.nan", "algo.max_nonfinite_steps=4"))
    assert res.stdout.count("update skipped (") == 3, res.stdout[-3000:]
    assert "step 1: non-finite loss/policy: update skipped (1 in a row" in res.stdout
    assert "step 3: non-finite loss/policy, policy/grad_norm, policy/skipped: update skipped (3 in a row" in res.stdout
    assert [r["skipped"] for r in records(run_dir)] == [True, True, True]
    start = {k: v for f in (root / "hf").glob("*.safetensors") for k, v in load_file(f).items()}
    assert_same_weights(exported_weights(run_dir), start)

    res = train(cfg, root / "nan_abort", "algo.negative_loss_factor=.nan", "algo.max_nonfinite_steps=2")
    assert res.returncode == 1
    no_traceback(res)
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "algo.max_nonfinite_steps=2" in errors[0] and "'step_000001'" in errors[0]
    assert latest(root / "nan_abort") == "step_000001"


@pytest.mark.slow
def test_engine_restarts_verifier_timeouts_and_empty_selection(assets, reference):
    root, cfg = assets
    _, _, ref_recs, _ = reference
    # generate fails twice at step 2: two restarts (re-synced from the policy), same samples as the reference
    run_dir = root / "engine"
    res = ok(train(cfg, run_dir, "rollout.max_restarts=2", "--max-steps", "2", fault="rollout:1:raise:2"))
    assert res.stdout.count("restarting the rollout engine") == 2
    assert records(run_dir) == ref_recs[:2]
    # always failing: a bounded number of restarts, then one clear error
    res = train(cfg, root / "engine_dead", "rollout.max_restarts=1", fault="rollout:0:raise")
    assert res.returncode == 1
    no_traceback(res)
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "after 1 engine restarts (rollout.max_restarts=1)" in errors[0], res.stderr[-2000:]
    # a verifier slower than its deadline: the worker is killed, every sample scores -1 (timeout), no
    # prompt has both outcomes, the update is skipped, and the run still finishes
    run_dir = root / "verifier"
    res = ok(train(cfg, run_dir, "reward.timeout_s=0.000001", "algo.selection=one_pair", "eval.every=0"))
    recs = records(run_dir)
    assert [(r["reward_mean"], r["kept_sequences"], r["skipped"]) for r in recs] == [(-1.0, 0, True)] * 3
    assert "update skipped: 2 of 2 groups all wrong, 0 all correct" in res.stdout, res.stdout[-2000:]
    assert "OREAL's 1+1 selection drops all-wrong groups" in res.stdout
    assert latest(run_dir) == "step_000003"


def _checkpoint_listing(run_dir: Path) -> dict:
    root = run_dir / "checkpoints"
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.mark.slow
def test_bad_input_one_clear_message_checkpoint_intact(assets, reference, tmp_path):
    """Each bad input: non-zero exit, exactly one `error:` line naming the file/line/key, no traceback,
    and the run dir's previous checkpoint untouched."""
    root, cfg = assets
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    before = _checkpoint_listing(run_dir)
    text = cfg.read_text()

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(text + "steps: [1, 2\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text(text.replace("max_new_tokens: 8, keep_best", "max_new_token: 8, keep_best"))
    rows = [json.loads(x) for x in (root / "train.jsonl").read_text().splitlines()]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + '{"question": "1+1", \n')
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "2+2"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({**rows[0], "gold_answer": ""}) + "\n")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(root / "hf", no_weights)
    (no_weights / "model.safetensors").unlink()
    bad_weights = tmp_path / "bad_weights"  # a copy cut short (a full disk, an interrupted download)
    shutil.copytree(root / "hf", bad_weights)
    weights = (bad_weights / "model.safetensors").read_bytes()
    (bad_weights / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    no_template = tmp_path / "no_template"
    shutil.copytree(root / "hf", no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(tok_cfg))

    cases = [  # (config, overrides, exit code, substrings of the error line)
        (bad_yaml, [], 2, [str(bad_yaml), "line"]),
        (typo, [], 2, [str(typo), "eval.max_new_token", "did you mean 'max_new_tokens'"]),
        (cfg, ["steps=three"], 2, ["steps", "int"]),
        (cfg, ["policy.optim.lr=-1e-5"], 2, [str(cfg), "policy.optim.lr: must be in (0, inf), got -1e-05"]),
        (cfg, ["rollout.sampling.n=1", "algo.advantage=grpo"], 2, [str(cfg), "rollout.sampling.n", "grpo"]),
        (cfg, [f"data.train_file={broken}"], 2, [f"{broken}:3", "not valid JSON"]),
        (cfg, [f"data.train_file={missing}"], 2, [f"{missing}:2", "no answer field"]),
        (cfg, [f"data.train_file={empty}"], 2, [f"{empty}:1", "gold_answer"]),
        (cfg, [f"policy.hf_path={no_weights}"], 2, ["policy.hf_path", str(no_weights), "no *.safetensors"]),
        (cfg, [f"policy.hf_path={no_template}"], 2, ["chat template"]),
        (cfg, [f"policy.hf_path={bad_weights}"], 2, ["policy.hf_path", str(bad_weights / "model.safetensors"),
                                                      "is not a readable safetensors file"]),
    ]
    # Independent processes, most of their time spent importing: four at a time, each on its own copy
    # of the run dir (one run dir holds one trainer at a time: the run-dir lock).
    dirs = [run_dir] + [tmp_path / f"run{i}" for i in range(1, len(cases))]
    for d in dirs[1:]:
        shutil.copytree(run_dir, d)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda c: train(c[0][0], c[1], *c[0][1]), zip(cases, dirs)))
    for (config, overrides, code, needles), res, run_dir in zip(cases, results, dirs):
        what = f"{config.name} {overrides}"
        assert res.returncode == code, f"{what}: exit {res.returncode}\n{res.stderr[-3000:]}"
        no_traceback(res)
        errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
        assert len(errors) == 1, f"{what}: {res.stderr[-3000:]}"
        for needle in needles:
            assert needle in errors[0], f"{what}: {needle!r} not in {errors[0]!r}"
        assert _checkpoint_listing(run_dir) == before, what


# ---------------------------------------------------------------------------------------------------
# Issue 14: faults of a shared cluster. Each case: one line, nothing lost, the documented exit code.

def start(cfg, run_dir, *overrides, fault: str = "", env_extra: dict | None = None):
    """A `train` process in the background (its own session: the test signals or kills all of it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OREAL_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), **(env_extra or {}))
    if fault:
        env["OREAL_TEST_FAULT"] = fault
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    cmd = [sys.executable, str(MAIN), "train", str(cfg), f"run_dir={run_dir}", *overrides]
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, start_new_session=True)
    return proc, out, err


def finish(started, timeout: float = 300) -> subprocess.CompletedProcess:
    proc, out, err = started
    try:
        proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the session
        except ProcessLookupError:
            pass
        proc.wait()
    out.seek(0), err.seek(0)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def wait_for(cond, timeout: float = 240, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(every)


def one_error(res) -> str:
    no_traceback(res)
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_second_trainer_on_a_run_dir_refuses_and_the_first_is_untouched(assets, reference, tmp_path):
    root, cfg = assets
    _, ref_w, ref_recs, _ = reference
    run_dir, release = tmp_path / "run", tmp_path / "release"
    first = start(cfg, run_dir, fault="train:1:wait", env_extra={"OREAL_TEST_WAIT_FILE": str(release)})
    try:
        wait_for(lambda: Path(f"{release}.waiting").exists())  # the first holds the lock, mid-step 2
        res = train(cfg, run_dir)  # a resubmitted job on the same run dir
    finally:
        release.touch()
    line = one_error(res)
    assert res.returncode == 1
    assert line.startswith(f"error: run dir {run_dir} is in use by another trainer (pid {first[0].pid} on host ")
    ok(finish(first))  # the first run went on undisturbed and ended like the reference
    assert records(run_dir) == ref_recs
    assert_same_weights(exported_weights(run_dir), ref_w)
    assert (run_dir / ".lock").read_text() == ""  # released at exit


def _flip(path: Path, n: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_damaged_checkpoint_falls_back_to_the_intact_one_and_never_exports_damage(assets, reference, tmp_path):
    """4 KiB flipped in the latest weights (the issue's silent corruption): named, the previous intact
    checkpoint is used, and the run ends bit-identical to the reference; with no intact checkpoint left,
    one line, exit 1, and the exported hf/ is not replaced."""
    root, cfg = assets
    ref_dir, ref_w, ref_recs, _ = reference
    run_dir = tmp_path / "run"
    shutil.copytree(ref_dir, run_dir)
    ck = run_dir / "checkpoints"
    weights = max((ck / "step_000003" / "policy").rglob("*.distcp"), key=lambda p: p.stat().st_size)
    _flip(weights)
    res = ok(train(cfg, run_dir))
    rel = weights.relative_to(ck / "step_000003")
    assert (f"warning: checkpoint step_000003 is damaged: {ck / 'step_000003' / rel}: content changed: its SHA-256 "
            "differs from the manifest's") in res.stdout, res.stdout[-3000:]
    assert ("resuming from step_000002, the newest intact checkpoint (step_000003 renamed step_000003.damaged)"
            in res.stdout)
    assert (ck / "step_000003.damaged" / rel).exists()  # kept for inspection
    assert records(run_dir) == ref_recs
    assert_same_weights(exported_weights(run_dir), ref_w)  # step 3 was re-run from intact weights

    hf_before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "hf").iterdir()}
    _flip(ck / "step_000003" / rel)
    (ck / "step_000002" / "state.json").write_text("")  # emptied
    res = train(cfg, run_dir)
    line = one_error(res)
    assert res.returncode == 1
    assert line.startswith(f"error: no intact checkpoint in {ck}: ")
    assert f"{ck / 'step_000003' / rel}: content changed" in line and f"{ck / 'step_000002' / 'state.json'}: empty" in line
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "hf").iterdir()} == hf_before


@pytest.mark.slow
def test_usr1_and_term_to_every_process_of_the_run(assets, reference, tmp_path):
    """As `scancel --signal=USR1` delivers it: to the trainer, its verifier workers and Megatron's
    checkpoint writers alike. In the first second (imports): exit 75, nothing to save. A storm of
    USR1/TERM during a checkpoint save: exit 75 with a checkpoint. The rerun ends bit-identical."""
    root, cfg = assets
    _, ref_w, ref_recs, _ = reference
    run_dir = tmp_path / "run"
    early = start(cfg, run_dir)
    time.sleep(1.0)
    os.killpg(early[0].pid, signal.SIGUSR1)
    res = finish(early)
    assert res.returncode == EXIT_PREEMPTED, f"exit {res.returncode}\n{res.stderr[-3000:]}"  # was 138
    assert "SIGUSR1 received while starting: nothing new to save (latest checkpoint: None), exiting with code 75" \
        in res.stdout
    no_traceback(res)

    storm = start(cfg, run_dir)
    wait_for(lambda: (run_dir / "checkpoints" / ".tmp_step_000001").exists(), every=0.005)
    for i in range(12):  # any number, mixed, to every process of the session (writers included)
        try:
            os.killpg(storm[0].pid, signal.SIGTERM if i % 3 == 2 else signal.SIGUSR1)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    res = finish(storm)
    assert res.returncode == EXIT_PREEMPTED, f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    no_traceback(res)
    stopped = re.search(r"received: checkpoint written at step (\d+), exiting with code 75", res.stdout)
    assert stopped and latest(run_dir) == f"step_{int(stopped.group(1)):06d}"
    ok(train(cfg, run_dir))
    assert records(run_dir) == ref_recs
    assert_same_weights(exported_weights(run_dir), ref_w)


@pytest.fixture
def small_fs(tmp_path):
    """A real 2 MiB filesystem (tmpfs): one tiny checkpoint (1.2 MB) fits, a second does not."""
    with mounted_tmpfs(tmp_path / "fs", "2m") as mnt:
        yield mnt


@pytest.mark.slow
def test_real_full_disk_at_a_checkpoint_and_at_the_export(assets, reference, small_fs, tmp_path):
    """A real full filesystem as the run dir. Each time: one `error:` line saying "no space left on
    device", the path, and what is intact; exit 1; after freeing space the same command resumes and
    the run ends bit-identical to the reference."""
    root, cfg = assets
    _, ref_w, ref_recs, _ = reference
    run_dir = small_fs / "run"
    # 1. the checkpoint of step 2 does not fit (torch's zip writer inside Megatron's save: "unexpected pos")
    res = train(cfg, run_dir)
    line = one_error(res)
    assert res.returncode == 1 and latest(run_dir) == "step_000001"
    assert line.startswith(f"error: saving checkpoint {run_dir / 'checkpoints' / 'step_000002'} failed: no space "
                           f"left on device writing {run_dir / 'checkpoints' / '.tmp_step_000002'} (")
    assert line.endswith("`latest` still points at 'step_000001', which is intact")
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_fs)], check=True)
    release = tmp_path / "release"
    # 2. the disk fills up after the last checkpoint, before the HF export (safetensors: SafetensorError).
    #    (steps.jsonl, eval files and TensorBoard meet a full disk as OSError: tests/unit/checkpoint/test_full_disk.py)
    run = start(cfg, run_dir, fault="export:3:wait", env_extra={"OREAL_TEST_WAIT_FILE": str(release)})
    wait_for(lambda: Path(f"{release}.waiting").exists())  # the last checkpoint is written, the export is next
    ballast = fill(small_fs)
    release.touch()
    res = finish(run)
    line = one_error(res)
    assert res.returncode == 1 and not (run_dir / "hf").exists()
    assert line == (f"error: no space left on device writing {run_dir / 'hf'} (0 KiB free); the checkpoint "
                    "'step_000003' is intact; free space and rerun the same command")
    ballast.unlink()
    ok(train(cfg, run_dir))
    assert records(run_dir) == ref_recs
    assert_same_weights(exported_weights(run_dir), ref_w)
