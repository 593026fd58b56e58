"""`python -m megatron_oreal train CONFIG [section.key=value ...]`: the OREAL loop (docs/design.md, one iteration).

    rollout -> reward -> advantages + selection -> token-RM update -> policy update -> weight sync

Each stage is one call; set-up, checkpoints, evaluation and the engine's memory choreography live in
runtime.py. The same command on a run dir that holds a checkpoint resumes from it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from megatron_oreal.algo.selection import build_train_batch
from megatron_oreal.checkpoint.diskfull import DiskFull, disk_full_error, is_disk_full
from megatron_oreal.checkpoint.resume import CheckpointError, RunCheckpointer, fault_point
from megatron_oreal.config import ConfigError, RunConfig, load_config
from megatron_oreal.data.prompts import DataError
from megatron_oreal.data.templates import TemplateError
from megatron_oreal.launch.malloc import keep_freed_memory
from megatron_oreal.launch.signals import PreemptionHandler, finish_preemption
from megatron_oreal.runtime import Run, RunError, log
from megatron_oreal.step_log import StepLog


def run(cfg: RunConfig, *, max_steps: int | None = None, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train until cfg.steps (or max_steps more steps); returns the summary (also RUN_DIR/summary.json)."""
    with PreemptionHandler() as preemption:
        return _train(cfg, preemption, max_steps, on_step)


def _train(cfg: RunConfig, preemption: PreemptionHandler, max_steps: int | None, on_step) -> dict:
    r = Run(cfg)
    try:
        resumed = r.maybe_resume()
        r.trim_step_records()  # steps after the checkpoint are re-run: drop their old records
        start = r.state.step
        end = cfg.steps if max_steps is None else min(cfg.steps, start + max_steps)
        steplog = StepLog(r, last_step=end)
        r.to_rollout()  # the engine starts from the HF files; after a resume it must get the trained weights
        if preemption.should_stop():  # asked to stop while starting: nothing new to save
            code = finish_preemption(r.layout.is_main, torch.distributed.barrier)
            log(f"{preemption.signal_name} received while starting: nothing new to save (latest checkpoint: "
                f"{r.checkpointer.latest_name()!r}), exiting with code {code}", r.rank)
            raise SystemExit(code)
        if not resumed:
            r.evaluate(0)
        # Everything built so far (modules, weights' wrappers, imported libraries: ~500k objects on the
        # tiny model) lives for the whole run; frozen, the cyclic GC stops rescanning it. A full
        # collection over it took 0.25 s, once inside the demo's loop (measured); now it scans only what
        # the loop creates. Reference counting still frees frozen objects.
        gc.freeze()
        keep_freed_memory()  # the loop's tensors re-use heap pages instead of faulting in new ones
        for step in range(start, end):
            t0 = time.perf_counter()
            r.timer.step_start()  # time/step excludes start-up (initial sync, step-0 eval) and evals/saves
            with r.timer.stage("rollout"):
                groups = r.rollout(next(r.prompts), step)
            with r.timer.stage("selection"):
                batch = build_train_batch(groups, cfg.algo.advantage, cfg.algo.selection, cfg.seed, step)
            r.to_training()
            fault_point("train", step)
            with r.timer.stage("train"):
                if batch.sequences:
                    metrics = r.trainer.update(batch, step)
                else:  # every group all-correct or all-wrong: nothing to learn from, the LR still follows the step
                    metrics = {"skipped": 1.0}
                    log(f"step {step + 1}: update skipped: {nothing_to_learn(groups, cfg.algo.selection)}", r.rank)
            r.check_finite(step, metrics)
            fault_point("sync", step)
            with r.timer.stage("weight_sync"):
                metrics.update(r.to_rollout())
            r.state.step = step + 1
            metrics = steplog.record(step, groups, batch, metrics)
            r.append_step_record(step, groups, batch, metrics)
            if on_step is not None:
                on_step(step, metrics)
            done = step + 1 == end
            if cfg.eval.every and ((step + 1) % cfg.eval.every == 0) or done:
                r.evaluate(step + 1)
            r.state.wall_seconds += time.perf_counter() - t0  # the step, its eval and its log
            stop = preemption.should_stop()  # collective: every rank stops at the same step
            if stop or done or (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0):
                r.save(step + 1)
            if stop and not done:
                code = finish_preemption(r.layout.is_main, torch.distributed.barrier)
                log(f"{preemption.signal_name or 'preemption'} received: checkpoint written at step {step + 1}, "
                    f"exiting with code {code}", r.rank)
                raise SystemExit(code)
        summary = steplog.summary()
        if r.state.step >= cfg.steps and cfg.checkpoint.export_hf:
            fault_point("export", r.state.step)
            r.export_hf(r.run_dir / "hf")
        if r.layout.is_main:
            (r.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        gc.unfreeze()  # the run's objects may be garbage now (an in-process caller runs on, e.g. a test)
        r.close()


def _disk_full_line(exc: BaseException, run_dir: str) -> str:
    """A full disk outside a checkpoint save (steps.jsonl, eval files, TensorBoard, the HF export):
    the last checkpoint is intact (resume.py publishes atomically); say so instead of a traceback."""
    if isinstance(exc, DiskFull):
        return str(exc)
    path = getattr(exc, "filename", None) or run_dir
    latest = RunCheckpointer(run_dir).latest_name()
    intact = f"the checkpoint {latest!r} is intact" if latest else "no checkpoint was written yet"
    return str(disk_full_error(path, f"{intact}; free space and rerun the same command to resume"))


def nothing_to_learn(groups: list, selection: str) -> str:
    """Why a step had no training sequence, with the counts a user needs to fix the settings."""
    wrong = sum(g.pass_rate == 0 for g in groups)
    right = sum(g.pass_rate == 1 for g in groups)
    samples = [s for g in groups for s in g.samples]
    cut = sum(s.finish_reason == "length" for s in samples)
    text = (f"{wrong} of {len(groups)} groups all wrong, {right} all correct; {cut} of {len(samples)} samples hit "
            "the token limit")
    if selection == "one_pair" and wrong:
        text += ("; OREAL's 1+1 selection drops all-wrong groups: for a weak model use easier prompts, more "
                 "samples (rollout.sampling.n) or more tokens (rollout.sampling.max_new_tokens)")
    return text


def check_model_layout(cfg) -> None:
    """ConfigError when policy.hf_path's heads/layers do not allow parallel.tensor x parallel.pipeline."""
    from megatron_oreal.mcore.hf_config import check_layout

    path = Path(cfg.policy.hf_path) / "config.json"
    if not path.is_file():
        return  # Run reports a missing model with its own message
    try:
        check_layout(json.loads(path.read_text()), cfg.parallel.tensor, cfg.parallel.pipeline, where=str(path))
    except ValueError as exc:
        raise ConfigError(f"parallel.tensor={cfg.parallel.tensor} parallel.pipeline={cfg.parallel.pipeline}: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_oreal train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML run config (see examples/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. run_dir=runs/a steps=20")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resumable)")
    args = parser.parse_intermixed_args(argv)  # overrides may follow --options
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        check_model_layout(cfg)
    except ConfigError as exc:  # before any process group: one line from rank 0, no worker traceback
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg, max_steps=args.max_steps)
    except (ConfigError, DataError, TemplateError) as exc:  # bad input: the config, the data, the model folder
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RunError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if not is_disk_full(exc, cfg.run_dir):
            raise
        print(f"error: {_disk_full_line(exc, cfg.run_dir)}", file=sys.stderr)
        return 1
    log(json.dumps(summary, indent=2))
    return 0
