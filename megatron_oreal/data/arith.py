"""The built-in synthetic task: integer arithmetic with `+ - *`, solved one reduction at a time.

A problem is an expression such as `1-4*5`; its reference solution writes the expression after each
reduction (`*` first, leftmost; then `+`/`-` left to right), joined by `=`, then boxes the result:

    1-4*5   ->  1-20=-19\\boxed{-19}
    97-9+17 ->  88+17=105\\boxed{105}

Held-out problems are chosen by a hash of the problem text, so the train/held-out split is the same
for every seed, every stage (SFT and RL) and every process, and no held-out problem can leak into
training however the training problems are drawn.

The imperfect teacher (`teacher_solution`) produces the SFT data. Its error model is systematic, on a
recognisable sub-type, so that an SFT model learns a *wrong mode* that RL can flip (see
examples/tiny/README.md): on a problem whose exact evaluation passes through a negative number, with
probability `sign_error_rate` the teacher drops the minus sign of every negative intermediate result
(it writes |v| and continues from |v|), e.g. `1-4*5 -> 1-20=19\\boxed{19}`. Everything else it solves
correctly. The verifier catches these answers, so RL has a clean signal exactly where SFT went wrong.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

OPS = "+-*"


@dataclass(frozen=True)
class ArithSpec:
    digits: int = 2  # operands of + and - are drawn from [0, 10**digits)
    muldigits: int = 1  # operands next to a `*` are drawn from [0, 10**muldigits)
    nops: int = 2  # operators per problem
    ops: str = OPS

    def __post_init__(self):
        if self.digits < 1 or self.muldigits < 1 or self.nops < 1:
            raise ValueError(f"ArithSpec: digits, muldigits and nops must be >= 1, got {self}")
        if not self.ops or set(self.ops) - set(OPS):
            raise ValueError(f"ArithSpec.ops: expected a non-empty subset of {OPS!r}, got {self.ops!r}")


# ---------------------------------------------------------------- expressions


def parse(expr: str) -> tuple[list[int], list[str]]:
    """`1-4*5` -> ([1, 4, 5], ['-', '*']). A leading `-` belongs to the first operand.

    Only the first operand can be negative: `*` is reduced before any `-`, and `+`/`-` run left to
    right, so a negative intermediate is always the leftmost term (`-15+3`).
    """
    nums: list[int] = []
    ops: list[str] = []
    i, n = 0, len(expr)
    while i < n:
        j = i + 1 if i == 0 and expr.startswith("-") else i
        k = j
        while k < n and expr[k].isdigit():
            k += 1
        if k == j:
            raise ValueError(f"arith: bad expression {expr!r} at column {i}")
        nums.append(int(expr[i:k]))
        if k < n:
            if expr[k] not in OPS:
                raise ValueError(f"arith: bad operator {expr[k]!r} in {expr!r}")
            ops.append(expr[k])
            k += 1
            if k == n:
                raise ValueError(f"arith: expression {expr!r} ends with an operator")
        i = k
    if not nums:
        raise ValueError("arith: empty expression")
    return nums, ops


def render(nums: list[int], ops: list[str]) -> str:
    out = [str(nums[0])]
    for op, v in zip(ops, nums[1:]):
        out.append(op + str(v))
    return "".join(out)


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def reduce_once(nums: list[int], ops: list[str], drop_sign: bool = False) -> tuple[list[int], list[str]]:
    """One reduction: the leftmost `*` if any, else the leftmost operator (left-to-right + and -).

    drop_sign: the teacher's mistake, write |v| for a negative result v.
    """
    i = ops.index("*") if "*" in ops else 0
    v = _apply(nums[i], ops[i], nums[i + 1])
    if drop_sign:
        v = abs(v)
    return nums[:i] + [v] + nums[i + 2 :], ops[:i] + ops[i + 1 :]


def solve_states(expr: str, drop_sign: bool = False) -> list[str]:
    """The expressions after each reduction; the last one is the answer."""
    nums, ops = parse(expr)
    states = []
    while ops:
        nums, ops = reduce_once(nums, ops, drop_sign)
        states.append(render(nums, ops))
    if not states:  # a bare number: its own answer
        states.append(render(nums, ops))
    return states


def gold_answer(expr: str) -> str:
    return solve_states(expr)[-1]


def format_solution(states: list[str]) -> str:
    return "=".join(states) + "\\boxed{" + states[-1] + "}"


def reference_solution(expr: str) -> str:
    """`1-4*5` -> `1-20=-19\\boxed{-19}` (no stop token: the chat template adds it)."""
    return format_solution(solve_states(expr))


def has_negative_step(expr: str) -> bool:
    """The sub-type the teacher gets wrong: the exact evaluation passes through a negative number."""
    return any(s.startswith("-") for s in solve_states(expr))


def boxed_answer(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (no nesting in this task), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    end = text.find("}", start)
    return None if end < 0 else text[start + len("\\boxed{") : end]


# ---------------------------------------------------------------- problems and splits


def problem_hash(text: str) -> int:
    """A stable 64-bit hash of the problem text (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def is_held_out(text: str, heldout_permille: int = 200) -> bool:
    """Held-out iff the text hashes into the first `heldout_permille`/1000 of the hash space."""
    return problem_hash(text) % 1000 < heldout_permille


def random_problem(rng: random.Random, spec: ArithSpec = ArithSpec()) -> str:
    ops = [rng.choice(spec.ops) for _ in range(spec.nops)]
    nums = []
    for i in range(spec.nops + 1):
        by_mul = (i > 0 and ops[i - 1] == "*") or (i < spec.nops and ops[i] == "*")
        nums.append(rng.randrange(10 ** (spec.muldigits if by_mul else spec.digits)))
    return render(nums, ops)


def make_problems(
    n: int,
    seed: int,
    split: str,
    spec: ArithSpec = ArithSpec(),
    heldout_permille: int = 200,
    exclude: Iterable[str] = (),
) -> list[str]:
    """n distinct problems of one split ("train" or "heldout"), deterministic in (seed, split, spec)."""
    return distinct_problems("arith", random_problem, n, seed, split, spec, heldout_permille, exclude)


def distinct_problems(task: str, draw, n: int, seed: int, split: str, spec, heldout_permille: int = 200,
                      exclude: Iterable[str] = ()) -> list[str]:
    """n distinct problems `draw(rng, spec)` of one split, the split decided by the problem's hash
    (is_held_out); shared by the built-in tasks (arith, credit), `task` names the stream and errors."""
    if split not in ("train", "heldout"):
        raise ValueError(f"{task}: split must be 'train' or 'heldout', got {split!r}")
    want_held = split == "heldout"
    rng = random.Random(f"{task}:{seed}:{split}")
    seen = set(exclude)
    out: list[str] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * n + 100000:
            raise ValueError(f"{task}: could not find {n} distinct {split} problems for {spec}")
        p = draw(rng, spec)
        if p in seen or is_held_out(p, heldout_permille) != want_held:
            continue
        seen.add(p)
        out.append(p)
    return out


# ---------------------------------------------------------------- the imperfect teacher


def teacher_solution(expr: str, rng: random.Random, sign_error_rate: float = 0.6) -> tuple[str, bool]:
    """The SFT teacher's solution and whether it is correct.

    Error model: on the negative sub-type (`has_negative_step`), with probability sign_error_rate it
    drops the sign of every negative intermediate result (one coin per problem, so a wrong solution
    is consistently wrong: `5-20-30 -> 15-30=15`). Other problems are always solved correctly.
    """
    if has_negative_step(expr) and rng.random() < sign_error_rate:
        states = solve_states(expr, drop_sign=True)
        return format_solution(states), states[-1] == gold_answer(expr)
    return reference_solution(expr), True


# ---------------------------------------------------------------- JSONL


def _write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            n += 1
    return n


def write_prompts_jsonl(path: str | Path, problems: Iterable[str]) -> int:
    """`{"question", "gold_answer"}` rows, the trainer's prompt format (DataConfig keys)."""
    return _write_jsonl(path, ({"question": p, "gold_answer": gold_answer(p)} for p in problems))


def write_sft_jsonl(path: str | Path, pairs: Iterable[tuple[str, str]]) -> int:
    """`{"prompt", "response"}` rows; prompt is the question text (un-templated)."""
    return _write_jsonl(path, ({"prompt": p, "response": r} for p, r in pairs))
