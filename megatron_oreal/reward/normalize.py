"""String clean-up and exact number parsing: the cheap fast path before anything symbolic.

Modelled on the MATH `strip_string` normaliser and Qwen2.5-Math's grader, but numbers become
`fractions.Fraction` so 10000 vs 10001 or 10^-20 vs 10^-21 are decided exactly, never by a tolerance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

# Nothing longer is worth a symbolic look; it also bounds every regex below.
MAX_ANSWER_CHARS = 1000
# Python refuses int() on >4300 digits; well below that, and 10^k with |k| past this is refused too.
MAX_DIGITS = 400
MAX_EXPONENT = 1000

_UNIT_WORDS = (
    "cm|mm|km|m|meters?|metres?|centimeters?|millimeters?|kilometers?|inch|inches|in|ft|feet|foot|"
    "yards?|yd|miles?|mi|mph|g|kg|mg|grams?|kilograms?|lbs?|pounds?|oz|ounces?|l|ml|liters?|litres?|"
    "s|sec|seconds?|mins?|minutes?|h|hrs?|hours?|days?|weeks?|months?|years?|dollars?|cents?|"
    "euros?|units?|sq|square|cubic|degrees?|deg|radians?|rad|people|persons?|students?|ways|times|"
    "points?|percent"
)
# Trailing units: `5 cm`, `5\\text{ cm}^2`, `2\\pi\\text{ cm}`, `12 square feet`. Only known words, so
# `5x` stays `5x`; bare words (no \\text) only right after a number.
_UNITS = rf"(?:{_UNIT_WORDS})(?:\s+(?:{_UNIT_WORDS}))*"
_TRAILING_UNIT_RE = re.compile(
    rf"(?:\s*\\(?:text|textbf|textit|textnormal|mbox|mathrm)\{{\s*{_UNITS}\s*\}}"
    rf"|(?<=[\d}}.)])(?:\s+|(?<=\d)){_UNITS})(?:\^\{{?[23]\}}?)?\s*$",
    re.IGNORECASE,
)
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textnormal|mathrm|mathbf|mbox|textrm|operatorname|mathit)\s*\{([^{}]*)\}")
_TEXT_AFTER_NUMBER_RE = re.compile(
    r"^([+-]?(?:\d[\d,]*(?:\.\d+)?|\.\d+|\\frac\{\d+\}\{\d+\}))\s*\\(?:text|mbox|textrm|mathrm)\{\s*[A-Za-z][A-Za-z .-]*\}(?:\^\{?[23]\}?)?$")
_PERCENT_WORD_RE = re.compile(r"(?<=\d)\s*(?:pct|percentage|per\s*cent)\.?$", re.IGNORECASE)
_PAREN_NUMBER_RE = re.compile(r"^(?:\\text(?:bf|rm)?\{)?\s*\(\s*([+-]?\d+(?:\.\d+)?)\s*\)\s*\}?$")
_DOUBLED_COMMAND_RE = re.compile(
    r"(?<!\\)\\\\(?=(?:le|leq|ge|geq|lt|gt|ne|neq|frac|dfrac|left|right|sqrt|cdot|times|pi|infty|in|cup|cap|"
    r"text|mathrm|boxed|pm|circ)\b)")
_SEMICOLON_TUPLE_RE = re.compile(r"\([^()]*;[^()]*\)")
_SPACING_RE = re.compile(r"(?<!\\)\\[,;:! ]|\\q?quad\b|\\displaystyle\b|\\left\b|\\right\b|\\big[lr]?\b|\\Big[lr]?\b")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree\b|°")

_INT = r"\d+"
_THOUSANDS = r"\d{1,3}(?:,\d{3})+|\d{1,3}(?:\{,\}\d{3})+"
_DEC = rf"(?:{_THOUSANDS}|{_INT})(?:\.\d*)?|\.\d+"
_NUMBER_RE = re.compile(rf"^([+-]?)({_DEC})(?:(?:e|E|\\times\s*10\^|\\cdot\s*10\^|\*10\^)\{{?([+-]?\d+)\}}?)?$")
_REPEATING_RE = re.compile(r"^([+-]?)(\d*)\.(\d*)\\overline\{(\d{1,20})\}$")
_POW10_RE = re.compile(r"^([+-]?)10\^\{?([+-]?\d+)\}?$")
_FRAC_RE = re.compile(r"^([+-]?)\\frac\{([+-]?[\d.]+)\}\{([+-]?[\d.]+)\}$")
_SLASH_RE = re.compile(r"^([+-]?)([\d.]+)/([\d.]+)$")
_MIXED_RE = re.compile(r"^([+-]?)(\d+)\s*(?:\\frac\{(\d+)\}\{(\d+)\}|\s(\d+)/(\d+))$")


@dataclass(frozen=True)
class Num:
    """An exactly parsed number; `decimals` is set when written as a decimal (its fraction digits)."""

    value: Fraction
    decimals: int | None = None
    percent: bool = False


def clean(s: str) -> str:
    """Surface clean-up that never changes a value: delimiters, spacing, `\\dfrac`, units, degrees."""
    s = s.strip()
    s = _DOUBLED_COMMAND_RE.sub(r"\\", s)  # `\\le`, `\\frac` (a JSON-escaped backslash written twice)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\cfrac", "\\frac")
    s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s).strip()  # `\( 42 \)`, `\[ 42 \]` delimiters
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "%").replace("\\{", "\x01").replace("\\}", "\x02")
    s = s.replace("\u2212", "-").replace("\\minus", "-").replace("\\le ", "\\leq ").replace("\\ge ", "\\geq ")
    s = _SPACING_RE.sub(" ", s)
    s = _DEGREE_RE.sub("", s)
    s = s.replace("\\circ", "")
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac{1}2
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)  # \frac3{3}
    s = re.sub(r"\\sqrt\s*(\d+|[a-zA-Z])", r"\\sqrt{\1}", s)  # \sqrt2
    s = s.replace("\x01", "\\{").replace("\x02", "\\}")
    s = _TRAILING_UNIT_RE.sub("", s)
    if ";" in s:  # `(0;-2;6)`: a semicolon between a tuple's entries is its comma
        s = _SEMICOLON_TUPLE_RE.sub(lambda m: m.group(0).replace(";", ","), s)
    s = _TEXT_AFTER_NUMBER_RE.sub(r"\1", s)  # `0.06 \text{ yuan}`: any words after a number are a unit
    s = _PERCENT_WORD_RE.sub("%", s)
    s = _PAREN_NUMBER_RE.sub(r"\1", s)  # `\textbf{(113) }` (AIME style) is the number 113
    s = s.replace("\\neq", "\\ne").replace("!=", "\\ne ").replace("≠", "\\ne ").replace("\\lt ", "<").replace("\\gt ", ">")
    s = re.sub(r"^(?:[a-zA-Z]\w*\s*(?:\\in|∈)\s*)", "", s)  # `x \in [1,2]` -> `[1,2]`
    s = re.sub(r"\\varnothing|\\\{\s*\\\}|\\O\b", r"\\emptyset", s)
    s = re.sub(r"\\mathbb\s*\{?R\}?|\\R\b", r"(-\\infty,\\infty)", s)  # all reals
    s = s.strip().rstrip(".").strip()
    return s


def strip_text(s: str) -> str:
    """Unwrap `\\text{..}`-like commands (innermost first; bounded by the input length)."""
    for _ in range(8):
        new = _TEXT_CMD_RE.sub(r"\1", s)
        if new == s:
            break
        s = new
    return s


def plain_text(s: str) -> str:
    """Comparison key for prose answers: lower case, no LaTeX text wrappers, no punctuation."""
    s = strip_text(s).lower()
    s = re.sub(r"[\s.,;:!?'\"`~(){}\[\]\\]+", " ", s)
    return s.strip()


def compact(s: str) -> str:
    """Whitespace-free key for exact textual equality."""
    return re.sub(r"\s+", "", strip_text(s))


def _decimal(text: str) -> tuple[Fraction, int | None] | None:
    text = text.replace(",", "").replace("{}", "")
    if len(text.replace(".", "")) > MAX_DIGITS:
        return None
    if "." in text:
        whole, frac = text.split(".", 1)
        digits = whole + frac
        return Fraction(int(digits or "0"), 10 ** len(frac)), len(frac) or None
    return Fraction(int(text)), None


def parse_number(s: str) -> Num | None:
    """Exact value of a plain number (int, 1,000, decimal, 1.5e3, 10^{-20}, a/b, \\frac, 2\\frac12, %).

    Returns None for anything else: the caller then tries structure and symbolic comparison.
    """
    s = strip_text(s).strip().replace(" ", "") if len(s) <= MAX_ANSWER_CHARS else ""
    if not s:
        return None
    percent = s.endswith("%") or s.endswith("percent")
    s = s.removesuffix("%").removesuffix("percent")
    if m := _NUMBER_RE.match(s):
        got = _decimal(m.group(2))
        if got is None:
            return None
        value, decimals = got
        if m.group(3):
            exp = int(m.group(3))
            if abs(exp) > MAX_EXPONENT:
                return None
            value *= Fraction(10) ** exp
            decimals = None if decimals is None else max(decimals - exp, 0) or None
        return Num(-value if m.group(1) == "-" else value, decimals, percent)
    if m := _REPEATING_RE.match(s):  # 0.\overline{3} = 1/3, 1.2\overline{45}
        whole, fixed, rep = m.group(2) or "0", m.group(3), m.group(4)
        value = int(whole) + Fraction(int(fixed or "0"), 10 ** len(fixed)) + Fraction(int(rep), (10 ** len(rep) - 1) * 10 ** len(fixed))
        return Num(-value if m.group(1) == "-" else value, None, percent)
    if m := _POW10_RE.match(s):
        exp = int(m.group(2))
        if abs(exp) > MAX_EXPONENT:
            return None
        value = Fraction(10) ** exp
        return Num(-value if m.group(1) == "-" else value, None, percent)
    if m := _MIXED_RE.match(s.replace("\\frac", " \\frac", 1) if "\\frac" in s else s):
        num, den = m.group(3) or m.group(5), m.group(4) or m.group(6)
        if int(den) == 0 or len(s) > MAX_DIGITS:
            return None
        value = int(m.group(2)) + Fraction(int(num), int(den))
        return Num(-value if m.group(1) == "-" else value, None, percent)
    if m := (_FRAC_RE.match(s) or _SLASH_RE.match(s)):
        top, bottom = parse_number(m.group(2)), parse_number(m.group(3))
        if top is None or bottom is None or bottom.value == 0:
            return None
        value = top.value / bottom.value
        return Num(-value if m.group(1) == "-" else value, None, percent)
    return None


_BASE_RE = re.compile(r"^([0-9A-Za-z]+)_\{?(\d+)\}?$")


def parse_base(s: str) -> tuple[str, int] | None:
    """`1011_2` / `1011_{2}` / `A3_{16}` -> (digits upper-cased, base) when the digits fit the base."""
    m = _BASE_RE.match(strip_text(s).replace(" ", ""))
    if not m:
        return None
    digits, base = m.group(1).upper(), int(m.group(2))
    if not 2 <= base <= 36:
        return None
    try:
        int(digits, base)
    except ValueError:
        return None
    return digits.lstrip("0") or "0", base


_CHOICE_RE = re.compile(r"^\(?([A-Ea-e])\)?(?:[.:)]|\s|$)")


def parse_choice(s: str, strict: bool) -> str | None:
    """Multiple-choice letter. `strict` (for gold) wants the whole answer to be the letter."""
    t = strip_text(s).strip().strip("*").strip()
    t = re.sub(r"^(?:option|choice|answer)\s*:?\s*", "", t, flags=re.IGNORECASE)
    if strict:
        m = re.fullmatch(r"\(?([A-Ea-e])\)?\.?", t)
        return m.group(1).upper() if m and (t.isupper() or "(" in t) else None
    m = _CHOICE_RE.match(t)
    if not m or len(set(re.findall(r"(?<![A-Za-z])[A-E](?![A-Za-z])", t.upper()))) > 1:
        return None  # `A or B`, `(A) and (C)`: naming two options is a hedge
    letter = m.group(1)
    # lower-case letters alone are usually variables; accept them only parenthesised
    return letter.upper() if letter.isupper() or t.startswith("(") else None
