"""Rollout engines behind one protocol (`engine.RolloutEngine`), chosen by `rollout.engine`.

`ENGINES[name](model_or_hf_dir, tokenizer, rollout_cfg, **extra) -> RolloutEngine`. Imports are
lazy so the CPU path never imports SGLang (GPU-only) and vice versa.
"""

from __future__ import annotations

from typing import Any, Callable

from megatron_oreal.rollout.engine import GenOutput, RolloutEngine, SamplingParams, generate_groups, to_groups


def _cpu(model_or_hf_dir: Any, tokenizer: Any, rollout_cfg: Any = None, **extra: Any) -> RolloutEngine:
    from megatron_oreal.rollout.cpu_engine import CPUEngine

    return CPUEngine(model_or_hf_dir, tokenizer, **extra)


def _sglang(model_or_hf_dir: Any, tokenizer: Any, rollout_cfg: Any = None, **extra: Any) -> RolloutEngine:
    from megatron_oreal.rollout.sglang_engine import SGLangEngine

    return SGLangEngine(model_or_hf_dir, tokenizer, rollout_cfg, **extra)


ENGINES: dict[str, Callable[..., RolloutEngine]] = {"cpu": _cpu, "sglang": _sglang}


def build_engine(name: str, model_or_hf_dir: Any, tokenizer: Any, rollout_cfg: Any = None, **extra: Any) -> RolloutEngine:
    if name not in ENGINES:
        raise ValueError(f"rollout.engine: unknown engine {name!r} (known: {', '.join(sorted(ENGINES))})")
    return ENGINES[name](model_or_hf_dir, tokenizer, rollout_cfg, **extra)


__all__ = ["ENGINES", "GenOutput", "RolloutEngine", "SamplingParams", "build_engine", "generate_groups", "to_groups"]
