"""The planner run on published configurations, next to the published figures.

Each case rebuilds a peer's configuration as a `Workload` (with our default `Assumptions`, nothing
fitted) and compares one estimated figure with the number its authors published:

* Megatron-LM (Narayanan et al. 2021, arXiv 2104.04473, §5.1): GPT-3 175B on 1024 A100s, batch 1536,
  seq 2048, TP 8 / PP 8, full recompute, 300B tokens: "34 days" end to end.
* NeMo-RL v0.5 performance summary (NeMo-RL `docs/about/performance-summary.md` at commit
  e7c0123d7; recipe grpo-qwen3-32b-4n8g.yaml): GRPO on Qwen3-32B, 32 H100s BF16, 64 prompts × 32
  generations, max 4096 tokens, train TP4/PP4, vLLM TP4,
  on-policy: 376 s/step and 571 tokens/s/GPU.
* Same table, Llama-3.1-8B-Instruct on 16 H100s (grpo-llama3.1-8b-instruct-2n8g.yaml: TP1/PP2,
  activation checkpointing, vLLM TP1): 92.8 s/step and 1581 tokens/s/GPU.

NeMo-RL does not publish the mean response length; we take it from its own figures
(tokens/s/GPU × GPUs × step time / samples = mean sequence length) minus an assumed 200-token
prompt. The step-time and tokens/s comparisons are then the same check seen two ways.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_oreal.observability.estimate import Workload, step_estimate, train_seconds
from megatron_oreal.observability.flops import arch_by_name, gpu_by_name

# Stated tolerance of every published-figure check (docs/planning.md §4).
TOLERANCE = 2.0


@dataclass(frozen=True)
class Comparison:
    name: str
    metric: str
    estimate: float
    published: float
    source: str

    @property
    def ratio(self) -> float:
        return self.estimate / self.published


def _megatron_gpt3() -> list[Comparison]:
    batch, seq, tokens = 1536, 2048, 300e9
    w = Workload(arch_by_name("gpt3-175b"), gpu_by_name("a100-80g"), 1024, tp=8, pp=8, recompute=True,
                 micro_batch_tokens=seq, prompt_tokens=0, mean_response_tokens=seq, train_sequences=batch,
                 trained_models=1, fwd_only_passes=0.0)
    per_step = train_seconds(w)["seconds"]
    days = per_step * tokens / (batch * seq) / 86400
    return [Comparison("Megatron-LM GPT-3 175B, 1024×A100, 300B tokens", "training days", days, 34.0,
                       "arXiv 2104.04473 §5.1")]


def _nemo_rl(model: str, gpus: int, tp: int, pp: int, rollout_tp: int, recompute: bool,
             step_s: float, tok_s_gpu: float) -> list[Comparison]:
    samples, max_len, prompt = 64 * 32, 4096, 200
    mean_seq = tok_s_gpu * gpus * step_s / samples  # what the published figures imply
    w = Workload(arch_by_name(model), gpu_by_name("h100-80g"), gpus, tp=tp, pp=pp, recompute=recompute,
                 micro_batch_tokens=max_len, rollout_tp=rollout_tp, mem_fraction=0.6, samples=samples,
                 prompt_tokens=prompt, mean_response_tokens=mean_seq - prompt, max_response_tokens=max_len - prompt,
                 train_sequences=samples, trained_models=1,
                 fwd_only_passes=2.0,  # previous-policy log-probs + reference log-probs (GRPO with KL)
                 optimizer_steps=samples // 512,  # train global batch 512 sequences
                 engines_on_first_stage=False)  # NeMo-RL's vLLM engines use every GPU at any training PP
    est = step_estimate(w)
    src = "NeMo-RL v0.5 docs/about/performance-summary.md (commit e7c0123d7)"
    label = f"NeMo-RL GRPO {model}, {gpus}×H100 BF16"
    return [Comparison(label, "step seconds", est["step_s"], step_s, src),
            Comparison(label, "tokens/s/GPU", est["tokens_per_s_per_gpu"], tok_s_gpu, src)]


def published_comparisons() -> list[Comparison]:
    return (_megatron_gpt3()
            + _nemo_rl("qwen3-32b", 32, 4, 4, 4, False, 376.0, 571.0)
            + _nemo_rl("llama-3.1-8b", 16, 1, 2, 1, True, 92.8, 1581.0))


def format_comparisons(rows: list[Comparison]) -> str:
    lines = [f"{'configuration':<48}{'metric':<15}{'estimate':>10}{'published':>11}{'ratio':>7}"]
    for r in rows:
        ok = "" if 1 / TOLERANCE <= r.ratio <= TOLERANCE else "  OUTSIDE " + f"{TOLERANCE:g}x"
        lines.append(f"{r.name:<48}{r.metric:<15}{r.estimate:>10.1f}{r.published:>11.1f}{r.ratio:>7.2f}{ok}")
    lines.append(f"(tolerance: within {TOLERANCE:g}x of each published figure; sources in "
                 "megatron_oreal/observability/published.py)")
    return "\n".join(lines)


def within_tolerance(rows: list[Comparison]) -> bool:
    return all(math.isfinite(r.ratio) and 1 / TOLERANCE <= r.ratio <= TOLERANCE for r in rows)
