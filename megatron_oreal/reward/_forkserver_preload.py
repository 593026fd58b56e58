"""Imported once by the verifier's forkserver (pool._PRELOAD): importing it warms the judge.

The first symbolic case in a fresh process pays for lazy sympy imports and the ANTLR parser's
tables (seconds). Paying that once here means every worker forked from the server, including
the ones that replace killed workers, starts warm instead of timing out on its first case.
"""

from megatron_oreal.reward.judge import judge

_WARM_CASES = [
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2"),
    (r"\boxed{y=2x+1}", "2x-y+1=0"),
    (r"\boxed{\pi}", "3.14"),
    (r"\boxed{(1,2)\cup(3,4)}", r"(1,2)\cup(3,4)"),
    (r"\boxed{\{1,2\}}", r"\{2, 1\}"),
    (r"\boxed{\operatorname{sgn}(x)}", "1"),  # forces the latex2sympy2 fallback once
    (r"\boxed{\begin{pmatrix}1 & 2 \\ 3 & 4\end{pmatrix}}", r"\begin{pmatrix}1 & 2 \\ 3 & 5\end{pmatrix}"),
    (r"\boxed{|x| \ge 3}", r"(-\infty,-3]\cup[3,\infty)"),
]

for _solution, _gold in _WARM_CASES:
    try:
        judge(_solution, _gold)
    except Exception:  # warming is best effort; a failure here only costs speed
        pass
