"""Is a predicted answer the same as the gold one? Structure first, then scalars.

Policy (the choices a grader has to make, written down once):
- Numbers are exact `Fraction`s: 10000 != 10001, 28 != 2800, 10^-20 != 10^-21. No ref*100 / ref/100
  guessing (Qwen's grader does that); a `%` on either side is the only scaling: 25% == 25 == 0.25.
- Tolerance only where the gold writes a rounded decimal: gold with d fraction digits accepts a
  prediction that rounds to it (|pred - gold| <= 0.5*10^-d) provided the prediction is more precise
  (more digits, or an exact form such as 1/3, \\pi, \\sqrt 2). Gold 3.14 takes 3.1416 and \\pi but not
  3.1 or 3.15; gold 0.33 takes 1/3. Conversely an exact gold (1/12, 8/3) takes a decimal of at least
  4 fraction digits that is it correctly rounded (0.0833, 2.6667), never a shorter one (0.083, 2.67).
- `(a, b)` is a tuple or an open interval: either way compared in order with matching brackets.
  `\\{...\\}` and bare comma lists (`1, 2`) are unordered; `\\cup` unions are unordered.
- A single-row or single-column matrix equals the tuple of its entries.
- `x = 5` equals `5`, and so does any answer that names what it states (`f(x)=5`, `|AB|=5`,
  `(p,q)=(3,2)`, `S_1:S_2=7:32`, `AB=4, CD=5`, `p=5,q=2; p=7,q=2`; see names.py), unless both sides
  name different things (`a=3` vs `b=3`); a chain `x = 5+5+1 = 11` states its last value. Two
  equations are equal when their sides' differences are proportional. Inequalities in one
  variable (also `0 < f(x) < 1`) become intervals, compared with a bare interval `(0, 1)`.
- Clock times (`1:00`, `12:30 pm`) are compared as times: `1:00` != `12:00`.
- A scalar times a matrix is the matrix of products. A set or list may repeat an entry.
- Base-n gold (`1011_2`) wants the same digits (subscript optional) or the same value in another
  written base; a decimal value alone is wrong (it is usually the question's number).
- A gold letter A-E (or `(A)`) is a multiple-choice answer: only the predicted letter counts.
- Prose gold (words, no maths) is compared case- and punctuation-insensitively.
- Presentation is dropped before comparing: `$`, `\\left`, spacing, `\\text{..}` wrappers, a
  trailing unit word (`cm`, `\\text{ miles}`, `dollars`), `\\$`, the degree sign. Degrees are not
  converted to radians (90^\\circ != \\pi/2). `a \\pm b` is the list `a + b, a - b`.
- A bare list `1, 2` may stand for the tuple `(1, 2)` (in order); `(1, 2)` and `[1, 2]` differ.
"""

from __future__ import annotations

import contextvars
import re
from fractions import Fraction

from megatron_oreal.reward.normalize import (
    MAX_ANSWER_CHARS,
    Num,
    clean,
    compact,
    parse_base,
    parse_choice,
    parse_number,
    plain_text,
    strip_text,
)

_OPEN = "([{"
_CLOSE = ")]}"
_MATRIX_RE = re.compile(r"^\\begin\{([pbvBV]?matrix|array)\}(?:\{[^}]*\})?(.*)\\end\{\1\}$", re.S)
_RELATION_RE = re.compile(r"\\leq?\b|\\geq?\b|\\lt\b|\\gt\b|<=|>=|≤|≥|<|>")
_OR_RE = re.compile(r"\\text\{\s*(?:or|and)\s*\}|\s(?:or|and)\s|(?<=[)\]}])\s*(?:or|and)\s*(?=[(\[{])|\\(?:quad|qquad)|;")
_MAX_RELATIONS = 8
# Text-only mode (the parent's fast path): set while `text_only_equal` runs.
_TEXT_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("text_only", default=False)
_TEXT_ONLY_MAX_ITEMS = 64


class NeedsSympy(Exception):
    """Raised in text-only mode where the comparison would go on to sympy."""


def _symbolic_allowed() -> None:
    if _TEXT_ONLY.get():
        raise NeedsSympy


def text_only_equal(pred: str, gold: str) -> bool:
    """`answers_equal` without sympy: raises NeedsSympy where sympy would be asked.

    Same code path as `answers_equal`, so a True/False here is the answer the full comparison
    gives. What runs is text work on inputs of at most MAX_ANSWER_CHARS, `Fraction` arithmetic
    bounded by normalize.MAX_DIGITS/MAX_EXPONENT, and pairings of at most _TEXT_ONLY_MAX_ITEMS
    items: bounded, so it may run in the parent process (the pool's fast path).
    """
    token = _TEXT_ONLY.set(True)
    try:
        return answers_equal(pred, gold)
    finally:
        _TEXT_ONLY.reset(token)
# A decimal prediction with at least this many fraction digits may be an exact gold rounded.
_MIN_ROUNDED_DECIMALS = 4
# Clock times `1:00`, `12:30 pm`: compared as times, never as ratios or numbers.
_CLOCK_RE = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?\s*(?:\\text\{\s*)?([ap])?\.?\s*(?:m\.?)?\s*\}?$", re.I)
# `2\begin{pmatrix}..`, `\frac12 \cdot \begin{bmatrix}..`: a scalar times a matrix.
_SCALED_MATRIX_RE = re.compile(r"^(-?(?:\d+(?:\.\d+)?|\\frac\{\d+\}\{\d+\}))\s*(?:\\cdot|\\times|\*)?\s*(\\begin\{.*)$", re.S)
_VAR = r"[a-zA-Z](?:_\{?\w+\}?)?(?:\([a-zA-Z]\))?"  # x, x_1, f(x) (not |x|)


def split_top(s: str, sep: str) -> list[str]:
    """Split on `sep` outside (), [], {} (and `\\{ \\}`); unbalanced input is split as far as seen."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        ch = s[i]
        if ch == "\\" and i + 1 < len(s) and s[i + 1] in "{}":  # `\{ \}` group like braces
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _wrapped(s: str, left: str, right: str) -> bool:
    """True when s is left ... right with the outer pair matching each other (not `(1)+(2)`)."""
    if not (s.startswith(left) and s.endswith(right)) or len(s) < len(left) + len(right):
        return False
    inner = s[len(left) : len(s) - len(right)]
    depth = 0
    for ch in inner:
        depth += (ch in _OPEN) - (ch in _CLOSE)
        if depth < 0:
            return False
    return depth == 0


def _matrix(s: str) -> list[list[str]] | None:
    if s[:1] in "([" and s[-1:] in ")]" and "\\begin" in s[:10]:
        s = s[1:-1].strip()  # `\left[\begin{array}{cc}..\end{array}\right]`
    m = _MATRIX_RE.match(s)
    if not m:
        return None
    rows = [r for r in (row.strip() for row in m.group(2).split("\\\\")) if r]
    return [split_top(row, "&") for row in rows]


def _interval(s: str) -> tuple[str, str, str, str] | None:
    """(open bracket, lo, hi, close bracket) for `[a, b)`-like text."""
    if len(s) < 5 or s[0] not in "([" or s[-1] not in ")]":
        return None
    parts = split_top(s[1:-1], ",")
    if len(parts) != 2 or not all(parts):
        return None
    return s[0], parts[0], parts[1], s[-1]


def _inequality_intervals(s: str) -> list[tuple[str, str, str, str]] | None:
    """`x > 3`, `-1 \\le x < 2`, `x<0 or x>1` -> intervals; None if not a one-variable inequality."""
    out = []
    for piece in _OR_RE.split(s):
        piece = piece.strip()
        ops = _RELATION_RE.findall(piece)
        sides = [p.strip() for p in _RELATION_RE.split(piece)]
        if not ops or len(sides) > 3 or not all(sides):
            return None
        less = [op in ("<", "<=", "≤") or op.startswith(("\\le", "\\lt")) for op in ops]
        strict = [op in ("<", ">", "\\lt", "\\gt") for op in ops]
        if len(sides) == 2:
            var_left = re.fullmatch(_VAR, sides[0]) is not None
            if not var_left and not re.fullmatch(_VAR, sides[1]):
                return None
            bound, up = (sides[1], less[0]) if var_left else (sides[0], not less[0])
            if up:
                out.append(("(", "-\\infty", bound, ")" if strict[0] else "]"))
            else:
                out.append(("(" if strict[0] else "[", bound, "\\infty", ")"))
        else:
            if not re.fullmatch(_VAR, sides[1]) or less[0] != less[1]:
                return None
            lo, hi, s_lo, s_hi = sides[0], sides[2], strict[0], strict[1]
            if not less[0]:
                lo, hi, s_lo, s_hi = hi, lo, s_hi, s_lo
            out.append(("(" if s_lo else "[", lo, hi, ")" if s_hi else "]"))
    return out


def _intervals(s: str) -> list[tuple[str, str, str, str]] | None:
    parts = split_top(s, "\\cup")
    got = [_interval(p) for p in parts]
    if all(got) and (len(parts) > 1 or "\\infty" in s or s[0] != "(" or s[-1] != ")"):
        return got  # a lone `(a, b)` is left to the tuple path; same comparison anyway
    return _inequality_intervals(s) if _RELATION_RE.search(s) else None


def _unordered(pred: list[str], gold: list[str], eq) -> bool:
    """Multiset match by greedy pairing (answers are short lists, so O(n^2) is fine)."""
    if len(pred) != len(gold):
        return False
    if _TEXT_ONLY.get() and len(gold) > _TEXT_ONLY_MAX_ITEMS:
        raise NeedsSympy  # keeps the parent's pairing work small; a worker may take its time
    left = list(pred)
    for g in gold:
        hit = next((i for i, p in enumerate(left) if eq(p, g)), None)
        if hit is None:
            return False
        left.pop(hit)
    return True


def _dedup(items: list[str]) -> list[str]:
    seen: dict[str, str] = {}
    for item in items:
        seen.setdefault(compact(clean(item)), item)
    return list(seen.values())


def _ordered(pred: list, gold: list, eq) -> bool:
    return len(pred) == len(gold) and all(eq(p, g) for p, g in zip(pred, gold))


def _interval_equal(p, g) -> bool:
    return p[0] == g[0] and p[3] == g[3] and scalar_equal(p[1], g[1]) and scalar_equal(p[2], g[2])


def _items(s: str) -> tuple[str, list[str]] | None:
    """('set'|'tuple'|'list', items) for `\\{a, b\\}`, `(a, b, c)`/`[a, b]`, `a, b` / `a or b`."""
    if _wrapped(s, "\\{", "\\}") or (_wrapped(s, "{", "}") and len(split_top(s[1:-1], ",")) > 1):
        inner = s[2:-2] if s.startswith("\\{") else s[1:-1]  # `{1,2,3}`: a set whose `\{` got lost
        items = [x for x in split_top(inner, ",") if x]
        # `\{1 \pm \sqrt 5, -2\}` holds three roots
        return "set", [y for x in items for y in ((x.replace("\\pm", "+"), x.replace("\\pm", "-")) if x.count("\\pm") == 1 else (x,))]
    for left, right in (("(", ")"), ("[", "]"), ("\\langle", "\\rangle")):
        if _wrapped(s, left, right):
            inner = split_top(s[len(left) : len(s) - len(right)], ",")
            if len(inner) > 1:
                return "tuple" + left, inner
    parts = [q.strip() for p in split_top(s, ",") if p for q in _OR_RE.split(p) if q.strip()]  # `21, 16 or 11`
    if len(parts) == 1 and s.count("\\pm") == 1:  # `1 \pm \sqrt 2` is the list of both roots
        parts = [s.replace("\\pm", "+"), s.replace("\\pm", "-")]
    if len(parts) == 1:
        parts = [p.strip() for p in _OR_RE.split(s) if p.strip()]
    return ("list", parts) if len(parts) > 1 else None


_PROSE_WORDS = {"yes", "no", "none", "true", "false", "odd", "even", "neither", "both", "all"}


def _is_prose(s: str) -> bool:
    """Words and no maths: `\\text{Evelyn}`, `no solution`. Short letter runs are variables."""
    t = strip_text(s).strip()
    if not re.fullmatch(r"[A-Za-z][A-Za-z' -]*[A-Za-z]", t):
        return False
    return " " in t or len(t) > 3 or "\\text" in s or t.lower() in _PROSE_WORDS


def _numbers_equal(p: Num, g: Num) -> bool:
    if p.percent == g.percent or p.value == g.value:  # 25% vs 25%, or 25 vs 25%
        if p.value == g.value:
            return True
    elif (p.value / 100 if p.percent else p.value) == (g.value / 100 if g.percent else g.value):
        return True  # 25% vs 0.25
    if g.decimals is None and p.decimals is not None and p.decimals >= _MIN_ROUNDED_DECIMALS:
        # `0.0833333` for 1/12, `2.6667` for 8/3: the exact gold correctly rounded to the digits given
        return abs(p.value - g.value) <= Fraction(1, 2 * 10**p.decimals)
    return g.decimals is not None and _rounds_to(p.value, p.decimals, g)


def _rounds_to(value: Fraction, decimals: int | None, g: Num) -> bool:
    """The rounded-decimal gold rule (module docstring): more precise and within half a unit."""
    if decimals is not None and decimals <= g.decimals:
        return False
    return abs(value - g.value) <= Fraction(1, 2 * 10**g.decimals)


def _base_equal(p: str, gold: tuple[str, int]) -> bool:
    digits, base = gold
    pb = parse_base(p)
    if pb is not None:
        return pb == gold or int(pb[0], pb[1]) == int(digits, base)
    bare = compact(p).upper().lstrip("0") or "0"
    return bare == digits


def scalar_equal(pred: str, gold: str) -> bool:
    """One answer against one answer, with no list/set structure left to split."""
    p, g = clean(pred), clean(gold)
    if not p or not g:
        return False
    if compact(p) == compact(g):
        return True
    if (letter := parse_choice(g, strict=True)) is not None:
        return parse_choice(p, strict=False) == letter
    if (base := parse_base(g)) is not None:
        return _base_equal(p, base)
    pn, gn = parse_number(p), parse_number(g)
    if pn is not None and gn is not None:
        return _numbers_equal(pn, gn)
    if _is_prose(g) or _is_prose(p):
        return plain_text(p) == plain_text(g)
    p, g = p.replace("%", ""), g.replace("%", "")  # both sides written as percentages
    _symbolic_allowed()
    from megatron_oreal.reward.symbolic import sympy_equal  # lazy: sympy costs ~0.5 s to import

    return sympy_equal(p, g, gn.decimals if gn is not None else None)


def answers_equal(pred: str, gold: str) -> bool:
    """Full comparison: matrices, interval unions, inequalities, sets, tuples, lists, scalars.

    When the written forms differ and either side names what it equals (`f(x)=1`, `(p,q)=(3,2)`,
    `x = 5+5+1 = 11`; see `names.value_of`), the stated values are compared as well.
    """
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    # A chain of many relations is no answer form sympy should solve; only its stated value counts.
    many = pred.count("=") > _MAX_RELATIONS or gold.count("=") > _MAX_RELATIONS
    if not many and _answers_equal(pred, gold):
        return True
    from megatron_oreal.reward.names import value_of

    p, g = clean(pred), clean(gold)
    vp, vg = value_of(p), value_of(g)
    if vp != p and vg != g and _names(p) != _names(g):
        return False  # `a = 3` against `b = 3`: both name what they state, and the names differ
    return (vp, vg) != (p, g) and _answers_equal(vp, vg)


def _names(s: str) -> str:
    """The left-hand sides of `s`'s assignments, for comparing what two answers name."""
    return ";".join(re.sub(r"\s+", "", part.split("=", 1)[0]) for part in split_top(s, ",") if "=" in part)


def _clock(s: str) -> tuple | None:
    m = _CLOCK_RE.match(s)
    if not m or int(m.group(1)) > 24 or int(m.group(2)) > 59:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0), (m.group(4) or "").lower()


def _answers_equal(pred: str, gold: str) -> bool:
    p, g = clean(pred), clean(gold)
    if compact(p) == compact(g):
        return True
    pc, gc = _clock(p), _clock(g)
    if pc is not None and gc is not None:
        return pc == gc  # `1:00` is not `12:00` (nor the ratio 1:0)
    for side in (p, g):
        if (m := _SCALED_MATRIX_RE.match(side)) and _matrix(m.group(2).strip()) is not None:
            scaled = _matrix(m.group(2).strip())
            body = " \\\\ ".join(" & ".join(f"{m.group(1)} \\cdot ({c})" for c in row) for row in scaled)
            text = f"\\begin{{pmatrix}}{body}\\end{{pmatrix}}"
            if len(text) <= MAX_ANSWER_CHARS:
                p, g = (text, g) if side is p else (p, text)
    if _is_prose(g):
        return plain_text(p) == plain_text(g)
    if parse_number(g) is not None:  # `1,000` is a number, not a list
        if parse_number(p) is None and (_items(p) is not None or _interval(p) is not None
                                        or _matrix(p) is not None or _RELATION_RE.search(p)):
            return False  # a list, interval, matrix or inequality against one number: no sympy
        return scalar_equal(p, g)
    gm, pm = _matrix(g), _matrix(p)
    if gm is not None or pm is not None:
        return _matrix_equal(pm, gm, p, g)
    gi = _intervals(g)
    if gi is None and _RELATION_RE.search(p) and _interval(g) is not None:
        gi = [_interval(g)]  # gold `(a, b)` against `a < x < b`: read the gold as an interval
    if gi is not None:
        pi = _intervals(p)
        if pi is None and _interval(p) is not None and not _RELATION_RE.search(p):
            pi = [_interval(p)]  # gold `-793 < a < 10` against `(-793, 10)`
        if pi is not None:
            return _unordered(pi, gi, _interval_equal)
        if _RELATION_RE.search(p) and _RELATION_RE.search(g):  # `-x > -1` vs `x < 1`: let sympy solve
            _symbolic_allowed()
            from megatron_oreal.reward.symbolic import relations_equal

            return relations_equal(p, g)
        return False
    if _RELATION_RE.search(g) or (_RELATION_RE.search(p) and _intervals(p) is None):
        # relations the text rules could not turn into intervals (`|x| \ge 3`): solve with sympy
        _symbolic_allowed()
        from megatron_oreal.reward.symbolic import relations_equal

        return relations_equal(p, g)
    gs = _items(g)
    if gs is not None:
        ps = _items(p)
        if ps is None:
            return False
        kind_g, kind_p = gs[0], ps[0]
        if kind_g.startswith("tuple") or kind_p.startswith("tuple"):
            # a bare `1, 2` may stand for the tuple `(1, 2)`; two different brackets may not
            same = kind_g == kind_p or "list" in (kind_g, kind_p)
            return same and _ordered(ps[1], gs[1], answers_equal)
        if _unordered(ps[1], gs[1], answers_equal):
            return True
        # "all solutions" listed as tuples with a repeat: `(3,17,3,7)` twice is still the same
        # solution set (bare values keep multiset semantics: `\{2, 2, 3\}` is not `\{2, 3\}`)
        if not all(_items(x) is not None and _items(x)[0].startswith("tuple") for x in ps[1] + gs[1]):
            return False
        dp, dg = _dedup(ps[1]), _dedup(gs[1])
        return (len(dp), len(dg)) != (len(ps[1]), len(gs[1])) and _unordered(dp, dg, answers_equal)
    if _items(p) is not None and parse_number(p) is None:
        return False  # a list or tuple against a single gold value
    return scalar_equal(p, g)


def _matrix_equal(pm, gm, p: str, g: str) -> bool:
    if pm is None or gm is None:
        # a row/column vector written as a tuple
        rows, other = (pm, g) if pm is not None else (gm, p)
        flat = [c for row in rows for c in row] if rows and (len(rows) == 1 or all(len(r) == 1 for r in rows)) else None
        items = _items(other)
        if flat is None or items is None or not items[0].startswith("tuple"):
            return False
        return _ordered(flat if pm is not None else items[1], items[1] if pm is not None else flat, answers_equal)
    return len(pm) == len(gm) and all(_ordered(rp, rg, answers_equal) for rp, rg in zip(pm, gm))
