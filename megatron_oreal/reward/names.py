"""Answers that name what they equal: `f(x)=1`, `|AB|=1`, `\\frac{NO}{BO}=\\frac1{\\sqrt6}`,
`(p,q)=(3,2)`, `S_1:S_2=7:32`, `AB=4,CD=5`, `p=5,q=2;p=7,q=2`, and chains `x = 5+5+1 = 11`.

`value_of` rewrites such text to the bare value(s) it states (`1`, `(3,2)`, `7:32`, `4, 5`,
`(5,2), (7,2)`, `11`); anything else comes back unchanged. Text only, linear in its (bounded) input.
"""

from __future__ import annotations

import re

from megatron_oreal.reward.equivalence import split_top

# A relation other than `=` means this is not an assignment (`x \le 3`, `a != b`, `x >= 1`).
_OTHER_RELATION_RE = re.compile(r"<|>|\\[lg]eq?\b|\\[lg]t\b|\\neq?\b|!=|≤|≥|≠|\\approx|\\sim")
# Between alternatives: `;`, `or`, `and`, `\quad` (as text or LaTeX).
_GROUP_RE = re.compile(r"\\text\{\s*(?:or|and)\s*\}|\s(?:or|and)\s|\\q?quad\b|;")
_SUBSCRIPT_RE = re.compile(r"_\{[^{}]*\}|_\w")
_COMMAND_RE = re.compile(r"\\(?:frac|dfrac|tfrac|overline|angle|triangle|mathrm|operatorname|text|vec|left|right|"
                         r"mathbf|bar|hat|widehat|overrightarrow|measuredangle|sin|cos|tan|log|ln|lvert|rvert|\|)")


def is_name(s: str) -> bool:
    """Something that names a quantity rather than states one: letters (with subscripts), function
    applications, `|AB|`, a ratio of names, a tuple of names. No digits, operators or numbers."""
    t = _COMMAND_RE.sub("", _SUBSCRIPT_RE.sub("", s))
    t = re.sub(r"\s+", "", t)
    return bool(t) and bool(re.search(r"[A-Za-z]", t)) and re.fullmatch(r"[A-Za-z(){}|:,'\[\]]+", t) is not None


def _assignment(s: str) -> str | None:
    """The value of `name = value`; for a chain `a = b = ... = v`, the last value."""
    parts = split_top(s, "=")
    if len(parts) < 2 or not all(parts):
        return None
    if len(parts) == 2:
        return parts[1] if is_name(parts[0]) else None
    return parts[-1]  # `x = 5+5+1 = 11`: a chain ends on what it evaluates to


def value_of(s: str) -> str:
    """The value(s) `s` states when it is written as assignments (module docstring); else `s`."""
    if "=" not in s or _OTHER_RELATION_RE.search(s):
        return s
    groups = [g.strip() for g in _GROUP_RE.split(s) if g.strip()]
    out = []
    for group in groups:
        if "=" not in group:  # `(x, y) = (5, 8) and (8, 5)`: the second one is bare
            out.append(group)
            continue
        parts = [p for p in split_top(group, ",") if p]
        values = [_assignment(p) for p in parts]
        if len(parts) > 1 and all(v is not None and len(split_top(p, "=")) == 2 for v, p in zip(values, parts)):
            # `p=5,q=2; p=7,q=2`: each group is one tuple; a lone `AB=4, CD=5` is the list `4, 5`
            out.append(f"({', '.join(values)})" if len(groups) > 1 else ", ".join(values))
            continue
        whole = _assignment(group)
        if whole is None:
            return s
        out.append(whole)
    return ", ".join(out)
