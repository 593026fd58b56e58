"""The rollout-engine protocol: what the trainer asks of any sampler (CPU loop or SGLang).

The protocol is deliberately narrow (docs/design.md decision 5): token ids in, token ids out, HF-named
tensors for weight sync. The loss always uses log-probs recomputed by Megatron; an engine's log-probs
are logged against them and, with algo.rollout_correction=tis, give truncated importance weights.

Seeds: an engine derives one random stream per (sampling.seed, prompt position in the call, sample
index), so the outputs of a call do not depend on how the engine splits it into batches. The trainer
passes a different seed every step (`with_seed(base + step)`), which keeps a resumed run identical.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import torch

from megatron_oreal.config import SamplingConfig
from megatron_oreal.types import Group, Prompt, Sample

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # samples per prompt (K)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()  # generation of any of these ends a sample ("stop")
    seed: int = 0
    # 0 = no cap; else a prompt of length L gets min(max_new_tokens, max_total_length - L) new tokens,
    # the reference's `max_length=16384` (docs/algorithm.md §4.2 step 2).
    max_total_length: int = 0
    return_logprobs: bool = False  # per-token sampler log-probs (temperature-scaled, before top-p/k)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_config(
        cls,
        cfg: SamplingConfig,
        *,
        default_stop_ids: Sequence[int] = (),
        max_new_tokens: int | None = None,
    ) -> "SamplingParams":
        """From the config section; `stop_token_ids: []` there means the tokenizer's eos, passed in
        as `default_stop_ids` (the config cannot know the tokenizer)."""
        stops = tuple(cfg.stop_token_ids) or tuple(default_stop_ids)
        return cls(
            n=cfg.n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            max_new_tokens=max_new_tokens or cfg.max_new_tokens,
            stop_token_ids=stops,
            seed=cfg.seed,
            max_total_length=cfg.max_total_length,
        )

    @classmethod
    def greedy_eval(cls, max_new_tokens: int, stop_token_ids: Sequence[int], max_total_length: int = 0) -> "SamplingParams":
        """Evaluation protocol (docs/algorithm.md §5.2): greedy, one sample per prompt."""
        return cls(n=1, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                   stop_token_ids=tuple(stop_token_ids), max_total_length=max_total_length)

    def with_seed(self, seed: int) -> "SamplingParams":
        return dataclasses.replace(self, seed=int(seed))

    def budget(self, prompt_len: int) -> int:
        """New tokens allowed for a prompt of `prompt_len` tokens (>= 0)."""
        if self.max_total_length <= 0:
            return self.max_new_tokens
        return max(0, min(self.max_new_tokens, self.max_total_length - prompt_len))


@dataclass
class GenOutput:
    token_ids: list[int]  # response tokens; the stop token is the last one when finish_reason == "stop"
    finish_reason: str  # "stop" | "length"
    logprobs: list[float] | None = None  # one per token, sampler-side; never used in the loss


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[GenOutput]]:
        """For each prompt (token ids), `sampling.n` outputs, in prompt order."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (any subset of the model's parameters) into the engine's model."""
        ...

    def release_memory(self) -> None:
        """Free accelerator memory (weights + KV cache) before the training phase."""
        ...

    def resume_memory(self) -> None:
        """Re-acquire memory after training; weights are re-sent by `update_weights` afterwards."""
        ...

    def health(self) -> bool: ...

    def close(self) -> None: ...


def check_outputs(outputs: list[list[GenOutput]], num_prompts: int, n: int, where: str = "engine") -> None:
    """Cheap shape check on what an engine returned, so a broken engine fails at the boundary."""
    if len(outputs) != num_prompts:
        raise RuntimeError(f"{where}: returned {len(outputs)} prompt results for {num_prompts} prompts")
    for i, outs in enumerate(outputs):
        if len(outs) != n:
            raise RuntimeError(f"{where}: prompt {i} got {len(outs)} samples, expected n={n}")
        for out in outs:
            if out.finish_reason not in FINISH_REASONS:
                raise RuntimeError(f"{where}: prompt {i}: unknown finish_reason {out.finish_reason!r}")


def decode_response(tokenizer: Any, out: GenOutput) -> str:
    """Text the verifier reads: the response without its stop token, special tokens skipped."""
    ids = out.token_ids[:-1] if out.finish_reason == "stop" and out.token_ids else out.token_ids
    return tokenizer.decode(ids, skip_special_tokens=True)


def _checked_logprobs(out: GenOutput, uid: str) -> list[float] | None:
    """The sampler's per-token log-probs, one per response token, or None (not requested)."""
    if out.logprobs is None:
        return None
    if len(out.logprobs) != len(out.token_ids):
        raise RuntimeError(f"engine: prompt {uid}: {len(out.logprobs)} log-probs for {len(out.token_ids)} tokens")
    return [float(x) for x in out.logprobs]


def to_groups(prompts: list[Prompt], outputs: list[list[GenOutput]], tokenizer: Any) -> list[Group]:
    """Engine outputs (in prompt order) + their Prompts -> Groups with decoded text, unscored."""
    if len(prompts) != len(outputs):
        raise ValueError(f"to_groups: {len(prompts)} prompts but {len(outputs)} output lists")
    groups = []
    for prompt, outs in zip(prompts, outputs):
        samples = [
            Sample(response_ids=list(o.token_ids), finish_reason=o.finish_reason, text=decode_response(tokenizer, o),
                   rollout_logprobs=_checked_logprobs(o, prompt.uid))
            for o in outs
        ]
        groups.append(Group(prompt=prompt, samples=samples))
    return groups


def generate_groups(engine: RolloutEngine, prompts: list[Prompt], sampling: SamplingParams, tokenizer: Any) -> list[Group]:
    """The rollout stage in one call: Prompts (with input_ids) -> Groups of `sampling.n` samples."""
    for p in prompts:
        if not p.input_ids:
            raise ValueError(f"prompt {p.uid}: empty input_ids (apply the chat template first)")
    outputs = engine.generate([p.input_ids for p in prompts], sampling)
    check_outputs(outputs, len(prompts), sampling.n, type(engine).__name__)
    return to_groups(prompts, outputs, tokenizer)
