"""The built-in credit-assignment task: long chains where one early step decides the answer.

A problem is `a-b*c+d+e+f` (a in [0, 30), every other operand a digit). Its reference solution is
the arithmetic task's (data/arith.py): the expression after each reduction, joined by `=`, boxed:

    7-4*5+2+6+1 -> 7-20+2+6+1=-13+2+6+1=-11+6+1=-5+1=-4\\boxed{-4}
                              ^^^ the deciding step: a-b*c, negative on the sub-type

The multiplication comes first (a safe step), then the subtraction `a - b*c` (the deciding step),
then three additions that only carry the value forward. About half the problems have a negative
`a - b*c` (the sub-type). On a sub-type problem the imperfect teacher, with probability
`sign_error_rate` (one coin per problem), drops the minus sign of that ONE intermediate value and
continues correctly from |a - b*c|:

    7-4*5+2+6+1 -> 7-20+2+6+1=13+2+6+1=15+6+1=21+1=22\\boxed{22}

So a wrong answer is decided by the 1-3 characters of one early step, and the ~30 characters after it
are correct arithmetic on the wrong value: a sequence-level reward blames all of them, a token-level
credit assignment should blame the deciding step (`deciding_span` marks it for measurement).

Same interface as data/arith.py (make_problems, teacher_solution, has_negative_step, ...), so the
tools that make and evaluate the arithmetic model take `--task credit` (tools/calibrate_tiny.py).
The train/held-out split is arith's hash split of the problem text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable

from megatron_oreal.data.arith import (  # noqa: F401  (re-exported: the shared task interface)
    distinct_problems,
    boxed_answer,
    format_solution,
    gold_answer,
    is_held_out,
    parse,
    reference_solution,
    render,
    solve_states,
    write_prompts_jsonl,
    write_sft_jsonl,
)


@dataclass(frozen=True)
class CreditSpec:
    a_max: int = 30  # a in [0, a_max): about half of the problems have a - b*c < 0 at a_max=30
    tail: int = 3  # additions after the deciding step

    def __post_init__(self):
        if self.a_max < 1 or self.tail < 1:
            raise ValueError(f"CreditSpec: a_max and tail must be >= 1, got {self}")


def random_problem(rng: random.Random, spec: CreditSpec = CreditSpec()) -> str:
    nums = [rng.randrange(spec.a_max)] + [rng.randrange(10) for _ in range(2 + spec.tail)]
    return render(nums, ["-", "*"] + ["+"] * spec.tail)


def _check(expr: str) -> tuple[list[int], list[str]]:
    nums, ops = parse(expr)
    if len(ops) < 3 or ops[:2] != ["-", "*"] or any(op != "+" for op in ops[2:]):
        raise ValueError(f"credit: expected a problem of the form a-b*c+d+..., got {expr!r}")
    return nums, ops


def deciding_value(expr: str) -> int:
    """a - b*c: the value written at the deciding step (the solution's second state)."""
    nums, _ = _check(expr)
    return nums[0] - nums[1] * nums[2]


def has_negative_step(expr: str) -> bool:
    """The sub-type the teacher gets wrong: the deciding step's value a - b*c is negative."""
    return deciding_value(expr) < 0


def wrong_states(expr: str) -> list[str]:
    """The teacher's wrong solution states: |a - b*c| at the deciding step, correct after it."""
    nums, ops = _check(expr)
    states = [render(nums[:1] + [nums[1] * nums[2]] + nums[3:], ["-"] + ops[2:])]
    v = abs(deciding_value(expr))
    rest = nums[3:]
    while True:
        states.append(render([v] + rest, ops[2 : 2 + len(rest)]))
        if not rest:
            return states
        v, rest = v + rest[0], rest[1:]


def teacher_solution(expr: str, rng: random.Random, sign_error_rate: float = 0.6) -> tuple[str, bool]:
    """The SFT teacher's solution and whether it is correct (see the module docstring)."""
    if has_negative_step(expr) and rng.random() < sign_error_rate:
        states = wrong_states(expr)
        return format_solution(states), states[-1] == gold_answer(expr)
    return reference_solution(expr), True


def signdrop_answer(expr: str) -> str:
    """The answer the teacher's error leads to (for measuring how often a model makes it)."""
    return wrong_states(expr)[-1]


def deciding_span(response: str) -> tuple[int, int] | None:
    """Character span [start, end) of the deciding step's value in a response, or None.

    It is the text between the first and second `=` (the second state) up to its first operator
    after the value, e.g. `-13` in `7-20+2+6+1=-13+2+6+1=...`. None when the response has no second state.
    """
    first = response.find("=")
    if first < 0:
        return None
    start = first + 1
    end = start + (1 if response[start : start + 1] == "-" else 0)
    while end < len(response) and response[end].isdigit():
        end += 1
    return (start, end) if end > start else None


def make_problems(
    n: int,
    seed: int,
    split: str,
    spec: CreditSpec = CreditSpec(),
    heldout_permille: int = 200,
    exclude: Iterable[str] = (),
) -> list[str]:
    """n distinct problems of one split ("train" or "heldout"), deterministic in (seed, split, spec)."""
    return distinct_problems("credit", random_problem, n, seed, split, spec, heldout_permille, exclude)
