"""One hand-written case (or a few) per answer kind the external sets showed we missed (issue 12).

Each row: (solution, gold, expected). Positives and the nearest negatives side by side, so a rule
that accepts everything fails here.
"""

import pytest

from megatron_oreal.reward import verify
from megatron_oreal.reward.judge import judge
from megatron_oreal.reward.names import is_name, value_of

NAMED = [
    (r"\boxed{1}", "f(x)=1", True),
    (r"\boxed{2}", "f(x)=1", False),
    (r"\boxed{1}", "|AB|=1", True),
    (r"\boxed{\frac{1}{\sqrt{6}}}", r"\frac{NO}{BO}=\frac{1}{\sqrt{6}}", True),
    (r"\boxed{\frac{1}{\sqrt{5}}}", r"\frac{NO}{BO}=\frac{1}{\sqrt{6}}", False),
    (r"\boxed{(3, 2)}", "(p,q)=(3,2)", True),
    (r"\boxed{(2, 3)}", "(p,q)=(3,2)", False),
    (r"\boxed{(5,2),(7,2)}", "p=5,q=2;p=7,q=2", True),
    (r"\boxed{(5,2),(7,3)}", "p=5,q=2;p=7,q=2", False),
    (r"\boxed{4, 5}", "AB=4,CD=5", True),
    (r"\boxed{f(x) = 3}", "3", True),
    (r"\boxed{a=3}", "b=3", False),  # both name what they state, and the names differ
    (r"\boxed{y = 3 + 2x}", "y=2x+3", True),
    (r"\boxed{y = 3 + 2x}", "y=2x-3", False),
]

CHAINS_AND_RELATIONS = [
    (r"$x = 5+5+1 = 11$", "x = 11", True),
    (r"$x = 5+5+1 = 12$", "x = 11", False),
    (r"\boxed{(0,1)}", "0<f(x)<1", True),
    (r"\boxed{(0,1]}", "0<f(x)<1", False),
    (r"\boxed{(-793, 10)}", "-793 < a < 10", True),
    (r"\boxed{x < 1}", "-x > -1", True),
    (r"\boxed{x \neq 3}", "x != 3", True),
    (r"\boxed{x \lt 3}", "x < 3", True),
]

SETS_AND_LISTS = [
    (r"\boxed{21, 16, 11}", "21,16 or 11", True),
    (r"\boxed{21, 16, 12}", "21,16 or 11", False),
    (r"\boxed{(7,11),\ (11,7)}", "(11,7)or(7,11)", True),
    (r"\boxed{\{2, 3, 5\}}", "{2,3,5}", True),
    (r"\boxed{(5, 8) \quad \text{and} \quad (8, 5)}", "(5, 8), (8, 5)", True),
    (r"\boxed{1 \text{ and } 2}", "1, 2", True),
    (r"\boxed{1 \text{ and } 3}", "1, 2", False),
    (r"\boxed{2\begin{pmatrix}1 & 2 \\ 3 & 4\end{pmatrix}}", r"\begin{pmatrix}2 & 4 \\ 6 & 8\end{pmatrix}", True),
    (r"\boxed{2\begin{pmatrix}1 & 2 \\ 3 & 4\end{pmatrix}}", r"\begin{pmatrix}2 & 4 \\ 6 & 9\end{pmatrix}", False),
    (r"\boxed{7:32}", "S_{MBCN}:S=7:32", True),
    (r"\boxed{7:31}", "S_{MBCN}:S=7:32", False),
    (r"\boxed{11:21}", "V_{1}:V_{2}=11:21", True),
    (r"$\frac3{3}$", "1", True),
]

MULTI_BOX = [
    (r"The roots are $\boxed{1}$ and $\boxed{2}$.", "1, 2", True),
    (r"The roots are $\boxed{1}$ and $\boxed{3}$.", "1, 2", False),
    (r"\boxed{1,2}", r"\boxed{1} papers and \boxed{2} bins", True),
    (r"\boxed{-2,1}", r"\(\boxed{1}\) and \(\boxed{-2}\).", True),
    (r"First \boxed{3}. Wait, that is wrong: \boxed{5}", "5", True),  # a later box corrects
    (r"First \boxed{3}. Wait, that is wrong: \boxed{5}", "3", False),
]

PHRASES_AND_UNITS = [
    (r"Answer \[ 9 \]", "9", True),
    (r"Answer \( 9 \)", "9", True),
    (r"Answer \( 8 \)", "9", False),
    ("Therefore $x \\geq 5$ is the solution.", "x >= 5", True),
    ("Final Answer: The largest $n$ is 34.", "34", True),
    (r"\boxed{0.06 \text{ yuan}}", "0.06", True),
    (r"\boxed{0.07 \text{ yuan}}", "0.06", False),
    (r"\boxed{28 pct}", r"28\%", True),
    (r"\boxed{\textbf{(113) }}", "113", True),
    ("So 9 + 6 = <<9+6=15>>15 liters, and $400 + $60 = $460 in all.", "460", True),
]

CLOCKS = [
    (r"\boxed{1:00}", "12:00", False),
    (r"\boxed{12:00}", "12:00", True),
    (r"\boxed{3:15}", "3:15", True),
    (r"\boxed{3:15}", "3:16", False),
]


@pytest.mark.parametrize("solution,gold,expected", NAMED + CHAINS_AND_RELATIONS + SETS_AND_LISTS + MULTI_BOX + PHRASES_AND_UNITS + CLOCKS)
def test_kind(solution, gold, expected):
    assert verify(solution, gold) is expected


def test_value_of_and_names():
    assert value_of("p=5,q=2;p=7,q=2") == "(5, 2), (7, 2)"
    assert value_of("x = 5+5+1 = 11") == "11"
    assert value_of("2x+3=7") == "2x+3=7"  # not a name on the left: an equation, left alone
    assert value_of("x \\le 3") == "x \\le 3"
    assert is_name("|AB|") and is_name(r"\frac{NO}{BO}") and is_name("S_{1}:S_{2}") and is_name("(p,q)")
    assert not is_name("2x") and not is_name("x+1")


def test_hedging_rule_default_and_strict():
    hedge = r"It is \boxed{3} or \boxed{5}."
    assert judge(hedge, "5") == "correct"  # the paper's judge: the last box only
    assert judge(hedge, "5", strict_hedging=True) == "wrong"
    assert judge(r"\boxed{5} so \boxed{5}", "5", strict_hedging=True) == "correct"  # repeating is no hedge


@pytest.mark.parametrize("solution,expected", [
    (r"$F_n = \sum_{k=0}^{n-1} F_{n-k-1} F_k$", True),  # factors in another order
    (r"$F_n = \sum_{k=0}^{n-2} F_k F_{n-k-2}$", False),
    (r"$F_n = \sum_{k=1}^{n-1} F_k F_{n-k-1}$", False),
])
def test_symbolic_sums_compare_without_parsing(solution, expected):
    # the ANTLR parse of these took seconds each (a worker timeout under load); now text keys
    assert verify(solution, r"$F_n = \sum_{k=0}^{n-1} F_k F_{n-k-1}$") is expected


@pytest.mark.parametrize("solution,gold,expected", [
    (r"\boxed{(3,17,3,7), (17,3,3,7), (3,17,3,7)}", "(17,3,3,7),(3,17,3,7)", True),  # a repeat in a set
    (r"\boxed{(3,17,3,7), (17,3,3,7), (3,17,3,8)}", "(17,3,3,7),(3,17,3,7)", False),
    (r"\boxed{(0, -2, 6), (4, 0, 0)}", "(4;0;0),(0;-2;6)", True),  # semicolons inside tuples
    (r"\boxed{(0, -2, 6), (4, 0, 1)}", "(4;0;0),(0;-2;6)", False),
])
def test_solution_sets(solution, gold, expected):
    assert verify(solution, gold) is expected
