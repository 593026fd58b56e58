"""The slow path: LaTeX -> sympy (our `latex_parser`, else latex2sympy2_extended), then comparison.

Security: model text never reaches eval/exec/sympify/parse_expr. latex2sympy2_extended builds the
expression from the ANTLR parse tree node by node; its only string-to-sympy calls are
`sympy.Number(text)` on NUMBER tokens (the lexer admits only digits, `,` and `.`) and `parse_expr`
on `variable_values`, which we never pass. `guard()` also rejects `__`, quotes and backticks as
defence in depth.

Cost: `guard()` rejects what would make sympy hang (exponent towers, big factorials, huge literals,
deep nesting); the pool's kill-based timeout is the backstop for anything it misses.
"""

from __future__ import annotations

import functools
import math
import random
import re

import sympy
from latex2sympy2_extended import latex2sympy
from latex2sympy2_extended.latex2sympy2 import ConversionConfig

from megatron_oreal.reward.latex_parser import ParseError, parse_latex
from megatron_oreal.reward.normalize import MAX_ANSWER_CHARS, MAX_DIGITS

_CONVERSION = ConversionConfig(lowercase_symbols=False)
_MAX_DEPTH = 20
_MAX_POWERS = 6
_MAX_EXPONENT = 10_000
_MAX_FACTORIAL = 1_000
_DECIMAL_RE = re.compile(r"(?<![\d.])(\d+)\.(\d+)")
_EXPONENT_RE = re.compile(r"\^\s*\{?\s*-?\s*(\d+)")
_FACTORIAL_ARG_RE = re.compile(r"(\d+|[)}\]])\s*!")
# a number raised to a power of a number: 9^9^9, 9^{9}^9, 10^{10^{10}} (e^{x^2} is fine)
_TOWER_RE = re.compile(r"\^\s*\{?\s*\d+\s*\}?\s*\^|\^\s*\{\s*\d+\s*\^")
_I = sympy.Symbol("i")


def guard(s: str) -> bool:
    """True when `s` is small and tame enough to hand to the parser and sympy."""
    if len(s) > MAX_ANSWER_CHARS or "__" in s or any(c in s for c in "\"`;@"):
        return False
    if s.count(":") > 8 or s.count("=") > 8:
        return False  # ratio or relation chains that long are no answer; each costs a parse
    depth = peak = 0
    for ch in s:
        depth += (ch in "{([") - (ch in "})]")
        peak = max(peak, depth)
    if peak > _MAX_DEPTH or s.count("^") > _MAX_POWERS or _TOWER_RE.search(s):
        return False
    if any(len(run) > MAX_DIGITS for run in re.findall(r"\d+", s)):
        return False
    exponents = [int(e) for e in _EXPONENT_RE.findall(s)]
    if any(e > _MAX_EXPONENT for e in exponents):
        return False
    if len(exponents) > 1 and math.prod(exponents) > _MAX_EXPONENT**2 // 100:
        return False  # (10^{400})^{10000}: each exponent small, the nested power 4M digits
    if re.search(r"!\s*!", s):
        return False  # 9!!!!!!: iterated factorials explode after two steps
    for arg in _FACTORIAL_ARG_RE.findall(s):
        if not arg.isdigit() or int(arg) > _MAX_FACTORIAL:
            return False
    # Gamma/binomial of big or computed arguments evaluate eagerly: allow only small literals
    return not re.search(r"\\(?:Gamma|gamma|binom|choose|dbinom|tbinom)\b.*(?:\d{4}|\^)", s)


def _exact_decimals(s: str) -> str:
    """`0.125` -> `\\frac{125}{1000}`: sympy Floats would lose the exactness we promise."""
    s = re.sub(r"\^\s*(\d+\.\d+)", r"^{\1}", s)  # `2^0.5`: the exponent must stay one group
    return _DECIMAL_RE.sub(lambda m: f"\\frac{{{m.group(1)}{m.group(2)}}}{{1{'0' * len(m.group(2))}}}", s)


@functools.lru_cache(maxsize=512)
def to_sympy(s: str):
    """Parse one LaTeX answer into sympy, or None (unparseable or refused by `guard`).

    Cached: a case compares the same text more than once (written form, then stated value), and
    the ANTLR fallback costs tens of milliseconds a parse. sympy objects are immutable.
    """
    if not guard(s):
        return None
    try:
        expr = parse_latex(s)  # our fast subset parser first
    except (ParseError, ValueError, TypeError, ArithmeticError, RecursionError):
        try:
            expr = latex2sympy(_exact_decimals(s), normalization_config=None, conversion_config=_CONVERSION)
        except Exception:  # the ANTLR parser raises bare Exception on syntax errors
            return None
    if isinstance(expr, sympy.Basic) and _I in expr.free_symbols:
        expr = expr.subs(_I, sympy.I)  # `3+4i`: the parser leaves i as a symbol
    return expr


def _close(a, b, decimals: int | None) -> bool:
    """Numeric closeness of two constant expressions, at 40 significant digits."""
    if a.has(sympy.oo, -sympy.oo, sympy.zoo) or b.has(sympy.oo, -sympy.oo, sympy.zoo):
        return bool(a == b)  # oo - (-oo) is oo, and oo <= tol*oo would say "close"
    va, vb = sympy.N(a, 40), sympy.N(b, 40)
    if not (va.is_number and vb.is_number) or va.has(sympy.zoo, sympy.nan) or vb.has(sympy.zoo, sympy.nan):
        return False
    if decimals is not None and va.is_real and vb.is_real:
        # gold written as a rounded decimal: accept anything that rounds to it (module docstring of
        # equivalence.py has the policy)
        return abs(va - vb) <= sympy.Rational(1, 2) * sympy.Rational(1, 10**decimals) * (1 + sympy.Rational(1, 10**12))
    diff = abs(sympy.N(a - b, 40))
    return bool(diff <= sympy.Float("1e-30", 40) * max(1, abs(vb)))


def expr_equal(a, b, decimals: int | None = None) -> bool:
    """Value equality of two sympy expressions (no relations, sets or matrices)."""
    try:
        if any(x.has(sympy.zoo, sympy.nan) for x in (a, b)):
            return False  # `1:0` or 1/0 is no value; zoo == zoo must not make two answers equal
        diff = a - b
        if diff == 0:
            return True
        free = diff.free_symbols
        if not free:
            if diff.is_Rational and decimals is None:
                return False  # exact and nonzero: 10^-20 vs 10^-21 ends here
            return _close(a, b, decimals)
        # Seeded random points first: they refute a wrong answer in milliseconds and almost never
        # agree by accident; `simplify` (seconds, sometimes minutes) only where no point evaluates.
        verdict = _random_points_equal(a, b, sorted(free, key=str))
        if verdict is not None:
            return verdict
        return sympy.simplify(diff) == 0
    except Exception:
        return False


def _random_points_equal(a, b, symbols) -> bool | None:
    """Identity check at a few seeded random points, negatives included (so sqrt(x^2) != |x|).

    Points are 30-digit Floats, not Rationals: exact powers like x^(y^z) at rational points could
    blow up, floating evaluation cannot. None when fewer than 3 points evaluate to finite numbers.
    """
    rng = random.Random(1234)
    tried = 0
    for _ in range(8):
        point = {s: sympy.Float(rng.choice((-1, 1)) * rng.uniform(0.2, 3.0), 30) for s in symbols}
        va, vb = sympy.N(a.subs(point), 30), sympy.N(b.subs(point), 30)
        if not (va.is_number and vb.is_number) or va.has(sympy.zoo, sympy.nan, sympy.oo) or vb.has(sympy.zoo, sympy.nan, sympy.oo):
            continue
        if abs(va - vb) > sympy.Float("1e-15", 30) * (1 + abs(va) + abs(vb)):
            return False
        tried += 1
    return True if tried >= 3 else None


def relation_sides(expr):
    """(lhs, rhs) of an equation, else None."""
    if isinstance(expr, sympy.Equality):
        return expr.lhs, expr.rhs
    return None


def equations_equal(a, b) -> bool:
    """`y = 2x + 1` vs `2x - y + 1 = 0`: the two sides' differences are proportional.

    Proportionality is checked at seeded random points (the ratio must be one finite nonzero
    constant), not with `simplify`, which costs seconds per equation.
    """
    (la, ra), (lb, rb) = relation_sides(a), relation_sides(b)
    da, db = la - ra, lb - rb
    symbols = sorted(da.free_symbols | db.free_symbols, key=str)
    if not symbols:
        return bool(da == db)
    rng = random.Random(4321)
    ratios = []
    for _ in range(8):
        point = {s: sympy.Float(rng.choice((-1, 1)) * rng.uniform(0.2, 3.0), 30) for s in symbols}
        va, vb = sympy.N(da.subs(point), 30), sympy.N(db.subs(point), 30)
        if not (va.is_number and vb.is_number) or vb == 0 or va.has(sympy.zoo, sympy.nan) or vb.has(sympy.zoo, sympy.nan):
            continue
        ratios.append(va / vb)
    if len(ratios) < 3 or abs(ratios[0]) < sympy.Float("1e-12", 30):
        return False
    return all(abs(r - ratios[0]) <= sympy.Float("1e-15", 30) * (1 + abs(ratios[0])) for r in ratios)


# `\sum_{k=0}^{n-1}`: a sum or product whose bounds hold a letter.
_SYMBOLIC_SUM_RE = re.compile(r"\\(?:sum|prod)\s*_\s*\{[^{}]*\}\s*\^\s*(?:\{[^{}]*[A-Za-z][^{}]*\}|[A-Za-z])")


def _sum_key(s: str) -> tuple:
    """Text key for answers holding a symbolic sum: per `=` side, its space-separated factors sorted.

    The ANTLR fallback needs seconds (tens under load) per such parse and sympy cannot decide
    equality of symbolic sums in general; so they are compared as written, up to the order of
    the factors of each side (`F_k F_{n-k-1}` = `F_{n-k-1} F_k`) and spacing.
    """
    sides = []
    for side in s.split("="):
        head = _SYMBOLIC_SUM_RE.search(side)
        start = head.end() if head else 0
        factors = sorted(side[start:].split())
        sides.append((re.sub(r"\s+", "", side[:start]), tuple(factors)))
    return tuple(sides)


def _symbolic_sum(expr) -> bool:
    try:
        return any(x.free_symbols for x in expr.atoms(sympy.Sum, sympy.Product))
    except Exception:
        return False


def sympy_equal(pred: str, gold: str, decimals: int | None = None) -> bool:
    """Parse both answers and compare; equations and `x = value` are handled here."""
    if _SYMBOLIC_SUM_RE.search(pred) or _SYMBOLIC_SUM_RE.search(gold):
        return _sum_key(pred) == _sum_key(gold)
    a, b = to_sympy(pred), to_sympy(gold)
    if a is None or b is None:
        return False
    try:
        if _symbolic_sum(a) or _symbolic_sum(b):
            # a sum/product with symbolic limits (`\sum_{k=0}^{n-1} F_k F_{n-k-1}`): evaluating or
            # simplifying it can take minutes; compare the canonical trees (term order is canonical;
            # printed, since the two parses may give same-named symbols different assumptions)
            return a == b or str(a) == str(b)
        ea, eb = relation_sides(a), relation_sides(b)
        if ea and eb:
            return equations_equal(a, b)
        if ea and isinstance(ea[0], sympy.Symbol):  # `x = 5` against gold `5`
            a = ea[1]
        if eb and isinstance(eb[0], sympy.Symbol):  # gold `k = 5`, prediction `5`
            b = eb[1]
        if isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr):
            return expr_equal(a, b, decimals)
        if isinstance(a, sympy.Set) and isinstance(b, sympy.Set):
            return bool(a == b or a.symmetric_difference(b).is_empty)
        if isinstance(a, sympy.MatrixBase) and isinstance(b, sympy.MatrixBase):
            return a.shape == b.shape and all(expr_equal(x, y) for x, y in zip(a, b))
        return bool(a == b)
    except Exception:
        return False



def relations_equal(pred: str, gold: str) -> bool:
    """One-variable inequalities (or one against an interval set) compared as solution sets."""
    a, b = to_sympy(pred), to_sympy(gold)
    try:
        sets = []
        for e in (a, b):
            if isinstance(e, sympy.Set):
                sets.append(e)
            elif isinstance(e, (sympy.core.relational.Relational, sympy.And, sympy.Or)) and len(e.free_symbols) == 1:
                sets.append(e.as_set())
            else:
                return False
        return bool(sets[0] == sets[1] or sets[0].symmetric_difference(sets[1]).is_empty)
    except Exception:
        return False
