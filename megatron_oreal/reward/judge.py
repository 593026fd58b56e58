"""`verify(solution, gold) -> bool` and the reason-giving `judge` the worker pool runs.

Order follows docs/algorithm.md §5.1: truncation check, strip the reasoning, extract, then compare (a cheap
exact pass first, structure and sympy after). An LLM judge, if any, is the caller's business
(`llm_judge.py`); it is asked only when this says wrong.
"""

from __future__ import annotations

import re

from megatron_oreal.reward.equivalence import NeedsSympy, answers_equal, scalar_equal, text_only_equal
from megatron_oreal.reward.extract import extract_answers, is_truncated, strip_reasoning
from megatron_oreal.reward.normalize import MAX_ANSWER_CHARS, clean, compact, parse_number

# Longest solution or gold looked at (characters): longer inputs are `wrong` before any regex runs.
# Far above any real response of a 32k-token budget (~4 characters a token).
MAX_SOLUTION_CHARS = 400_000

# Reasons a Result can carry; `correct` is the only one that scores.
REASONS = ("correct", "wrong", "no_answer", "truncated", "timeout", "error")
# finish_reason values (OpenAI / vLLM / SGLang) that mean the model stopped on its own.
STOPPED = {None, "stop", "eos", "stop_word", "end_turn"}
# A plain integer (the answer of most math problems): compared as one before the ~40 µs of `clean`.
_INTEGER = re.compile(r"-?\d{1,40}")


def _gold_answer(gold: str) -> str:
    """Datasets sometimes store the gold as a whole solution; take its box if it has one.

    Several boxes in the gold's final part (`\\boxed{1} and \\boxed{2}`) are together the answer.
    """
    if "boxed" in gold or "fbox" in gold:
        boxes = extract_answers(gold)
        if boxes:
            return ", ".join(boxes) if len(boxes) > 1 else boxes[-1]
    return gold.strip()


def _same(a: str, b: str) -> bool:
    """Cheap identity between two boxes (for the hedging rule): text, or the same exact number."""
    if compact(clean(a)) == compact(clean(b)):
        return True
    na, nb = parse_number(clean(a)), parse_number(clean(b))
    return na is not None and nb is not None and na.value == nb.value


def _prepare(solution: str, gold: str, stop_word: str | None, finish_reason: str | None, strict_hedging: bool):
    """(reason, answers, gold answer): reason is set when the case is decided before comparing.

    `answers` are the distinct boxes of the final part, the last one last. Hedging rule: by default
    only the last box is the answer (the paper's released judge does this, and long chain-of-thought
    models correct a boxed answer by boxing again); `strict_hedging` scores a final part whose
    earlier box differs from the last one as wrong.
    """
    if len(solution) > MAX_SOLUTION_CHARS or len(gold) > MAX_SOLUTION_CHARS:
        return "wrong", None, None  # bounded before any regex runs over either side
    if finish_reason not in STOPPED or (stop_word and is_truncated(solution, stop_word)):
        return "truncated", None, None
    answers = extract_answers(strip_reasoning(solution, stop_word))
    if not answers:
        return "no_answer", None, None
    answer, golden = answers[-1], _gold_answer(gold)
    if strict_hedging and any(not _same(other, answer) for other in answers[:-1]):
        return "wrong", None, None  # hedged: two different boxed answers in the final part
    if len(answer) > MAX_ANSWER_CHARS or not golden or len(golden) > MAX_ANSWER_CHARS:
        return "wrong", None, None
    return None, answers, golden


def fast_judge(solution: str, gold: str, stop_word: str | None = None, finish_reason: str | None = None,
               strict_hedging: bool = False) -> str | None:
    """A reason when string/number normalisation settles the case, else None (needs `judge`).

    Cheap enough for the parent process: inputs are length-checked first (MAX_SOLUTION_CHARS,
    MAX_ANSWER_CHARS), then linear scans and Fraction arithmetic, no sympy.
    """
    reason, answers, golden = _prepare(solution, gold, stop_word, finish_reason, strict_hedging)
    if reason is not None:
        return reason
    answer = answers[-1]
    if _INTEGER.fullmatch(answer) and _INTEGER.fullmatch(golden):  # most math golds: no normalising needed
        return "correct" if int(answer) == int(golden) else "wrong"
    pa, ga = clean(answer), clean(golden)
    if compact(pa) == compact(ga):
        return "correct"
    pn, gn = parse_number(pa), parse_number(ga)
    if pn is not None and gn is not None:
        return "correct" if scalar_equal(pa, ga) else "wrong"
    if gn is not None and len(answers) == 1 and re.fullmatch(r"[\d\s.,+-]+", pa):
        return "wrong"  # a number's gold against bare digits that are not one number (`1, 2`, `3 4`)
    try:  # the text rules alone (bounded: see equivalence.text_only_equal); sympy is a worker's job
        return _compare(answers, golden, strict_hedging, text_only_equal)
    except NeedsSympy:
        return None


def judge(solution: str, gold: str, stop_word: str | None = None, finish_reason: str | None = None,
          strict_hedging: bool = False) -> str:
    """One of REASONS except `timeout` (that one the pool gives)."""
    reason, answers, golden = _prepare(solution, gold, stop_word, finish_reason, strict_hedging)
    if reason is not None:
        return reason
    return _compare(answers, golden, strict_hedging, answers_equal)


def _compare(answers: list[str], golden: str, strict_hedging: bool, equal) -> str:
    try:
        if equal(answers[-1], golden):
            return "correct"
        # `\boxed{1}` and `\boxed{2}` for the gold `1, 2`: the final part's boxes together, in order
        if len(answers) > 1 and not strict_hedging:
            joined = ", ".join(answers)
            if len(joined) <= MAX_ANSWER_CHARS and equal(joined, golden):
                return "correct"
        return "wrong"
    except RecursionError:
        return "wrong"  # pathological nesting; an answer nobody can read is not correct


def verify(solution: str, gold: str) -> bool:
    """True when the response's final answer equals the gold answer. Pure; never raises."""
    try:
        return judge(solution, gold) == "correct"
    except Exception:
        return False
