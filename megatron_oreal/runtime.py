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

from megatron_oreal.checkpoint.diskfull import disk_full_error, is_disk_full, naming
from megatron_oreal.checkpoint.resume import RunCheckpointer, all_gather_object, fault_point
from megatron_oreal.config import ConfigError, RunConfig, to_dict
from megatron_oreal.launch.runlock import RunDirLock, RunDirLocked
from megatron_oreal.launch.signals import agree_any, shield_children
from megatron_oreal.stages import (Comm, EvalResult, engine_share, evaluate, gather_groups, rollout_and_score,
                                   share_groups)


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
    """config.json of the model folder, after checking that its safetensors files are readable (a bad
    input: ConfigError, exit 2, before any model is built)."""
    path = Path(hf_path) / "config.json"
    if not path.is_file():
        raise ConfigError(f"policy.hf_path: {hf_path!r} has no config.json (expected a Hugging Face model folder)")
    weights = sorted(Path(hf_path).glob("*.safetensors"))
    if not weights:
        raise ConfigError(f"policy.hf_path: {hf_path!r} has no *.safetensors weights")
    check_safetensors(weights)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"policy.hf_path: {path}: malformed JSON: {exc}") from None


def check_safetensors(files: list[Path]) -> None:
    """Header and size of each file: a truncated, emptied or overwritten file fails here in one line.
    (safe_open parses the header and checks that the tensors' byte ranges fit the file; the data
    itself has no checksum in the format, so flipped bytes inside a tensor cannot be seen.)"""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                for name in h.keys():
                    h.get_slice(name).get_shape()
        except Exception as exc:  # SafetensorError, OSError: the reason is the library's
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ConfigError(f"policy.hf_path: {f} is not a readable safetensors file ({why})") from None


class Run:
    """Built collectively on every rank; rank 0 logs and writes files."""

    def __init__(self, cfg: RunConfig):
        from megatron_oreal.data.templates import load_tokenizer
        from megatron_oreal.mcore import parallel

        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.hf_config = read_hf_config(cfg.policy.hf_path)
        self.tokenizer = load_tokenizer(cfg.policy.hf_path)
        self.layout = layout = parallel.init_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, seed=cfg.seed,
                                                        timeout_minutes=cfg.parallel.timeout_minutes)
        self.rank = layout.rank
        self.lock = self._lock_run_dir()
        try:
            with shield_children():  # the verifier pool and the engine start their processes here
                self._build(cfg, layout)
        except BaseException:
            self.lock.release()
            raise

    def _lock_run_dir(self) -> RunDirLock:
        """Rank 0 locks RUN_DIR/.lock before anything in the run dir is touched; every rank learns the
        outcome (a collective), so a refused run stops everywhere with one message."""
        lock, refusal = RunDirLock(self.run_dir), None
        if self.layout.is_main:
            try:
                lock.acquire()
                if lock.note:
                    log(f"{self.run_dir}: {lock.note}")
            except RunDirLocked as exc:
                refusal = str(exc)
        if agree_any(refusal is not None):
            raise RunError(refusal or "the run dir is in use by another trainer (see rank 0's message)")
        return lock

    def _build(self, cfg: RunConfig, layout) -> None:
        from megatron_oreal.checkpoint.hf_io import load_hf_weights
        from megatron_oreal.data.prompts import PromptStream, check_prompt_lengths, load_eval_prompts
        from megatron_oreal.mcore import parallel
        from megatron_oreal.mcore.model import ReferenceWeights, build_policy, build_token_rm
        from megatron_oreal.mcore.train_step import OrealTrainer
        from megatron_oreal.observability.tb import MetricsWriter
        from megatron_oreal.observability.timers import StageTimer

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
        kw = dict(dtype=cfg.policy.dtype, fp8=cfg.policy.fp8, allow_local_spec=cfg.policy.allow_local_spec)
        if cfg.policy.recompute:  # full activation recompute, as the reference runs (docs/algorithm.md §7)
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
        from megatron_oreal.mcore.offload import train_state_offload

        self.offload = train_state_offload(self.trainer, enabled=cfg.policy.offload_train_state, device=layout.device)
        log(f"models ready in {time.time() - t0:.1f}s: {layout}", self.rank)

        # Ranks without an engine wait for the rollout and evaluation in these collectives: gloo
        # groups, so the wait blocks a CPU thread instead of a NCCL kernel on a GPU SGLang is using.
        self.host_world = parallel.world_group(gloo=True)
        every_stage = cfg.rollout.engines_on_every_stage
        self.comm = Comm(
            is_engine_rank=layout.tp_rank == 0 and (layout.pp_rank == 0 or every_stage),
            engine_src=min(torch.distributed.get_process_group_ranks(parallel.model_parallel_group())),
            mp_group=parallel.model_parallel_group(gloo=True),
            dp_group=parallel.dp_group(gloo=True) if layout.dp > 1 else None,
            dp_size=layout.dp,
            dp_rank=layout.dp_rank,
            engines=layout.pp if every_stage else 1,
            engine_index=layout.pp_rank if every_stage else 0,
        )
        self.engine = self.verifier = None
        self.start_engines()
        from megatron_oreal.rollout.stops import default_stop_ids

        # eos + the chat template's end-of-turn token + generation_config's end tokens (rollout/stops.py)
        self.stop_ids = default_stop_ids(self.tokenizer, cfg.policy.hf_path)
        self.checkpointer = RunCheckpointer(self.run_dir, keep=cfg.checkpoint.keep, rank=self.rank,
                                            barrier=torch.distributed.barrier, world=layout.world_size,
                                            all_gather=all_gather_object)
        self.timer = StageTimer()
        self.writer = MetricsWriter(self.run_dir / "tb", enabled=cfg.log.tensorboard, rank=self.rank)
        self.state = RunState()
        self.synced_once = False

    # ------------------------------------------------------------------ memory choreography
    # Every move of GPU memory between the trainer and the engine happens in these two calls (and the
    # `resident` blocks of save/export); train.py calls one before and one after training.
    def to_training(self) -> None:
        """Engine memory released, then the train state back on the device."""
        self.release_engine()
        t0 = time.perf_counter()
        moved = self.offload.reload()
        if moved:  # the host -> GPU bandwidth a GPU run must check first (docs/gpu.md §6)
            dt = time.perf_counter() - t0
            log(f"train state reloaded: {moved / 2**20:.1f} MiB in {dt:.2f} s ({moved / max(dt, 1e-9) / 1e9:.1f} GB/s)",
                self.rank)

    def start_engines(self) -> None:
        """Start this rank's engine. With offload, every rank's train state leaves first: SGLang sizes
        its KV pool from the GPU memory free when it starts (docs/gpu.md §3), and an engine's TP ranks
        share GPUs with trainer ranks that may not run an engine. Then the engine is released and the
        train state comes back, as for training (a resumed checkpoint is read into it)."""
        if self.offload.enabled:
            self.offload.offload()
            torch.distributed.barrier(group=self.host_world)  # no engine starts beside a resident state
        if self.comm.is_engine_rank:
            self._start_engine()
        if self.offload.enabled:
            self.to_training()

    def to_rollout(self) -> dict[str, float]:
        """Grads (freed), optimizer state and the token RM leave the device; the weight sync reads the
        policy (and resumes the engine); then the policy's parameters leave too. Returns the sync metrics."""
        self.offload.offload("grads", "rest")
        metrics = self.sync_weights()
        self.offload.offload("policy_params")
        return metrics

    # ------------------------------------------------------------------ engine + weight sync
    def _start_engine(self) -> None:
        from megatron_oreal.reward.pool import Verifier
        from megatron_oreal.rollout import build_engine

        cfg = self.cfg
        self.engine = build_engine(cfg.rollout.engine, cfg.policy.hf_path, self.tokenizer, cfg.rollout,
                                   **self._engine_extra())
        self.verifier = Verifier(workers=cfg.reward.workers, timeout=cfg.reward.timeout_s,
                                 llm_judge=_llm_judge(cfg.reward), strict_hedging=cfg.reward.strict_hedging)

    def _engine_extra(self) -> dict:
        """The SGLang server's log goes into the run folder (one file per engine leader, appended across
        restarts and resumes)."""
        if self.cfg.rollout.engine != "sglang":
            return {}
        return {"log_path": str(self.run_dir / f"sglang_server_rank{self.rank}.log")}

    def sync_weights(self) -> dict[str, float]:
        """Policy (Megatron shards) -> HF tensors -> the engine. Collective."""
        from megatron_oreal.checkpoint.gather import iter_hf_tensors
        from megatron_oreal.sync import InProcessTransport, sync_weights

        cfg = self.cfg.rollout
        if torch.cuda.is_available():  # hand the activations' cached blocks back before the engine resumes
            torch.cuda.empty_cache()
        bucket_bytes = cfg.sync_bucket_mb << 20
        # SGLang with TP > 1: every TP rank of the first stage sends its own full copy, so SGLang TP
        # rank i reads trainer TP rank i's buffers on its own GPU (the leader only posts the handles).
        per_rank = cfg.engine == "sglang" and self.layout.tp > 1
        every_stage = cfg.engines_on_every_stage  # each stage's engine needs every stage's tensors
        source = iter_hf_tensors(self.trainer.policy, self.layout, bucket_bytes=bucket_bytes, every_tp_rank=per_rank,
                                 every_stage=every_stage)
        on_engine_stage = self.layout.pp_rank == 0 or every_stage
        sends = self.comm.is_engine_rank or (per_rank and on_engine_stage)
        if not sends:
            for _ in source:  # take part in the collectives; the tensors land on the engine's ranks
                pass
            return {}
        transport_kw: dict = {}
        if per_rank:
            from megatron_oreal.mcore import parallel

            transport_kw = {"group": parallel.tp_group(gloo=True), "leader_rank": min(parallel.tp_ranks())}
        flat = ((name, t) for bucket in source for name, t in bucket)
        check = cfg.check_weights_after_first_sync and not self.synced_once
        if cfg.engine == "sglang" and self.engine is not None:
            # SGLangIPCTransport plus what a real server needs (rollout/sglang_engine.py)
            metrics = self.engine.sync(flat, bucket_bytes=bucket_bytes, check=check, **transport_kw)
        elif cfg.engine == "sglang":  # a per-rank sender without an engine: it only hands its buffers over
            from megatron_oreal.rollout.sglang_engine import cpu_tensor_sharing
            from megatron_oreal.sync import SGLangIPCTransport

            with cpu_tensor_sharing(cfg.sglang_device):
                metrics = sync_weights(flat, SGLangIPCTransport(None, **transport_kw), fp8=cfg.fp8,
                                       bucket_bytes=bucket_bytes, check=check)
        else:
            metrics = sync_weights(flat, InProcessTransport(self.engine), fp8=cfg.fp8, bucket_bytes=bucket_bytes,
                                   check=check)
        self.synced_once = True
        return metrics.as_dict() if self.comm.is_engine_rank else {}

    def rollout(self, prompts: list, step: int) -> list:
        """rollout_and_score, restarting a failed engine (re-synced from the policy) and retrying the
        same prompts with the same seed, at most rollout.max_restarts times. Collective: the engine
        ranks generate alone, then every rank learns whether any failed before the groups are shared
        (a failure inside the broadcast would leave the other ranks waiting)."""
        sampling, limit = self.sampling(step), self.cfg.rollout.max_restarts
        if self.comm.engines > 1:  # each stage's engine numbers its samples from 0: give each its own stream
            sampling = sampling.with_seed(sampling.seed + 7919 * self.comm.engine_index)
        for attempt in range(limit + 1):
            groups, error = None, None
            if self.comm.is_engine_rank:
                try:
                    fault_point("rollout", step)
                    mine = engine_share(prompts, self.comm)  # this stage's engine's chunk of the replica's prompts
                    groups = rollout_and_score(self.engine, mine, sampling, self.tokenizer, self.verifier, Comm())
                except Exception as exc:  # any engine failure: the engine is rebuilt, the data is not lost
                    error = f"{type(exc).__name__}: {exc}"
                    print(f"[rank {self.rank}] rollout at step {step + 1} failed: {error}", flush=True)
            if not agree_any(error is not None, self.host_world):
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
            with shield_children():
                self.engine = build_engine(cfg.rollout.engine, cfg.policy.hf_path, self.tokenizer, cfg.rollout,
                                           **self._engine_extra())
        with self.offload.resident("policy_params"):  # the new engine starts from the HF files: give it
            self.sync_weights()                       # the trained weights

    def release_engine(self) -> None:
        if self.engine is not None:
            self.engine.release_memory()

    def sampling(self, step: int):
        from megatron_oreal.rollout.engine import SamplingParams

        params = SamplingParams.from_config(self.cfg.rollout.sampling, default_stop_ids=self.stop_ids)
        # the engine's log-probs: logged against Megatron's, and the weights of algo.rollout_correction=tis
        params = dataclasses.replace(params, return_logprobs=self.cfg.rollout.log_logprob_mismatch
                                     or self.cfg.algo.rollout_correction == "tis")
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
            with naming(out), open(out, "w") as f:
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
        with naming(self.step_records), open(self.step_records, "a") as f:
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
        with self.offload.resident(), shield_children():  # Megatron's writers fork, and spawn a Manager
            path = self.checkpointer.save(step, writers, state)
        log(f"checkpoint {path} ({time.time() - t0:.1f}s)", self.rank)
        return path

    def maybe_resume(self) -> bool:
        from megatron_oreal.mcore.run_state import model_and_optimizer_reader

        path = self.checkpointer.resume_point(log=lambda m: log(m, self.rank))  # checksums verified
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

        try:
            with self.offload.resident("policy_params"):
                export_hf(self.trainer.policy, self.layout, str(out_dir), self.hf_config,
                          hf_dir=self.cfg.policy.hf_path, log=lambda m: log(m, self.rank))
        except Exception as exc:  # safetensors: "SafetensorError: ... No space left on device (os error 28)"
            if not is_disk_full(exc, out_dir):
                raise
            kept = f"the previous {out_dir} is intact, " if out_dir.exists() else ""
            raise disk_full_error(out_dir, f"{kept}the checkpoint {self.checkpointer.latest_name()!r} is intact; "
                                  "free space and rerun the same command") from None

    def close(self) -> None:
        try:
            self._close()
        finally:
            self.lock.release()

    def _close(self) -> None:
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
