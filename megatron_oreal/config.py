"""Run configuration: one dataclass per section, loaded from YAML plus `section.key=value` overrides.

Every stage receives only its own section. Unknown keys, wrong types and bad values fail here,
before any model is built, with the file and the dotted key in the message (and a did-you-mean).
Defaults are the OREAL-7B recipe (docs/algorithm.md §4.3) unless a field says otherwise.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
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
    prompts_per_step: int = 64  # docs/algorithm.md §4.3: 64 prompts x 16 samples
    system_prompt: str = "oreal"  # a preset name (see data/templates.py) or the literal text
    prompt_format: str = "chat"  # "chat" (the tokenizer's chat template) or a format string with {prompt}
    # Repeat prompts by offline pass_rate 6/4/4/2x, drop >= 0.8, as the reference 7B recipe does (docs/algorithm.md §4.1);
    # a file without any pass_rate field is used as is, with a warning.
    difficulty_balance: bool = True
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
    # One engine on every pipeline stage's TP group (each with the whole model; the weight sync sends
    # every stage's tensors to every stage), not only on the first: PP times more engines. Meant with
    # policy.offload_train_state, so each stage's GPUs have room for an engine.
    engines_on_every_stage: bool = False
    mem_fraction_static: float = 0.6
    sync_bucket_mb: int = 512  # weight-sync bucket size
    fp8: bool = False  # block-quantise Linear weights for an FP8 SGLang engine
    max_restarts: int = 3
    check_weights_after_first_sync: bool = False
    # The SGLang server (rollout.engine=sglang): the interpreter it runs under ("" = this one; the CPU test
    # tier points it at tools/sglang_cpu's env), its device (cpu = CPU_SERVER_FLAGS of
    # rollout/sglang_engine.py), extra launch flags (appended last: they override ours), and
    # --enable-deterministic-inference, without which SGLang ignores the per-sample seeds (0.5.21 refuses
    # it on CPU, where only torch_native attention runs).
    sglang_python: str = ""
    sglang_device: str = "cuda"
    sglang_server_args: list[str] = field(default_factory=list)
    sglang_deterministic: bool = True
    sglang_launch_timeout_s: float = 900.0
    # Ask the engine for its per-token log-probs and log rollout/logprob_abs_diff_mean, _diff_max and
    # _k3_kl against Megatron's (train_step.py); the loss uses them only with algo.rollout_correction=tis.
    log_logprob_mismatch: bool = True


@dataclass
class RewardConfig:
    workers: int = 2
    timeout_s: float = 5.0
    llm_judge_url: str = ""  # OpenAI-compatible endpoint ("" = rules only)
    llm_judge_model: str = ""
    # False: the last \boxed{} is the answer (the paper's released judge). True: an earlier boxed
    # answer in the final part that differs from the last one makes the response wrong.
    strict_hedging: bool = False


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
    # Denominator of the KL term: "all" = every response token N (the reference code since 2859cc0);
    # "negative" = the negative tokens N- (the reference before it, so most likely the paper's runs).
    kl_normalizer: str = "all"
    # Rollout/train mismatch correction (algo/rollout_correction.py): "tis" weights each token's L+/L- term
    # by clamp(pi_train/pi_engine, tis_clip_low, tis_clip); "auto" = tis with an FP8 engine
    # (rollout.fp8), none with BF16 (resolved when the config is loaded).
    rollout_correction: str = "auto"
    tis_clip: float = 2.0
    tis_clip_low: float = 0.0
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
    # On a CUDA machine whose Transformer Engine fails to import: false (default) stops with the import
    # error; true trains with Megatron's local layer spec (dense attention masks, no FP8).
    allow_local_spec: bool = False
    # Move the policy's and token RM's parameters, gradient buffers and optimizer state to (pinned)
    # host memory during rollout and evaluation, back before training (mcore/offload.py), so the
    # engine gets the GPU. Costs two host<->device copies of the train state per step.
    offload_train_state: bool = False
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
    keep_best: bool = True  # export the best-scoring policy to RUN_DIR/best_hf (docs/algorithm.md §4.2 step 9)


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
    "rollout.sglang_device": ("cuda", "cpu"),
    "algo.advantage": ("rloo", "grpo", "reinforce"),
    "algo.selection": ("one_pair", "all"),
    "algo.positive_loss": ("bc", "pg"),
    "algo.kl_type": ("k3", "k1", "mse"),
    "algo.kl_normalizer": ("all", "negative"),
    "algo.rollout_correction": ("auto", "none", "tis"),
    "algo.token_weighting": ("threshold", "topk", "none"),
    "policy.dtype": ("fp32", "bf16"),
    "policy.fp8": ("", "blockwise", "tensorwise"),
}


# Allowed range of every numeric field: dotted key -> (low, high, kind). kind: "[]" both ends allowed,
# "(]" low excluded, "[)" high excluded, "()" both excluded; None = unbounded. Non-finite values
# (nan, inf) are refused everywhere except where NONFINITE_OK says why.
_INF = None
RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "steps": (1, _INF, "[]"),
    "seed": (0, _INF, "[]"),
    "data.prompts_per_step": (1, _INF, "[]"),
    "data.eval_limit": (0, _INF, "[]"),
    "data.seed": (0, _INF, "[]"),
    "rollout.sampling.n": (1, _INF, "[]"),
    "rollout.sampling.temperature": (0, _INF, "[]"),  # 0 = greedy
    "rollout.sampling.top_p": (0, 1, "(]"),
    "rollout.sampling.top_k": (0, _INF, "[]"),
    "rollout.sampling.max_new_tokens": (1, _INF, "[]"),
    "rollout.sampling.max_total_length": (2, _INF, "[]"),
    "rollout.sampling.seed": (0, _INF, "[]"),
    "rollout.tensor_parallel_size": (1, _INF, "[]"),
    "rollout.mem_fraction_static": (0, 1, "()"),
    "rollout.sync_bucket_mb": (1, _INF, "[]"),
    "rollout.sglang_launch_timeout_s": (0, _INF, "(]"),
    "rollout.max_restarts": (0, _INF, "[]"),
    "reward.workers": (0, _INF, "[]"),  # 0 = in-process, no time limit (debugging)
    "reward.timeout_s": (0, _INF, "(]"),
    "algo.positive_loss_factor": (0, _INF, "[]"),
    "algo.negative_loss_factor": (0, _INF, "[]"),
    "algo.kl_coef": (0, _INF, "[]"),
    "algo.correct_threshold": (0, 1, "[)"),  # threshold_rescale divides by 1 - tau
    "algo.incorrect_threshold": (0, 1, "[)"),
    "algo.topk_ratio": (0, 1, "(]"),
    "algo.actor_freeze_steps": (0, _INF, "[]"),
    "algo.max_nonfinite_steps": (1, _INF, "[]"),
    "algo.tis_clip": (0, _INF, "(]"),      # and above tis_clip_low (checked with the combinations)
    "algo.tis_clip_low": (0, _INF, "[]"),
    "policy.micro_batch_tokens": (1, _INF, "[]"),
    "parallel.tensor": (1, _INF, "[]"),
    "parallel.pipeline": (1, _INF, "[]"),
    "parallel.timeout_minutes": (1, _INF, "[]"),
    "checkpoint.every": (0, _INF, "[]"),
    "checkpoint.keep": (1, _INF, "[]"),  # default 2: a damaged newest checkpoint falls back to the previous one
    "eval.every": (0, _INF, "[]"),
    "eval.max_new_tokens": (0, _INF, "[]"),
    "eval.batch_size": (1, _INF, "[]"),
    "log.html_every": (0, _INF, "[]"),
    "log.console_every": (1, _INF, "[]"),
    "sft.batch_size": (1, _INF, "[]"),
    "sft.steps": (1, _INF, "[]"),
    "sft.log_every": (1, _INF, "[]"),
}
for _opt in ("policy.optim", "token_rm.optim"):
    RANGES.update({
        f"{_opt}.lr": (0, _INF, "(]"),
        f"{_opt}.min_lr": (0, _INF, "[]"),
        f"{_opt}.warmup_steps": (0, _INF, "[]"),
        f"{_opt}.weight_decay": (0, _INF, "[]"),
        f"{_opt}.clip_grad": (0, _INF, "[]"),  # 0 = no clipping
        f"{_opt}.adam_beta1": (0, 1, "[)"),
        f"{_opt}.adam_beta2": (0, 1, "[)"),
        f"{_opt}.adam_eps": (0, _INF, "(]"),
    })
# The e2e tests make every actor loss NaN through eta (tests/e2e/test_reliability.py) to exercise the
# non-finite guard (algo.max_nonfinite_steps); a NaN there is caught by that guard, not here.
NONFINITE_OK = {"algo.negative_loss_factor"}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_range(cfg: Any, dotted: str, lo: float | None, hi: float | None, kind: str) -> None:
    value = _get(cfg, dotted)
    if value != value or value in (float("inf"), float("-inf")):
        if dotted in NONFINITE_OK:
            return
        raise ConfigError(f"{dotted}: must be a finite number, got {value}")
    ok = lo is None or (value > lo if kind[0] == "(" else value >= lo)
    ok = ok and (hi is None or (value < hi if kind[1] == ")" else value <= hi))
    if not ok:
        low = "-inf" if lo is None else f"{lo}"
        high = "inf" if hi is None else f"{hi}"
        bracket_hi = ")" if hi is None else kind[1]
        raise ConfigError(f"{dotted}: must be in {kind[0]}{low}, {high}{bracket_hi}, got {value}")


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
    for dotted, (lo, hi, kind) in RANGES.items():
        _check_range(cfg, dotted, lo, hi, kind)
    for name in ("policy.optim", "token_rm.optim"):
        optim = _get(cfg, name)
        if optim.min_lr > optim.lr:
            raise ConfigError(f"{name}.min_lr ({optim.min_lr}) must not exceed {name}.lr ({optim.lr})")
    n = cfg.rollout.sampling.n
    if n < 2 and command == "train":
        # Combinations that can never learn: a group baseline of one sample is the sample itself
        # (RLOO divides by n - 1; GRPO's std of one value is NaN), and a 1+1 pair needs two samples.
        if cfg.algo.advantage in ("rloo", "grpo"):
            raise ConfigError(f"rollout.sampling.n: algo.advantage={cfg.algo.advantage} compares the samples of a "
                              f"prompt and needs n >= 2, got {n}")
        if cfg.algo.selection == "one_pair":
            raise ConfigError(f"rollout.sampling.n: algo.selection=one_pair keeps one correct and one incorrect "
                              f"sample of a prompt and needs n >= 2, got {n}")
    if cfg.rollout.engine == "sglang" and command == "train":
        # One SGLang engine per TP group of stage 0, fed that group's shards (runtime.py, docs/gpu.md §3).
        if cfg.rollout.tensor_parallel_size != cfg.parallel.tensor:
            raise ConfigError(f"rollout.tensor_parallel_size ({cfg.rollout.tensor_parallel_size}) must equal "
                              f"parallel.tensor ({cfg.parallel.tensor}) with rollout.engine=sglang: each engine "
                              "is co-located with one tensor-parallel group")
        r = cfg.rollout
        if r.sglang_python and not os.access(r.sglang_python, os.X_OK):
            raise ConfigError(f"rollout.sglang_python: {r.sglang_python!r} is not an executable file")
        if r.sglang_device == "cpu" and r.sglang_deterministic:
            raise ConfigError("rollout.sglang_deterministic: sglang 0.5.21 refuses --enable-deterministic-inference "
                              "with torch_native attention, the only backend on CPU; set it to false with "
                              "rollout.sglang_device=cpu (samples are then not reproducible)")
        if r.sglang_device == "cpu" and r.fp8:
            raise ConfigError("rollout.fp8: the FP8 SGLang engine needs rollout.sglang_device=cuda")
        if r.sglang_launch_timeout_s <= 0:
            raise ConfigError(f"rollout.sglang_launch_timeout_s: must be > 0, got {r.sglang_launch_timeout_s}")
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
    if not 0.0 <= cfg.algo.tis_clip_low < cfg.algo.tis_clip:
        raise ConfigError(f"algo.tis_clip_low/algo.tis_clip: need 0 <= tis_clip_low < tis_clip, got "
                          f"{cfg.algo.tis_clip_low}, {cfg.algo.tis_clip}")
    if cfg.algo.rollout_correction == "auto":  # FP8 rollouts drift from the BF16 trainer; BF16 ones barely
        cfg.algo.rollout_correction = "tis" if cfg.rollout.fp8 else "none"
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
