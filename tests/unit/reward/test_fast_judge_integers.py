"""judge.fast_judge's integer shortcut gives the verdict the full comparison (judge) gives."""

import pytest

from megatron_oreal.reward.judge import fast_judge, judge

INTEGERS = ["0", "00", "7", "007", "-7", "-0", "12", "120", "-12", "10" * 20, "10" * 20 + "1"]


@pytest.mark.parametrize("answer", INTEGERS)
def test_integer_pairs_agree_with_the_full_judge(answer):
    for gold in INTEGERS:
        solution = f"3+4=7\\boxed{{{answer}}}"
        assert fast_judge(solution, gold, None, "stop") == judge(solution, gold, None, "stop"), (answer, gold)


def test_integer_shortcut_verdicts():
    assert fast_judge("\\boxed{007}", "7") == "correct"
    assert fast_judge("\\boxed{-0}", "0") == "correct"
    assert fast_judge("\\boxed{12}", "120") == "wrong"
    assert fast_judge("\\boxed{12}", "12.0") == "correct"  # not two integers: the normalising path
