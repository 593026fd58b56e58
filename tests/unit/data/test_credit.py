"""The credit-assignment task (data/credit.py) and its measurement (tools/credit_rm_share.py)."""

import json
import random
import sys
from pathlib import Path

import pytest

from megatron_oreal.data import arith, credit

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))


def test_solution_and_the_teachers_error_at_the_deciding_step():
    q = "7-4*5+2+6+1"
    assert credit.reference_solution(q) == "7-20+2+6+1=-13+2+6+1=-11+6+1=-5+1=-4\\boxed{-4}"
    assert credit.gold_answer(q) == "-4" and credit.deciding_value(q) == -13 and credit.has_negative_step(q)
    # the error: |a - b*c| at the deciding step, every later step correct arithmetic on the wrong value
    assert credit.wrong_states(q) == ["7-20+2+6+1", "13+2+6+1", "15+6+1", "21+1", "22"]
    assert credit.signdrop_answer(q) == "22"
    sol, ok = credit.teacher_solution(q, random.Random(0), sign_error_rate=1.0)
    assert sol == "7-20+2+6+1=13+2+6+1=15+6+1=21+1=22\\boxed{22}" and not ok
    assert credit.teacher_solution(q, random.Random(0), sign_error_rate=0.0) == (credit.reference_solution(q), True)
    # not the sub-type: the teacher is always right
    assert credit.teacher_solution("29-3*4+2+7+6", random.Random(0), 1.0) == (credit.reference_solution("29-3*4+2+7+6"), True)
    with pytest.raises(ValueError, match="a-b\\*c\\+d"):
        credit.deciding_value("1+2*3+4")


def test_deciding_span():
    r = credit.reference_solution("7-4*5+2+6+1")
    a, b = credit.deciding_span(r)
    assert r[a:b] == "-13"
    w = "7-20+2+6+1=13+2+6+1=15"
    a, b = credit.deciding_span(w)
    assert w[a:b] == "13"
    assert credit.deciding_span("7-20+2") is None and credit.deciding_span("7-20=+2") is None


def test_problems_are_split_and_deterministic():
    train = credit.make_problems(200, 0, "train")
    held = credit.make_problems(100, 0, "heldout")
    assert train == credit.make_problems(200, 0, "train") and len(set(train)) == 200
    assert not set(train) & set(held) and all(arith.is_held_out(p) for p in held)
    assert all(credit.parse(p)[1] == ["-", "*", "+", "+", "+"] for p in train)
    share = sum(map(credit.has_negative_step, train)) / len(train)
    assert 0.35 < share < 0.65  # about half the problems are the sub-type (a_max = 30)


def test_rm_share_by_hand(tmp_path):
    import credit_rm_share as crs

    q = "7-4*5+2+6+1"
    wrong = "7-20+2+6+1=13+2+6+1=15+6+1=21+1=22\\boxed{22}"
    right = credit.reference_solution(q)
    toks = list(wrong) + ["<|im_end|>"]
    w = [0.0] * len(toks)
    w[11], w[12], w[13] = 0.5, 0.5, 1.0  # "13" are tokens 11-12; the token after them gets 1.0
    w[-1] = 0.5
    page = tmp_path / "html" / "step_000003.json"
    page.parent.mkdir()
    page.write_text(json.dumps([
        {"prompt": q, "gold": "-4", "tokens": toks, "weights": w, "is_positive": False},
        {"prompt": q, "gold": "-4", "tokens": list(right), "weights": [1.0] * len(right), "is_positive": True},
        # lost later (deciding value right): not counted
        {"prompt": q, "gold": "-4", "tokens": list("7-20+2+6+1=-13+2+6+1=-10"), "weights": [1.0] * 24, "is_positive": False},
    ]))
    rows = crs.decisive_negatives([page])
    assert [(a, b) for _, a, b in rows] == [(11, 13)]
    s = crs.shares(rows)
    assert s["omega_share"] == pytest.approx(1.0 / 2.5) and s["token_share"] == pytest.approx(2 / len(toks))
    assert s["mean_omega_on"] == pytest.approx(0.5) and s["mean_omega_before"] == 0.0
    assert crs.shares(rows, extra=1)["omega_share"] == pytest.approx(2.0 / 2.5)


def test_ablation_aggregates_seeds_by_hand():
    import ablation

    def run(p0, p6, p12, wall):
        return {"eval_history": [{"step": 0, "pass1": p0}, {"step": 6, "pass1": p6}, {"step": 12, "pass1": p12}],
                "eval_pass1_initial": p0, "eval_pass1_final": p12, "wall_seconds": wall}

    agg = ablation.aggregate({0: run(0.4, 0.5, 0.6, 10), 2: run(0.4, 0.3, 0.4, 20), 1: run(0.4, 0.4, 0.5, 30)})
    assert agg["seeds"] == [0, 1, 2] and agg["eval_pass1_final_per_seed"] == [0.6, 0.5, 0.4]
    assert agg["eval_pass1_final"] == pytest.approx(0.5) and agg["eval_pass1_final_std"] == pytest.approx(0.1)
    assert agg["eval_history"][1] == pytest.approx({"step": 6, "pass1": 0.4, "pass1_min": 0.3, "pass1_max": 0.5})
    assert agg["wall_seconds"] == 60
    assert "| oreal | 3 | 40.0 | 50.0 ± 10.0 | 60.0, 50.0, 40.0 | 60 |" in ablation.table({"oreal": agg})
    with pytest.raises(ValueError, match="seed 1 evaluated at different steps"):
        ablation.aggregate({0: run(0.4, 0.5, 0.6, 1), 1: {**run(0.4, 0.5, 0.6, 1), "eval_history": []}})
