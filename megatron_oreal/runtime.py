"""Everything one OREAL run holds, built from a RunConfig, and the helpers the loop calls.

`train.py` reads like the algorithm; this file owns the set-up (parallel state, models, optimizers,
engine, verifier, data, checkpoints, logs), the memory choreography around the engine (release
before training, resume + weight sync after), evaluation and run checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_oreal.checkpoint.resume import RunCheckpointer, fault_point
from megatron_oreal.config import RunConfig, to_dict
from megatron_oreal.launch.signals import agree_any
from megatron_oreal.stages import Comm, EvalResult, evaluate, gather_groups, rollout_and_score, share_groups


def log(msg: str, rank: int = 0) -> None:
    if rank == 0:
        print(msg, flush=True)


class RunError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""


@dataclass
class RunState:
    step: int = 0
    best_pass1: float = -1.0
    best_step: int = -1
    initial_pass1: float | None = None
    history: list[dict] = field(default_factory=list)  # eval records: {"step", "pass1"}
    nonfinite_in_row: int = 0
    wall_seconds: float = 0.0
    tokens: float = 0.0


def read_hf_config(hf_path: str) -> dict:
    path = Path(hf_path) / "config.json"
    if not path.is_file():
        raise RunError(f"policy.hf_path: {hf_path!r} has no config.json (expected a Hugging Face model folder)")
    weights = list(Path(hf_path).glob("*.safetensors"))
    if not weights:
        raise RunError(f"policy.hf_path: {hf_path!r} has no *.safetensors weights")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{path}: malformed JSON: {exc}") from None


class Run:
    """Built collectively on every rank; rank 0 logs and writes files."""

    def __init__(self, cfg: RunConfig):
        from megatron_oreal.checkpoint.hf_io import load_hf_weights
        from megatron_oreal.data.prompts import PromptStream, check_prompt_lengths, load_eval_prompts
        from megatron_oreal.data.templates import load_tokenizer
        from megatron_oreal.mcore import parallel
        from megatron_oreal.mcore.model import ReferenceWeights, build_policy, build_token_rm
        from megatron_oreal.mcore.train_step import OrealTrainer
        from megatron_oreal.observability.tb import MetricsWriter
        from megatron_oreal.observability.timers import StageTimer

        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.hf_config = read_hf_config(cfg.policy.hf_path)
        self.tokenizer = load_tokenizer(cfg.policy.hf_path)
        self.layout = layout = parallel.init_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, seed=cfg.seed,
                                                        timeout_minutes=cfg.parallel.timeout_minutes)
        self.rank = layout.rank
        if layout.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")

        # Data first: a bad prompt file should fail before minutes of model building.
        self.prompts = PromptStream.from_config(cfg.data, self.tokenizer, dp_rank=layout.dp_rank, dp_size=layout.dp)
        self.eval_prompts = load_eval_prompts(cfg.data, self.tokenizer) if cfg.data.eval_file else []
        max_pos = int(self.hf_config.get("max_position_embeddings") or 0)
        check_prompt_lengths(self.prompts.prompts, cfg.rollout.sampling.max_total_length, max_pos,
                             "rollout.sampling")
        check_prompt_lengths(self.eval_prompts, cfg.rollout.sampling.max_total_length, max_pos, "rollout.sampling")

        t0 = time.time()
        kw = dict(dtype=cfg.policy.dtype, fp8=cfg.policy.fp8)
        if cfg.policy.recompute:  # full activation recompute, as the reference runs (OREAL.md §7)
            kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        policy = build_policy(self.hf_config, layout, **kw)
        load_hf_weights(policy, cfg.policy.hf_path, layout)
        self.reference = ReferenceWeights(policy)  # the frozen initial policy, on the host
        token_rm = None
        if cfg.token_rm.enabled and cfg.algo.token_weighting != "none":
            token_rm = build_token_rm(self.hf_config, layout, **kw)
            load_hf_weights(token_rm, cfg.policy.hf_path, layout)
        self.trainer = OrealTrainer(
            policy, token_rm, self.reference, layout, cfg.algo, cfg.policy.optim, cfg.token_rm.optim, cfg.steps,
            micro_batch_tokens=cfg.policy.micro_batch_tokens, distributed_optimizer=cfg.parallel.distributed_optimizer,
        )
        log(f"models ready in {time.time() - t0:.1f}s: {layout}", self.rank)

        self.comm = Comm(
            is_engine_rank=layout.tp_rank == 0 and layout.pp_rank == 0,
            engine_src=min(torch.distributed.get_process_group_ranks(parallel.model_parallel_group())),
            mp_group=parallel.model_parallel_group(),
            dp_group=parallel.dp_group(gloo=True) if layout.dp > 1 else None,
            dp_size=layout.dp,
            dp_rank=layout.dp_rank,
        )
        self.engine = self.verifier = None
        if self.comm.is_engine_rank:
            self._start_engine()
        from megatron_oreal.rollout.stops import default_stop_ids

        # eos + the chat template's end-of-turn token + generation_config's end tokens (rollout/stops.py)
        self.stop_ids = default_stop_ids(self.tokenizer, cfg.policy.hf_path)
        self.checkpointer = RunCheckpointer(self.run_dir, keep=cfg.checkpoint.keep, rank=self.rank,
                                            barrier=torch.distributed.barrier)
        self.timer = StageTimer()
        self.writer = MetricsWriter(self.run_dir / "tb", enabled=cfg.log.tensorboard, rank=self.rank)
        self.state = RunState()
        self.synced_once = False

    # ------------------------------------------------------------------ engine + weight sync
    def _start_engine(self) -> None:
        from megatron_oreal.reward.pool import Verifier
        from megatron_oreal.rollout import build_engine

        cfg = self.cfg
        self.engine = build_engine(cfg.rollout.engine, cfg.policy.hf_path, self.tokenizer, cfg.rollout)
        self.verifier = Verifier(workers=cfg.reward.workers, timeout=cfg.reward.timeout_s,
                                 llm_judge=_llm_judge(cfg.reward))

    def sync_weights(self) -> dict[str, float]:
        """Policy (Megatron shards) -> HF tensors -> the engine. Collective."""
        from megatron_oreal.checkpoint.gather import iter_hf_tensors
        from megatron_oreal.sync import InProcessTransport, SGLangIPCTransport, sync_weights

        cfg = self.cfg.rollout
        if torch.cuda.is_available():  # hand the activations' cached blocks back before the engine resumes
            torch.cuda.empty_cache()
        bucket_bytes = cfg.sync_bucket_mb << 20
        source = iter_hf_tensors(self.trainer.policy, self.layout, bucket_bytes=bucket_bytes)
        if not self.comm.is_engine_rank:
            for _ in source:  # take part in the collectives; the tensors land on the engine rank
                pass
            return {}
        transport = SGLangIPCTransport(self.engine) if cfg.engine == "sglang" else InProcessTransport(self.engine)
        flat = ((name, t) for bucket in source for name, t in bucket)
        check = cfg.check_weights_after_first_sync and not self.synced_once
        metrics = sync_weights(flat, transport, fp8=cfg.fp8, bucket_bytes=bucket_bytes, check=check)
        self.synced_once = True
        return metrics.as_dict()

    def rollout(self, prompts: list, step: int) -> list:
        """rollout_and_score, restarting a failed engine (re-synced from the policy) and retrying the
        same prompts with the same seed, at most rollout.max_restarts times. Collective: the engine
        ranks generate alone, then every rank learns whether any failed before the groups are shared
        (a failure inside the broadcast would leave the other ranks waiting)."""
        sampling, limit = self.sampling(step), self.cfg.rollout.max_restarts
        for attempt in range(limit + 1):
            groups, error = None, None
            if self.comm.is_engine_rank:
                try:
                    fault_point("rollout", step)
                    groups = rollout_and_score(self.engine, prompts, sampling, self.tokenizer, self.verifier, Comm())
                except Exception as exc:  # any engine failure: the engine is rebuilt, the data is not lost
                    error = f"{type(exc).__name__}: {exc}"
                    print(f"[rank {self.rank}] rollout at step {step + 1} failed: {error}", flush=True)
            if not agree_any(error is not None):
                return gather_groups(share_groups(groups, self.comm), self.comm)
            if attempt == limit:
                break
            log(f"step {step + 1}: restarting the rollout engine ({attempt + 1}/{limit}) and retrying", self.rank)
            self.restart_engine()
        raise RunError(f"rollout failed at step {step + 1} after {limit} engine restarts (rollout.max_restarts={limit})"
                       + (f": {error}" if error else " on another rank (see its log)"))

    def restart_engine(self) -> None:
        if self.engine is not None:
            try:
                self.engine.close()
            except Exception as exc:  # a dead engine may not close cleanly; the new one replaces it anyway
                print(f"[rank {self.rank}] closing the failed engine: {type(exc).__name__}: {exc}", flush=True)
            from megatron_oreal.rollout import build_engine

            cfg = self.cfg
            self.engine = build_engine(cfg.rollout.engine, cfg.policy.hf_path, self.tokenizer, cfg.rollout)
        self.sync_weights()  # the new engine starts from the HF files: give it the trained weights

    def release_engine(self) -> None:
        if self.engine is not None:
            self.engine.release_memory()

    def sampling(self, step: int):
        from megatron_oreal.rollout.engine import SamplingParams

        params = SamplingParams.from_config(self.cfg.rollout.sampling, default_stop_ids=self.stop_ids)
        params = dataclasses.replace(params, return_logprobs=self.cfg.rollout.log_logprob_mismatch)
        return params.with_seed(self.cfg.rollout.sampling.seed * 1_000_003 + step)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int) -> EvalResult | None:
        from megatron_oreal.rollout.engine import SamplingParams

        if not self.eval_prompts:
            return None
        s = self.cfg.rollout.sampling
        greedy = SamplingParams.greedy_eval(self.cfg.eval.max_new_tokens or s.max_new_tokens, self.stop_ids,
                                            s.max_total_length)
        result = evaluate(self.engine, self.eval_prompts, greedy, self.tokenizer, self.verifier, self.comm,
                          batch_size=self.cfg.eval.batch_size)
        st = self.state
        if st.initial_pass1 is None:
            st.initial_pass1 = result.pass1
        st.history.append({"step": step, "pass1": result.pass1})
        improved = result.pass1 > st.best_pass1
        if improved:
            st.best_pass1, st.best_step = result.pass1, step
        if self.layout.is_main:
            out = self.run_dir / "eval" / f"step_{step:06d}.jsonl"
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "w") as f:
                for p in result.predictions:
                    f.write(json.dumps(p) + "\n")
            mark = " (best)" if improved else ""
            log(f"eval @ step {step}: {result.table()}{mark}", self.rank)
        self.writer.write(step, {"eval/pass1": result.pass1, "eval/mean_response_tokens": result.mean_response_tokens})
        if improved and self.cfg.eval.keep_best and step > 0:
            self.export_hf(self.run_dir / "best_hf")
        return result

    # ------------------------------------------------------------------ numerical faults + step records
    def check_finite(self, step: int, metrics: dict) -> None:
        """Count steps with a non-finite loss or grad norm (their updates were skipped, mcore/optim.py)
        and stop after algo.max_nonfinite_steps in a row. Metrics are reduced, so every rank agrees."""
        bad = [k for k in ("loss/policy", "rm/loss", "policy/grad_norm", "rm/grad_norm")
               if k in metrics and not finite(metrics[k])]
        bad += [k for k in ("policy/skipped", "rm/skipped") if metrics.get(k)]
        st, limit = self.state, self.cfg.algo.max_nonfinite_steps
        if not bad:
            st.nonfinite_in_row = 0
            return
        st.nonfinite_in_row += 1
        metrics["nonfinite"] = 1.0
        log(f"step {step + 1}: non-finite {', '.join(sorted(set(bad)))}: update skipped "
            f"({st.nonfinite_in_row} in a row, limit algo.max_nonfinite_steps={limit})", self.rank)
        if st.nonfinite_in_row >= limit:
            raise RunError(f"{st.nonfinite_in_row} steps in a row (up to step {step + 1}) had a non-finite loss or "
                           f"gradient norm (algo.max_nonfinite_steps={limit}); stopping. The last checkpoint is "
                           f"{self.checkpointer.latest_name()!r}; lower the learning rate or check the data.")

    @property
    def step_records(self) -> Path:
        return self.run_dir / "steps.jsonl"

    def append_step_record(self, step: int, groups: list, batch: Any, metrics: dict) -> None:
        """RUN_DIR/steps.jsonl: one line per finished step (the data order, for audits and resume checks)."""
        if not self.layout.is_main:
            return
        def num(k):
            v = metrics.get(k)
            return float(v) if finite(v) else None
        rec = {"step": step + 1, "uids": [g.prompt.uid for g in groups], "reward_mean": num("reward/mean"),
               "kept_sequences": batch.num_sequences, "loss_policy": num("loss/policy"),
               "skipped": bool(metrics.get("skipped") or metrics.get("nonfinite"))}
        with open(self.step_records, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def trim_step_records(self) -> None:
        """Keep the records up to the step we (re)start from: later steps are re-run (and a line cut by
        a kill is dropped)."""
        if not self.layout.is_main or not self.step_records.exists():
            return
        keep = []
        for line in self.step_records.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= self.state.step:
                    keep.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
        self.step_records.write_text("".join(keep))

    # ------------------------------------------------------------------ checkpoints
    def _components(self) -> dict[str, tuple[Any, Any]]:
        parts = {"policy": (self.trainer.policy, self.trainer.policy_opt)}
        if self.trainer.token_rm is not None:
            parts["token_rm"] = (self.trainer.token_rm, self.trainer.rm_opt)
        return parts

    def save(self, step: int) -> Path:
        from megatron_oreal.mcore.run_state import model_and_optimizer_writer

        writers = {name: model_and_optimizer_writer(m, o) for name, (m, o) in self._components().items()}
        st = self.state
        state = {"data": self.prompts.state_dict(), "best_pass1": st.best_pass1, "best_step": st.best_step,
                 "initial_pass1": st.initial_pass1, "history": st.history, "wall_seconds": st.wall_seconds,
                 "tokens": st.tokens, "nonfinite_in_row": st.nonfinite_in_row,
                 "layout": {"tp": self.layout.tp, "pp": self.layout.pp, "dp": self.layout.dp}}
        t0 = time.time()
        path = self.checkpointer.save(step, writers, state)
        log(f"checkpoint {path} ({time.time() - t0:.1f}s)", self.rank)
        return path

    def maybe_resume(self) -> bool:
        from megatron_oreal.mcore.run_state import model_and_optimizer_reader

        path = self.checkpointer.latest()
        if path is None:
            return False
        readers = {name: model_and_optimizer_reader(m, o) for name, (m, o) in self._components().items()}
        state = self.checkpointer.load(path, readers)
        st = self.state
        st.step = int(state["step"])
        st.best_pass1, st.best_step = state["best_pass1"], state["best_step"]
        st.initial_pass1, st.history = state["initial_pass1"], state["history"]
        st.wall_seconds, st.tokens = state.get("wall_seconds", 0.0), state.get("tokens", 0.0)
        st.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        self.prompts.load_state_dict(state["data"])
        log(f"resumed from {path} at step {st.step}", self.rank)
        return True

    def export_hf(self, out_dir: Path) -> None:
        from megatron_oreal.checkpoint.gather import export_hf

        export_hf(self.trainer.policy, self.layout, str(out_dir), self.hf_config, hf_dir=self.cfg.policy.hf_path,
                  log=lambda m: log(m, self.rank))

    def close(self) -> None:
        self.writer.close()
        if self.verifier is not None:
            self.verifier.close()
        if self.engine is not None:
            self.engine.close()


def _llm_judge(reward_cfg) -> Any:
    if not reward_cfg.llm_judge_url:
        return None
    from megatron_oreal.reward.llm_judge import LLMJudge

    return LLMJudge(reward_cfg.llm_judge_url, reward_cfg.llm_judge_model)


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
