"""`verify(solution, gold) -> bool` and the reason-giving `judge` the worker pool runs.

Order follows docs/algorithm.md §5.1: truncation check, strip the reasoning, extract, then compare (a cheap
exact pass first, structure and sympy after). An LLM judge, if any, is the caller's business
(`llm_judge.py`); it is asked only when this says wrong.
"""

from __future__ import annotations

import re

from megatron_oreal.reward.equivalence import answers_equal, scalar_equal
from megatron_oreal.reward.extract import extract_answers, is_truncated, strip_reasoning
from megatron_oreal.reward.normalize import MAX_ANSWER_CHARS, clean, compact, parse_number

# Reasons a Result can carry; `correct` is the only one that scores.
REASONS = ("correct", "wrong", "no_answer", "truncated", "timeout", "error")
# finish_reason values (OpenAI / vLLM / SGLang) that mean the model stopped on its own.
STOPPED = {None, "stop", "eos", "stop_word", "end_turn"}


def _gold_answer(gold: str) -> str:
    """Datasets sometimes store the gold as a whole solution; take its box if it has one."""
    if "boxed" in gold or "fbox" in gold:
        boxes = extract_answers(gold)
        if boxes:
            return boxes[-1]
    return gold.strip()


def _same(a: str, b: str) -> bool:
    """Cheap identity between two boxes (for the hedging rule): text, or the same exact number."""
    if compact(clean(a)) == compact(clean(b)):
        return True
    na, nb = parse_number(clean(a)), parse_number(clean(b))
    return na is not None and nb is not None and na.value == nb.value


def _prepare(solution: str, gold: str, stop_word: str | None, finish_reason: str | None):
    """(reason, answer, gold answer): reason is set when the case is decided before comparing."""
    if finish_reason not in STOPPED or (stop_word and is_truncated(solution, stop_word)):
        return "truncated", None, None
    answers = extract_answers(strip_reasoning(solution, stop_word))
    if not answers:
        return "no_answer", None, None
    answer, golden = answers[-1], _gold_answer(gold)
    if any(not _same(other, answer) for other in answers[:-1]):
        return "wrong", None, None  # hedged: two different boxed answers in the final part
    if len(answer) > MAX_ANSWER_CHARS or not golden:
        return "wrong", None, None
    return None, answer, golden


def fast_judge(solution: str, gold: str, stop_word: str | None = None, finish_reason: str | None = None) -> str | None:
    """A reason when string/number normalisation settles the case, else None (needs `judge`).

    Cheap enough for the parent process: linear scans and Fraction arithmetic, no sympy.
    """
    reason, answer, golden = _prepare(solution, gold, stop_word, finish_reason)
    if reason is not None:
        return reason
    pa, ga = clean(answer), clean(golden)
    if compact(pa) == compact(ga):
        return "correct"
    pn, gn = parse_number(pa), parse_number(ga)
    if pn is not None and gn is not None:
        return "correct" if scalar_equal(pa, ga) else "wrong"
    if gn is not None and re.fullmatch(r"[\d\s.,+-]+", pa):
        return "wrong"  # a number's gold against bare digits that are not one number (`1, 2`, `3 4`)
    return None


def judge(solution: str, gold: str, stop_word: str | None = None, finish_reason: str | None = None) -> str:
    """One of REASONS except `timeout` (that one the pool gives)."""
    reason, answer, golden = _prepare(solution, gold, stop_word, finish_reason)
    if reason is not None:
        return reason
    try:
        return "correct" if answers_equal(answer, golden) else "wrong"
    except RecursionError:
        return "wrong"  # pathological nesting; an answer nobody can read is not correct


def verify(solution: str, gold: str) -> bool:
    """True when the response's final answer equals the gold answer. Pure; never raises."""
    try:
        return judge(solution, gold) == "correct"
    except Exception:
        return False
