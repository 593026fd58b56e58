"""Run configuration: one dataclass per section, loaded from YAML plus `section.key=value` overrides.

Every stage receives only its own section. Unknown keys, wrong types and bad values fail here,
before any model is built, with the file and the dotted key in the message (and a did-you-mean).
Defaults are the OREAL-7B recipe (OREAL.md §4.3) unless a field says otherwise.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config: the message names the file and the dotted key."""


@dataclass
class DataConfig:
    train_file: str = ""  # JSONL of prompts; "builtin:arith" = the built-in synthetic task
    eval_file: str = ""  # JSONL held-out set for greedy pass@1 ("" = none)
    prompt_key: str = "question"  # also tried: problem, prompt
    answer_key: str = "gold_answer"  # also tried: answer
    prompts_per_step: int = 64  # OREAL.md §4.3: 64 prompts x 16 samples
    system_prompt: str = "oreal"  # a preset name (see data/templates.py) or the literal text
    prompt_format: str = "chat"  # "chat" (the tokenizer's chat template) or a format string with {prompt}
    difficulty_balance: bool = False  # repeat prompts by offline pass_rate (OREAL.md §4.1)
    eval_limit: int = 0  # evaluate on the first N rows only (0 = all)
    seed: int = 0


@dataclass
class SamplingConfig:
    n: int = 16  # K samples per prompt
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 14000
    max_total_length: int = 16384
    stop_token_ids: list[int] = field(default_factory=list)  # [] = eos + template end-of-turn + generation_config ends (rollout/stops.py)
    seed: int = 0


@dataclass
class RolloutConfig:
    engine: str = "cpu"  # registry key: cpu | sglang
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tensor_parallel_size: int = 1  # SGLang engine TP; ranks per engine
    mem_fraction_static: float = 0.6
    sync_bucket_mb: int = 512  # weight-sync bucket size
    fp8: bool = False  # block-quantise Linear weights for an FP8 SGLang engine
    max_restarts: int = 3
    check_weights_after_first_sync: bool = False
    # Ask the engine for its per-token log-probs and log rollout/logprob_abs_diff_mean, _diff_max and
    # _k3_kl against Megatron's (train_step.py); diagnostics only, the loss never uses them.
    log_logprob_mismatch: bool = True


@dataclass
class RewardConfig:
    workers: int = 2
    timeout_s: float = 5.0
    llm_judge_url: str = ""  # OpenAI-compatible endpoint ("" = rules only)
    llm_judge_model: str = ""


@dataclass
class AlgoConfig:
    advantage: str = "rloo"  # rloo | grpo | reinforce
    selection: str = "one_pair"  # one_pair (1 correct + 1 incorrect per mixed prompt) | all
    positive_loss: str = "bc"  # bc (token-weighted NLL / N+) | pg (policy gradient, shared denominator)
    positive_loss_factor: float = 1.0
    pos_mult_adv: bool = True
    negative_loss_factor: float = 0.5  # eta
    kl_coef: float = 0.01
    kl_type: str = "k3"  # k3 | k1 | mse
    token_weighting: str = "threshold"  # threshold | topk | none
    correct_threshold: float = 0.5
    incorrect_threshold: float = 0.5
    topk_ratio: float = 0.25
    actor_freeze_steps: int = 10
    max_nonfinite_steps: int = 3  # abort after this many steps in a row with a non-finite loss/grad norm


@dataclass
class OptimConfig:
    lr: float = 5e-7
    min_lr: float = 1e-7
    warmup_steps: int = 10
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8


@dataclass
class ModelConfig:
    hf_path: str = ""  # HF checkpoint folder (config.json, safetensors, tokenizer)
    dtype: str = "bf16"  # fp32 | bf16
    fp8: str = ""  # "" | blockwise | tensorwise (Transformer Engine, GPU only)
    recompute: bool = False
    micro_batch_tokens: int = 16384  # token budget per packed micro-batch per rank
    optim: OptimConfig = field(default_factory=OptimConfig)


def _rm_optim() -> OptimConfig:
    return OptimConfig(lr=2e-6, min_lr=4e-7)


@dataclass
class TokenRMConfig:
    enabled: bool = True
    optim: OptimConfig = field(default_factory=_rm_optim)


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    distributed_optimizer: bool = False
    # torch.distributed collective timeout: how long a rank waits in a collective whose peer died
    # without its process exiting (a launcher that kills the job on one bad exit ends it sooner).
    timeout_minutes: int = 30


@dataclass
class CheckpointConfig:
    every: int = 10  # steps between checkpoints (0 = only at the end)
    keep: int = 2
    export_hf: bool = True  # write RUN_DIR/hf at the end


@dataclass
class EvalConfig:
    every: int = 10  # steps between held-out evaluations (0 = only start and end)
    max_new_tokens: int = 0  # 0 = rollout.sampling.max_new_tokens
    batch_size: int = 64
    keep_best: bool = True  # export the best-scoring policy to RUN_DIR/best_hf (OREAL.md §4.2 step 9)


@dataclass
class SFTConfig:
    """`python -m megatron_oreal sft`: supervised fine-tuning on {"prompt", "response"} JSONL pairs."""

    train_file: str = ""
    prompt_key: str = "prompt"
    response_key: str = "response"
    batch_size: int = 64  # sequences per optimizer step (global)
    steps: int = 600
    log_every: int = 50
    add_eos: bool = True  # append the tokenizer's eos to every response (the model learns to stop)


@dataclass
class LogConfig:
    tensorboard: bool = True
    html_every: int = 10  # steps between token-weight HTML pages (0 = never)
    console_every: int = 1


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    steps: int = 90
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    policy: ModelConfig = field(default_factory=ModelConfig)
    token_rm: TokenRMConfig = field(default_factory=TokenRMConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)


# Allowed values for string fields; checked after loading so a typo fails before any model is built.
CHOICES: dict[str, tuple[str, ...]] = {
    "rollout.engine": ("cpu", "sglang"),
    "algo.advantage": ("rloo", "grpo", "reinforce"),
    "algo.selection": ("one_pair", "all"),
    "algo.positive_loss": ("bc", "pg"),
    "algo.kl_type": ("k3", "k1", "mse"),
    "algo.token_weighting": ("threshold", "topk", "none"),
    "policy.dtype": ("fp32", "bf16"),
    "policy.fp8": ("", "blockwise", "tensorwise"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` (int->float is allowed; nothing else is converted)."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} does not match {tp}")
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `3e-5` (no dot) as a string; accept what float() accepts.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, data: dict, where: str, base: Any = None) -> Any:
    """`base` (default: cls()) with the keys of `data` replaced, recursively. A nested section starts
    from its parent's default (the token RM's optimizer keeps its own LR when only warm-up is set)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown key {dotted!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, dotted, getattr(base, key))
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return dataclasses.replace(base, **kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value) with the value parsed as YAML (so 1e-5, true, [1,2] work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse value: {exc}") from None
    return key.strip(), value


def validate(cfg: RunConfig, command: str = "train") -> RunConfig:
    """Cross-field checks; `command` says which run the config is for ("train" or "sft")."""
    for dotted, allowed in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{dotted}: {value!r} is not one of {list(allowed)}{hint}")
    positive = {
        "steps": cfg.steps,
        "data.prompts_per_step": cfg.data.prompts_per_step,
        "rollout.sampling.n": cfg.rollout.sampling.n,
        "rollout.sampling.max_new_tokens": cfg.rollout.sampling.max_new_tokens,
        "parallel.tensor": cfg.parallel.tensor,
        "parallel.pipeline": cfg.parallel.pipeline,
        "parallel.timeout_minutes": cfg.parallel.timeout_minutes,
        "policy.micro_batch_tokens": cfg.policy.micro_batch_tokens,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    if cfg.algo.advantage == "rloo" and cfg.rollout.sampling.n < 2:
        raise ConfigError("rollout.sampling.n: RLOO needs at least 2 samples per prompt")
    if not 0.0 < cfg.rollout.sampling.top_p <= 1.0:
        raise ConfigError(f"rollout.sampling.top_p: must be in (0, 1], got {cfg.rollout.sampling.top_p}")
    if cfg.rollout.engine == "sglang" and command == "train":
        # One SGLang engine per TP group of stage 0, fed that group's shards (runtime.py, docs/gpu.md §3).
        if cfg.rollout.tensor_parallel_size != cfg.parallel.tensor:
            raise ConfigError(f"rollout.tensor_parallel_size ({cfg.rollout.tensor_parallel_size}) must equal "
                              f"parallel.tensor ({cfg.parallel.tensor}) with rollout.engine=sglang: each engine "
                              "is co-located with one tensor-parallel group")
        if cfg.rollout.tensor_parallel_size > 8:
            raise ConfigError(f"rollout.tensor_parallel_size: {cfg.rollout.tensor_parallel_size} > 8; an engine "
                              "must fit on one node's NVLink domain")
    if command == "sft":
        if cfg.policy.optim.warmup_steps >= cfg.sft.steps:
            raise ConfigError(f"policy.optim.warmup_steps ({cfg.policy.optim.warmup_steps}) must be smaller "
                              f"than sft.steps ({cfg.sft.steps})")
        return cfg
    for name, optim in (("policy.optim", cfg.policy.optim), ("token_rm.optim", cfg.token_rm.optim)):
        if optim.warmup_steps >= cfg.steps:
            raise ConfigError(f"{name}.warmup_steps ({optim.warmup_steps}) must be smaller than steps ({cfg.steps})")
    if cfg.algo.token_weighting != "none" and not cfg.token_rm.enabled:
        raise ConfigError("algo.token_weighting needs token_rm.enabled=true (or set it to 'none')")
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                command: str = "train") -> RunConfig:
    """Load a YAML file (or nothing: all defaults), apply `a.b=value` overrides, validate."""
    tree: dict = {}
    source = "config"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{line} malformed YAML: {getattr(exc, 'problem', exc)}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return validate(_build(RunConfig, tree, ""), command)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
