"""`python -m megatron_oreal plan CONFIG --gpus N --gpu h100-80g [--model NAME | --model-config FILE]`.

Prints the per-GPU memory table of each phase of an OREAL step and a step-time estimate, from the run
config and the model's architecture. Formulas: docs/planning.md; code: estimate.py. `--published`
also prints the planner's estimates next to published figures (published.py).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from megatron_oreal.observability.estimate import GIB, Assumptions, Workload, step_estimate
from megatron_oreal.observability.flops import (ARCHS, GPUS, ModelArch, arch_by_name, arch_from_hf_config,
                                                gpu_by_name)
from megatron_oreal.observability.tb import format_duration


def resolve_arch(cfg, model: str = "", model_config: str = "") -> ModelArch:
    """--model-config FILE, else --model NAME, else the config.json under policy.hf_path."""
    if model_config:
        return arch_from_hf_config(model_config, name=Path(model_config).parent.name or "model")
    if model:
        return arch_by_name(model)
    if cfg.policy.hf_path:
        path = Path(cfg.policy.hf_path) / "config.json"
        if path.is_file():
            return arch_from_hf_config(path, name=Path(cfg.policy.hf_path).name)
        raise ValueError(f"policy.hf_path: {path} not found; pass --model NAME or --model-config FILE")
    raise ValueError("no model: pass --model NAME (one of " + ", ".join(sorted(ARCHS))
                     + ") or --model-config config.json, or set policy.hf_path")


def workload_from_config(cfg, arch: ModelArch, gpu: str, n_gpus: int, assumptions: Assumptions | None = None,
                         prompt_tokens: float | None = None, mean_response_tokens: float | None = None,
                         optimizer_offload: bool = False) -> Workload:
    """OREAL step in planner terms. Which passes run (docs/algorithm.md §4.2): policy fwd+bwd, token RM fwd+bwd,
    reference forward (KL), and one more RM forward to score the policy's tokens after the RM update."""
    A = assumptions or Assumptions()
    s = cfg.rollout.sampling
    prompt = A.prompt_tokens if prompt_tokens is None else prompt_tokens
    max_resp = min(s.max_new_tokens, max(s.max_total_length - prompt, 1))
    mean_resp = A.mean_response_fraction * max_resp if mean_response_tokens is None else mean_response_tokens
    samples = cfg.data.prompts_per_step * s.n
    if cfg.algo.selection == "one_pair":  # 1 correct + 1 incorrect per mixed prompt (docs/algorithm.md §4.2 step 5)
        train_seqs = 2 * cfg.data.prompts_per_step * A.mixed_fraction
    else:
        train_seqs = samples
    rm = cfg.token_rm.enabled
    fwd_only = (1.0 if cfg.algo.kl_coef > 0 else 0.0) + (1.0 if rm else 0.0)
    return Workload(
        arch=arch, gpu=gpu_by_name(gpu), n_gpus=n_gpus,
        tp=cfg.parallel.tensor, pp=cfg.parallel.pipeline,
        distributed_optimizer=cfg.parallel.distributed_optimizer,
        dtype_bytes=4.0 if cfg.policy.dtype == "fp32" else 2.0, fp8=bool(cfg.policy.fp8),
        recompute=cfg.policy.recompute, micro_batch_tokens=cfg.policy.micro_batch_tokens,
        optimizer_offload=optimizer_offload,
        offload_train_state=cfg.policy.offload_train_state,
        engines_on_first_stage=not cfg.rollout.engines_on_every_stage,
        rollout_tp=cfg.rollout.tensor_parallel_size, mem_fraction=cfg.rollout.mem_fraction_static,
        rollout_weight_bytes=1.0 if cfg.rollout.fp8 else 2.0, samples=samples, prompt_tokens=prompt,
        mean_response_tokens=mean_resp, max_response_tokens=max_resp, train_sequences=train_seqs,
        trained_models=2 if rm else 1, fwd_only_passes=fwd_only, sync_bucket_mb=cfg.rollout.sync_bucket_mb,
        assumptions=A,
    )


_NOTES = {
    "policy weights": "bf16 params of the largest PP stage / TP (+1 B/param FP8 copies)",
    "policy grads": "fp32 main grads (Megatron DDP)",
    "policy optimizer": "fp32 master + Adam m, v = 12 B/param, / DP with the distributed optimizer",
    "token_rm weights": "second full model (h->1 head instead of the vocab)",
    "token_rm grads": "fp32 main grads",
    "token_rm optimizer": "its own distributed optimizer",
    "activations": "one micro-batch; recompute keeps only layer inputs",
    "logits (fp32)": "micro_batch_tokens x V/TP x 4 B, logits + grad",
    "engine weights": "SGLang weights / rollout TP",
    "engine KV cache": "mem_fraction_static x HBM - engine weights",
    "overhead": "CUDA context, NCCL, fragmentation (assumed)",
    "reference weights": "on GPU (reference_on_host off)",
}


def format_plan(w: Workload, est: dict, steps: int) -> str:
    mem, hbm = est["memory"], est["memory"]["hbm"] / GIB
    a = w.arch
    lines = [f"model {a.name}: {a.params() / 1e9:.2f}B params, {a.layers} layers, h={a.hidden}, "
             f"GQA {a.heads}/{a.kv_heads}, V={a.vocab}",
             f"cluster: {w.n_gpus} x {w.gpu.name} ({hbm:.1f} GiB)  train TP{w.tp} PP{w.pp} DP{w.dp}"
             f"{' FP8' if w.fp8 else ''}{' recompute' if w.recompute else ''}  rollout TP{w.rollout_tp} "
             f"({w.engines} engines{', FP8' if w.rollout_weight_bytes < 2 else ''})",
             "", f"{'memory per GPU':<26}{'GiB':>8}  note"]
    for name, b in mem["components"].items():
        lines.append(f"{name:<26}{b / GIB:>8.2f}  {_NOTES.get(name, '')}")
    lines.append("")
    lines.append(f"{'phase peak per GPU':<42}{'GiB':>8}  fits {hbm:.1f} GiB?")
    for name, b in mem["phases"].items():
        lines.append(f"{name:<42}{b / GIB:>8.2f}  {'yes' if b <= 0.95 * mem['hbm'] else 'NO'}")
    for name, b in mem["host"].items():
        per_node = b * min(w.gpu.gpus_per_node, w.n_gpus) / GIB
        lines.append(f"host: {name:<36}{b / GIB:>8.2f}  per GPU ({per_node:.0f} GiB per node)")
    if mem["offload_needed"] and not w.offload_train_state:
        lines.append("=> the training state does not fit beside the engine: set policy.offload_train_state "
                     "(time counted below)")
    lines += ["", f"{'stage':<18}{'seconds':>9}{'share':>8}"]
    for name, sec in est["stages"].items():
        lines.append(f"{name:<18}{sec:>9.1f}{sec / est['step_s']:>8.1%}")
    r, t, s = est["rollout"], est["train"], est["sync"]
    lines += [f"{'step':<18}{est['step_s']:>9.1f}", "",
              f"rollout: {w.samples} samples, {r['concurrency']:.0f} concurrent/engine (KV-bound at "
              f"{mem['kv_tokens']:.0f} tokens), {r['step_ms']:.1f} ms/decode step, {r['decode_steps']:.0f} steps",
              f"train: {t['tokens']:.3g} tokens x {w.trained_models} model(s) + {w.fwd_only_passes:g} forward-only "
              f"passes, MFU {t['mfu']:.1%} (of BF16 peak), pipeline bubble {t['bubble']:.1%}",
              f"weight sync: {s['bytes'] / 1e9:.1f} GB at {s['gbps']:.1f} GB/s",
              f"throughput: {est['tokens_per_s_per_gpu']:.0f} tokens/s/GPU; {steps} steps ~ "
              f"{format_duration(steps * est['step_s'])}",
              f"assumed: prompt {w.prompt_tokens:.0f} + mean response {w.mean_response_tokens:.0f} tokens "
              f"(max {w.max_response_tokens:.0f}), {w.train_sequences:.0f} sequences trained; "
              f"efficiencies {w.assumptions}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_oreal plan",
                                description="Per-GPU memory table and step-time estimate for a run config.")
    p.add_argument("config", nargs="?", help="run config YAML (omit with --published only)")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu", default="h100-80g", choices=sorted(GPUS))
    p.add_argument("--model", default="", help="built-in architecture: " + ", ".join(sorted(ARCHS)))
    p.add_argument("--model-config", default="", help="an HF config.json")
    p.add_argument("--prompt-tokens", type=float, default=None, help="mean prompt length (assumed 256)")
    p.add_argument("--mean-response-tokens", type=float, default=None,
                   help="mean response length (default: half of max_new_tokens)")
    p.add_argument("--mixed-fraction", type=float, default=None,
                   help="share of prompts with 0 < pass rate < 1 (default 0.75)")
    p.add_argument("--mfu", type=float, default=None, help="training efficiency on BF16 peak (default 0.40)")
    p.add_argument("--optimizer-offload", action="store_true", help="Adam state on the host")
    p.add_argument("--published", action="store_true", help="also check against published figures")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable)")
    args = p.parse_args(argv)
    if args.config is None and not args.published:
        p.error("a CONFIG is required (or --published)")
    if args.config is not None:
        from megatron_oreal.config import ConfigError, load_config

        try:
            cfg = load_config(args.config, args.overrides)
            A = Assumptions()
            if args.mixed_fraction is not None:
                A = replace(A, mixed_fraction=args.mixed_fraction)
            if args.mfu is not None:
                A = replace(A, train_eff_bf16=args.mfu)
            w = workload_from_config(cfg, resolve_arch(cfg, args.model, args.model_config), args.gpu,
                                     args.gpus, A, args.prompt_tokens, args.mean_response_tokens,
                                     args.optimizer_offload)
            est = step_estimate(w)
        except (ConfigError, ValueError, KeyError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(format_plan(w, est, cfg.steps))
    if args.published:
        from megatron_oreal.observability.published import format_comparisons, published_comparisons

        print("\nplanner vs published figures")
        print(format_comparisons(published_comparisons()))
    return 0
