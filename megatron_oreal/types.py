"""The vocabulary shared between stages: a prompt, its K sampled responses, the trained batch.

Nothing else crosses a stage boundary. Token ids are plain lists (they come from the sampler and go
to the batch builder); tensors appear only inside a stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Prompt:
    uid: str  # stable id (file:line or the task's index), used in logs and HTML pages
    text: str  # the question as the user wrote it
    gold: str  # the dataset's answer string
    input_ids: list[int] = field(default_factory=list)  # chat-templated prompt tokens
    meta: dict = field(default_factory=dict)  # subject, level, pass_rate, ... (for eval breakdowns)


@dataclass
class Sample:
    response_ids: list[int]  # sampled tokens; the stop token is included when it was generated
    finish_reason: str  # "stop" | "length"
    text: str = ""  # decoded response (what the verifier reads)
    reward: float = 0.0  # +1 correct / -1 incorrect (docs/algorithm.md §2.2)
    reason: str = ""  # the verifier's reason: correct / wrong / no_answer / truncated / timeout / error
    advantage: float = 0.0  # group-level advantage, computed over all K samples
    # [R] sampler log-probs of response_ids (rollout.log_logprob_mismatch); logged, and the truncated
    # importance weights of algo.rollout_correction=tis. None when the engine was not asked for them.
    rollout_logprobs: list[float] | None = None


@dataclass
class Group:
    prompt: Prompt
    samples: list[Sample]  # the K responses to this prompt

    @property
    def pass_rate(self) -> float:
        return sum(s.reward > 0 for s in self.samples) / max(len(self.samples), 1)


@dataclass
class TrainSequence:
    prompt_ids: list[int]
    response_ids: list[int]
    advantage: float
    is_positive: bool  # reward > 0: behaviour cloning term; else the negative policy-gradient term
    rollout_logprobs: list[float] | None = None  # [R] from Sample: compared with Megatron's; TIS weights


@dataclass
class TrainBatch:
    """The selected sequences of one step, identical on every rank (each rank trains its DP share)."""

    sequences: list[TrainSequence]  # [M]
    step: int = 0

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)
