"""What one step shows: rollout statistics, stage times, tokens/s, MFU, the console line, TensorBoard,
the token-weight HTML page, and the run summary (RUN_DIR/summary.json)."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from typing import Any

import torch

from megatron_oreal.observability.flops import GPUS, arch_from_hf_config, gpu_for_device_name, step_throughput
from megatron_oreal.observability.tb import console_line
from megatron_oreal.types import Group, TrainBatch


def rollout_metrics(groups: list[Group]) -> dict[str, float]:
    samples = [s for g in groups for s in g.samples]
    if not samples:
        return {}
    n = len(samples)
    reasons = Counter(s.reason for s in samples)
    lengths = [len(s.response_ids) for s in samples]
    out = {
        "reward/mean": sum(s.reward for s in samples) / n,
        "reward/pass_rate": sum(s.reward > 0 for s in samples) / n,
        "reward/mixed_groups": sum(0 < g.pass_rate < 1 for g in groups) / len(groups),
        "reward/all_correct_groups": sum(g.pass_rate == 1 for g in groups) / len(groups),
        "rollout/response_len_mean": sum(lengths) / n,
        "rollout/response_len_max": float(max(lengths)),
        "rollout/truncated": sum(s.finish_reason == "length" for s in samples) / n,
        "rollout/samples": float(n),
    }
    for reason, count in reasons.items():
        out[f"reward/reason_{reason}"] = count / n
    advs = [s.advantage for s in samples]
    if len(advs) > 1:
        out["adv/mean"], out["adv/std"] = statistics.fmean(advs), statistics.pstdev(advs)
        out["adv/abs_mean"] = statistics.fmean(abs(a) for a in advs)
    return out


class StepLog:
    def __init__(self, run: Any, last_step: int | None = None):
        self.run = run
        self.cfg = run.cfg
        self.arch = arch_from_hf_config(run.hf_config)
        self.device = (gpu_for_device_name(torch.cuda.get_device_name(run.layout.device))
                       if run.layout.device.startswith("cuda") else GPUS["cpu"])
        self.step_times: list[float] = []
        # the console's "step i/N" and ETA count to where this run stops (`profile --steps`, `--max-steps`)
        self.last_step = self.cfg.steps if last_step is None else last_step

    def record(self, step: int, groups: list[Group], batch: TrainBatch, metrics: dict) -> dict:
        r, st = self.run, self.run.state
        metrics = {**rollout_metrics(groups), **metrics, **r.timer.step_end()}
        metrics["selection/kept_sequences"] = float(batch.num_sequences)
        if "rm/loss" in metrics:
            metrics["loss/token_rm"] = metrics["rm/loss"]
        if "policy/kl" in metrics:
            metrics["kl/ref"] = metrics["policy/kl"]
        # Throughput and MFU (observability/flops.py): trained tokens pass the policy and the RM
        # forward+backward and the reference forward; every generated token counts for rollout.
        gen_tokens = sum(len(s.response_ids) for g in groups for s in g.samples)
        train_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in batch.sequences)
        step_s = metrics.get("time/step", 0.0)
        st.tokens += gen_tokens
        metrics["tokens/generated"] = float(gen_tokens)
        trained = 1 + (r.trainer.token_rm is not None)
        metrics.update(step_throughput(
            metrics, arch=self.arch, n_devices=r.layout.world_size, peak=self.device.bf16_flops,
            rollout_tokens=gen_tokens, train_tokens=train_tokens,
            train_seq_len=train_tokens / max(batch.num_sequences, 1),
            trained_models=trained if not metrics.get("policy/frozen") else trained - 1,
            forward_only_passes=1.0 + bool(metrics.get("policy/frozen")), sync_bytes=metrics.get("sync/bytes", 0.0)))
        metrics["tokens/s"] = metrics["tokens/s/step"]
        self.step_times.append(step_s)
        recent = self.step_times[-10:]
        if r.layout.is_main and (step + 1) % max(self.cfg.log.console_every, 1) == 0:
            print(console_line(step + 1, self.last_step, metrics, sum(recent) / len(recent)), flush=True)
        r.writer.write(step + 1, metrics)
        if batch.sequences:  # a skipped update left the previous step's weights behind: no page for them
            self._maybe_html(step, groups)
        return metrics

    def _maybe_html(self, step: int, groups: list[Group]) -> None:
        every = self.cfg.log.html_every
        weights = getattr(self.run.trainer, "last_token_weights", None)
        if not every or (step + 1) % every or not weights or not self.run.layout.is_main:
            return
        from megatron_oreal.observability.html import TokenWeightSample, write_token_weights_html

        tok = self.run.tokenizer
        items = []
        for seq, w in weights:
            text = next((g.prompt.text for g in groups if g.prompt.input_ids == seq.prompt_ids), "")
            gold = next((g.prompt.gold for g in groups if g.prompt.input_ids == seq.prompt_ids), "")
            tokens = [tok.decode([t]) for t in seq.response_ids]
            items.append(TokenWeightSample(text, tokens, [float(x) for x in w], seq.is_positive,
                                           1.0 if seq.is_positive else -1.0, seq.advantage, gold))
        page = self.run.run_dir / "html" / f"step_{step + 1:06d}.html"
        write_token_weights_html(page, items, step + 1)
        # The same weights as data, for measurements such as tools/credit_rm_share.py.
        page.with_suffix(".json").write_text(json.dumps([
            {"prompt": it.prompt, "gold": it.gold_answer, "tokens": list(it.tokens), "weights": it.weights,
             "is_positive": it.is_positive} for it in items]))

    def summary(self) -> dict:
        st = self.run.state
        steady = self.step_times[1:] or self.step_times
        return {
            "steps": st.step,
            "eval_pass1_initial": st.initial_pass1,
            "eval_pass1_final": st.history[-1]["pass1"] if st.history else None,
            "eval_pass1_best": st.best_pass1 if st.best_step >= 0 else None,
            "eval_best_step": st.best_step,
            "eval_history": st.history,
            "wall_seconds": st.wall_seconds,
            "tokens_per_second": st.tokens / st.wall_seconds if st.wall_seconds > 0 else 0.0,
            "mean_step_seconds": sum(steady) / len(steady) if steady else 0.0,
        }
