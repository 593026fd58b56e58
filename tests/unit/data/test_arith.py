"""The built-in arithmetic task: solutions worked by hand, the split, the teacher's error model."""

import json
import random

import pytest

from megatron_oreal.data import arith


@pytest.mark.parametrize(
    "expr, solution",
    [
        ("1-4*5", "1-20=-19\\boxed{-19}"),  # the brief's example: * first
        ("97-9+17", "88+17=105\\boxed{105}"),  # + and - left to right
        ("7*2*2", "14*2=28\\boxed{28}"),  # leftmost * first
        ("5-20-30", "-15-30=-45\\boxed{-45}"),  # a negative intermediate stays leftmost
        ("37+58*2", "37+116=153\\boxed{153}"),
        ("3*4-5*6", "12-5*6=12-30=-18\\boxed{-18}"),
        ("8", "8\\boxed{8}"),
    ],
)
def test_reference_solution(expr, solution):
    assert arith.reference_solution(expr) == solution
    assert arith.gold_answer(expr) == arith.boxed_answer(solution)


def test_parse_render_round_trip_and_errors():
    assert arith.parse("-15+3") == ([-15, 3], ["+"])
    assert arith.parse("12-5*6") == ([12, 5, 6], ["-", "*"])
    for e in ["12-5*6", "-15-30", "0+0*0"]:
        assert arith.render(*arith.parse(e)) == e
    for bad in ["", "1+", "1/2", "1+-2", "a"]:
        with pytest.raises(ValueError, match="arith"):
            arith.parse(bad)


def test_gold_matches_python_eval_on_random_problems():
    # Python's own precedence is the same (* before +/-; left-associative), so it is an oracle here.
    rng = random.Random(7)
    for spec in [arith.ArithSpec(), arith.ArithSpec(digits=3, muldigits=2, nops=4)]:
        for _ in range(300):
            p = arith.random_problem(rng, spec)
            assert int(arith.gold_answer(p)) == eval(p)  # noqa: S307 (our own generated text)
            assert len(arith.parse(p)[1]) == spec.nops


def test_operand_ranges():
    rng = random.Random(0)
    for _ in range(500):
        nums, ops = arith.parse(arith.random_problem(rng, arith.ArithSpec(digits=2, muldigits=1, nops=2)))
        for i, v in enumerate(nums):
            by_mul = (i > 0 and ops[i - 1] == "*") or (i < len(ops) and ops[i] == "*")
            assert 0 <= v < (10 if by_mul else 100)


def test_splits_are_disjoint_deterministic_and_sized():
    train = arith.make_problems(3000, seed=1, split="train")
    held = arith.make_problems(600, seed=1, split="heldout")
    held_other_seed = arith.make_problems(600, seed=2, split="heldout")
    assert len(set(train)) == 3000 and len(set(held)) == 600
    assert not set(train) & (set(held) | set(held_other_seed))  # the split is by text, not by seed
    assert all(arith.is_held_out(p) for p in held) and not any(arith.is_held_out(p) for p in train)
    assert arith.make_problems(600, seed=1, split="heldout") == held
    assert held != held_other_seed
    # the hash is stable across processes (sha256, not Python's salted hash): a pinned value
    assert arith.problem_hash("1-4*5") == int.from_bytes(__import__("hashlib").sha256(b"1-4*5").digest()[:8], "big")
    # about 20% of random problems are held out
    rng = random.Random(3)
    frac = sum(arith.is_held_out(arith.random_problem(rng)) for _ in range(5000)) / 5000
    assert 0.18 < frac < 0.22
    with pytest.raises(ValueError, match="split"):
        arith.make_problems(1, 0, "test")


def test_negative_subtype():
    assert arith.has_negative_step("1-4*5")  # 1-20 = -19
    assert arith.has_negative_step("5-20+30")  # -15 on the way, 15 at the end
    assert not arith.has_negative_step("20-5-3")
    assert not arith.has_negative_step("2*3+4")


def test_teacher_error_model():
    # sign dropped at every negative intermediate, arithmetic otherwise right
    assert arith.solve_states("1-4*5", drop_sign=True) == ["1-20", "19"]
    assert arith.solve_states("5-20-30", drop_sign=True) == ["15-30", "15"]
    rng = random.Random(0)
    # never wrong outside the sub-type
    assert all(arith.teacher_solution("97-9+17", rng, 1.0) == ("88+17=105\\boxed{105}", True) for _ in range(20))
    assert arith.teacher_solution("1-4*5", rng, 1.0) == ("1-20=19\\boxed{19}", False)
    assert arith.teacher_solution("1-4*5", rng, 0.0) == ("1-20=-19\\boxed{-19}", True)
    # the rate is what it says: 0.6 of 4000 draws, within 4 standard errors (sd = 0.0077)
    wrong = sum(not arith.teacher_solution("1-4*5", rng, 0.6)[1] for _ in range(4000)) / 4000
    assert abs(wrong - 0.6) < 0.031
    # a dropped sign carries into later steps: `5-20+30` -> 15+30=45, gold 15
    assert arith.teacher_solution("5-20+30", rng, 1.0) == ("15+30=45\\boxed{45}", False)
    assert arith.teacher_solution("0-0*5", rng, 1.0)[1]  # 0-0 = 0, not negative: not the sub-type


def test_boxed_answer():
    assert arith.boxed_answer("1-20=-19\\boxed{-19}") == "-19"
    assert arith.boxed_answer("\\boxed{1}\\boxed{2}") == "2"
    assert arith.boxed_answer("no box") is None
    assert arith.boxed_answer("\\boxed{12") is None


def test_jsonl_writers(tmp_path):
    n = arith.write_prompts_jsonl(tmp_path / "p.jsonl", ["1-4*5", "7*2*2"])
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert n == 2 and rows == [{"question": "1-4*5", "gold_answer": "-19"}, {"question": "7*2*2", "gold_answer": "28"}]
    arith.write_sft_jsonl(tmp_path / "sub" / "s.jsonl", [("1-4*5", "1-20=-19\\boxed{-19}")])
    assert json.loads((tmp_path / "sub" / "s.jsonl").read_text()) == {"prompt": "1-4*5", "response": "1-20=-19\\boxed{-19}"}


def test_spec_validation():
    with pytest.raises(ValueError, match="ops"):
        arith.ArithSpec(ops="+/")
    with pytest.raises(ValueError, match="nops"):
        arith.ArithSpec(nops=0)
