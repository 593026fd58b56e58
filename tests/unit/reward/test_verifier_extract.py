"""Answer extraction (docs/algorithm.md §5.1 steps 1-3)."""

import time

import pytest

from megatron_oreal.reward import extract_answer
from megatron_oreal.reward.extract import extract_answers, is_truncated, strip_reasoning


@pytest.mark.parametrize("text,answer", [
    (r"so \boxed{5}.", "5"),
    (r"\boxed{\frac{1}{2}} then \boxed{\frac{3}{4}}", r"\frac{3}{4}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{{a}+{b}}", "{a}+{b}"),
    (r"\boxed 5", "5"),
    (r"the result is \boxed 12 apples", "12"),
    (r"\fbox{7}", "7"),
    (r"\boxed{\boxed{9}}", "9"),
    ("The answer is 42.", "42"),
    ("The final answer is $28 \\%$. I hope it is correct.", "28 \\%"),
    ("Final answer: x = 3", "x = 3"),
    ("lots of words 3 and 4\nso 17 in the end\nok", "17"),
    ("<think>\\boxed{1}</think>\\boxed{2}", "2"),
    ("a\n**Final Answer**\n\\boxed{3}", "3"),
    ("a <conclude> \\boxed{4}", "4"),
    ("x = 7", "x = 7"),
])
def test_extract(text, answer):
    assert extract_answer(text) == answer


def test_no_answer():
    assert extract_answer("") is None
    assert extract_answer("\\boxed{") is None or extract_answer("\\boxed{") == "\\boxed{"


def test_markers_apply_in_order():
    text = "r1 </think> r2 **Final Answer** r3 <conclude> tail"
    assert strip_reasoning(text) == "tail"
    assert strip_reasoning("x </think> \\boxed{1}<|im_end|>", "<|im_end|>") == "\\boxed{1}"


def test_truncation():
    assert is_truncated("\\boxed{1}", "<|im_end|>")
    assert not is_truncated("\\boxed{1}<|im_end|>  \n", "<|im_end|>")


def test_hedge_lists_distinct_boxes():
    assert extract_answers(r"\boxed{2} or \boxed{3}") == ["2", "3"]
    assert extract_answers(r"\boxed{2}, i.e. \boxed{ 2 }") == ["2"]
    # only the final paragraph counts as the final answer
    assert extract_answers("first \\boxed{1}\n\nfinally \\boxed{2}") == ["2"]


def test_extraction_is_linear():
    text = "\\boxed{" * 20_000 + "x" * 100_000
    start = time.monotonic()
    extract_answer(text)
    assert time.monotonic() - start < 1.0
