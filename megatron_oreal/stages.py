"""The stages of one iteration that move samples between ranks: rollout+reward, and evaluation.

Each data-parallel replica has one rollout engine on its first pipeline stage (TP rank 0 of that
stage is the "engine rank"), or, with `rollout.engines_on_every_stage`, one per pipeline stage. The
replica's prompts are split into contiguous chunks, one per engine; each engine rank samples its
chunk and the verifier scores it there; the scored groups are shared over the replica's
model-parallel group (a broadcast from the one engine rank, or an all-gather put back in stage order)
and all-gathered over data parallel, so that every rank holds the same global list of groups and the
selection (seeded by step) picks the same batch everywhere.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch.distributed as dist

from megatron_oreal.rollout.engine import SamplingParams, generate_groups
from megatron_oreal.types import Group, Prompt


@dataclass(frozen=True)
class Comm:
    """What the stages need from the parallel layout (built by mcore.parallel; a world of one by default)."""

    is_engine_rank: bool = True
    engine_src: int = 0  # global rank of this replica's (first) engine rank
    mp_group: Any = None  # this replica's model-parallel group (None: no broadcast needed)
    dp_group: Any = None  # data-parallel group for object all-gathers (None: DP=1)
    dp_size: int = 1
    dp_rank: int = 0
    engines: int = 1  # engines per replica (one per pipeline stage with rollout.engines_on_every_stage)
    engine_index: int = 0  # which of them this rank's stage runs


def engine_share(items: list, comm: Comm) -> list:
    """This engine's contiguous chunk of the replica's items (chunks in engine order restore the list)."""
    n, k, i = len(items), comm.engines, comm.engine_index
    return items[i * n // k:(i + 1) * n // k]

def score_groups(groups: list[Group], verifier: Any) -> None:
    """Reward +1 / -1 per sample (docs/algorithm.md §2.2): truncated, unparsable, timed-out all count as -1."""
    cases = [
        {"solution": s.text, "gold": g.prompt.gold, "finish_reason": s.finish_reason, "question": g.prompt.text}
        for g in groups
        for s in g.samples
    ]
    results = iter(verifier.verify_batch(cases))
    for g in groups:
        for s in g.samples:
            r = next(results)
            s.reward = 1.0 if r.correct else -1.0
            s.reason = r.reason


def share_groups(obj: Any, comm: Comm) -> Any:
    """The replica's engine output on every rank of the replica: the one engine rank's `obj`, or with
    several engines the concatenation of their lists in engine order (other ranks pass None)."""
    if comm.mp_group is None or dist.get_world_size(comm.mp_group) == 1:
        return obj
    if comm.engines == 1:
        box = [obj]
        dist.broadcast_object_list(box, src=comm.engine_src, group=comm.mp_group)
        return box[0]
    parts: list[Any] = [None] * dist.get_world_size(comm.mp_group)
    dist.all_gather_object(parts, (comm.engine_index, obj) if comm.is_engine_rank else None, group=comm.mp_group)
    mine = sorted(p for p in parts if p is not None)
    if [i for i, _ in mine] != list(range(comm.engines)):
        raise RuntimeError(f"share_groups: expected engines 0..{comm.engines - 1}, got {[i for i, _ in mine]}")
    return [x for _, part in mine for x in part]


def gather_groups(items: list, comm: Comm) -> list:
    if comm.dp_size <= 1:
        return items
    out: list[Any] = [None] * comm.dp_size
    dist.all_gather_object(out, items, group=comm.dp_group)
    return [x for part in out for x in part]


def rollout_and_score(
    engine: Any, prompts: list[Prompt], sampling: SamplingParams, tokenizer: Any, verifier: Any, comm: Comm
) -> list[Group]:
    """This replica's prompts -> scored groups of every replica, in global prompt order."""
    groups = None
    if comm.is_engine_rank:
        groups = generate_groups(engine, prompts, sampling, tokenizer)
        score_groups(groups, verifier)
    groups = share_groups(groups, comm)
    return gather_groups(groups, comm)


@dataclass
class EvalResult:
    pass1: float
    num: int
    correct: int
    by_subject: dict[str, float] = field(default_factory=dict)
    by_level: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    mean_response_tokens: float = 0.0
    predictions: list[dict] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"pass@1 {100 * self.pass1:.1f}% ({self.correct}/{self.num}), mean response {self.mean_response_tokens:.0f} tokens"]
        for title, part in (("subject", self.by_subject), ("level", self.by_level)):
            if len(part) > 1:
                lines.append(f"  by {title}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in sorted(part.items())))
        lines.append("  reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items())))
        return "\n".join(lines)


def summarize(groups: Sequence[Group]) -> EvalResult:
    """Greedy pass@1 (one sample per prompt) with per-subject / per-level breakdowns."""
    correct = Counter()
    total = Counter()
    reasons = Counter()
    preds = []
    tokens = 0
    for g in groups:
        s = g.samples[0]
        ok = s.reward > 0
        reasons[s.reason] += 1
        tokens += len(s.response_ids)
        for key in ("subject", "level"):
            if key in g.prompt.meta:
                total[(key, str(g.prompt.meta[key]))] += 1
                correct[(key, str(g.prompt.meta[key]))] += ok
        preds.append({"uid": g.prompt.uid, "question": g.prompt.text, "gold": g.prompt.gold,
                      "response": s.text, "correct": ok, "reason": s.reason, "finish_reason": s.finish_reason})
    n = len(groups)
    n_ok = sum(p["correct"] for p in preds)
    parts: dict[str, dict[str, float]] = defaultdict(dict)
    for (key, value), count in total.items():
        parts[key][value] = correct[(key, value)] / count
    return EvalResult(
        pass1=n_ok / max(n, 1), num=n, correct=n_ok, by_subject=parts.get("subject", {}),
        by_level=parts.get("level", {}), reasons=dict(reasons), mean_response_tokens=tokens / max(n, 1),
        predictions=preds,
    )


def evaluate(
    engine: Any, prompts: list[Prompt], sampling: SamplingParams, tokenizer: Any, verifier: Any, comm: Comm,
    batch_size: int = 64,
) -> EvalResult:
    """Greedy pass@1 over `prompts`, split across data-parallel replicas (every rank gets the result)."""
    mine = engine_share(prompts[comm.dp_rank :: comm.dp_size], comm)
    groups: list[Group] | None = None
    if comm.is_engine_rank:
        groups = []
        for i in range(0, len(mine), batch_size):
            chunk = generate_groups(engine, mine[i : i + batch_size], sampling, tokenizer)
            score_groups(chunk, verifier)
            groups += chunk
    groups = gather_groups(share_groups(groups, comm), comm)
    order = {p.uid: i for i, p in enumerate(prompts)}
    groups.sort(key=lambda g: order.get(g.prompt.uid, 0))
    return summarize(groups)
