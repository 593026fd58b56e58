"""A small LaTeX -> sympy parser for the common answer shapes, ~50x faster than the ANTLR one.

latex2sympy2_extended's ANTLR parser costs 0.05-0.5 s per answer in Python; most answers are a few
numbers, letters, `\\frac`, `\\sqrt`, powers and function calls. This Pratt parser builds those
directly with sympy constructors (never a string-to-expression call) and raises `ParseError` on
anything else, so the caller can fall back to latex2sympy.
"""

from __future__ import annotations

import re

import sympy

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d+)?|\.\d+)|(?P<cmd>\\[a-zA-Z]+)|(?P<letter>[a-zA-Z])|(?P<op><=|>=|[-+*/^_=(){}\[\]|!,'<>]))"
)
_FUNCS = {
    "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot, "sec": sympy.sec, "csc": sympy.csc,
    "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan, "sinh": sympy.sinh, "cosh": sympy.cosh,
    "tanh": sympy.tanh, "exp": sympy.exp, "ln": sympy.log,
}
_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "iota", "kappa",
    "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi", "omega",
}
_MUL_CMDS = {"\\cdot", "\\times", "\\ast"}
_IGNORED = {"\\left", "\\right", "\\displaystyle", "\\mathrm", "\\mathit"}
_RELATIONS = {
    "<": sympy.Lt, ">": sympy.Gt, "<=": sympy.Le, ">=": sympy.Ge, "\\lt": sympy.Lt, "\\gt": sympy.Gt,
    "\\le": sympy.Le, "\\leq": sympy.Le, "\\ge": sympy.Ge, "\\geq": sympy.Ge, "\\leqslant": sympy.Le,
    "\\geqslant": sympy.Ge,
}


class ParseError(ValueError):
    pass


def tokenize(s: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    s = s.rstrip()
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if not m or m.end() == pos:
            raise ParseError(f"unexpected {s[pos:pos + 10]!r}")
        kind = m.lastgroup
        text = m.group(kind)
        if not (kind == "cmd" and text in _IGNORED):
            out.append((kind, text))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]):
        self.toks = tokens
        self.i = 0

    def peek(self, k: int = 0) -> tuple[str, str]:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else ("eof", "")

    def take(self, text: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if text is not None and tok[1] != text:
            raise ParseError(f"expected {text!r}, got {tok[1]!r}")
        self.i += 1
        return tok

    def parse(self):
        expr = self.additive()
        if self.peek()[1] == "=":
            self.take()
            expr = sympy.Eq(expr, self.additive(), evaluate=False)
        elif self.peek()[1] in _RELATIONS:  # `a < x \le b` becomes And(a < x, x <= b)
            parts, left = [], expr
            while self.peek()[1] in _RELATIONS:
                rel = _RELATIONS[self.take()[1]]
                right = self.additive()
                parts.append(rel(left, right))
                left = right
            expr = parts[0] if len(parts) == 1 else sympy.And(*parts)
        if self.peek()[0] != "eof":
            raise ParseError(f"trailing {self.peek()[1]!r}")
        return expr

    def additive(self):
        terms = [self.term()]
        while self.peek()[1] in ("+", "-"):
            sign = self.take()[1]
            t = self.term()
            terms.append(-t if sign == "-" else t)
        return sympy.Add(*terms)

    def term(self):
        value = self.unary()
        while True:
            kind, text = self.peek()
            if text == "*" or text in _MUL_CMDS:
                self.take()
                value = value * self.unary()
            elif text == "/" or text == "\\div":
                self.take()
                value = value / self.unary()
            elif self._starts_atom():
                value = self._implicit(value)
            else:
                return value

    def _implicit(self, left):
        # `2\frac{1}{2}` is a mixed number (as latex2sympy2 reads it), other juxtapositions multiply
        if left.is_Integer and self.peek()[1] == "\\frac":
            right = self.power()
            if right.is_Rational and 0 < right < 1:
                return left + right if left >= 0 else left - right
            return left * right
        return left * self.power()

    def _starts_atom(self) -> bool:
        kind, text = self.peek()
        if kind in ("num", "letter"):
            return True
        if kind == "cmd":
            return text not in _MUL_CMDS and text != "\\div" and text not in _RELATIONS
        return text in ("(", "[", "{")

    def unary(self):
        if self.peek()[1] == "-":
            self.take()
            return -self.unary()
        if self.peek()[1] == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek()[1] == "^":
            self.take()
            return sympy.Pow(base, self._exponent())
        return base

    def _exponent(self):
        if self.peek()[1] == "{":
            return self.group()
        if self.peek()[1] == "-":
            self.take()
            return -self._exponent()
        kind, text = self.take()
        if kind == "num" and "." not in text:
            return sympy.Integer(int(text))  # `x^23` as x^{23}, as latex2sympy2 reads it
        if kind == "letter":
            return self._letter(text)
        if kind == "cmd":
            self.i -= 1
            return self.atom()
        raise ParseError(f"bad exponent {text!r}")

    def postfix(self):
        value = self.atom()
        while self.peek()[1] == "!":
            self.take()
            if not (value.is_Integer and 0 <= value <= 1000):
                raise ParseError("factorial of a non-literal")  # guard() refuses the big ones
            value = sympy.factorial(value)
        return value

    def group(self):
        self.take("{")
        value = self.additive()
        self.take("}")
        return value

    def _letter(self, text: str):
        if self.peek()[1] == "_":  # x_1, a_{n}
            self.take()
            if self.peek()[1] != "{":
                return sympy.Symbol(f"{text}_{self.take()[1]}")
            sub = self._raw_group()  # names as latex2sympy2 gives them: x_1, a_{10}
            return sympy.Symbol(f"{text}_{sub}" if len(sub) == 1 else f"{text}_{{{sub}}}")
        return sympy.E if text == "e" else sympy.Symbol(text)

    def _raw_group(self) -> str:
        self.take("{")
        parts = []
        while self.peek()[1] != "}":
            if self.peek()[0] == "eof":
                raise ParseError("unclosed subscript")
            parts.append(self.take()[1])
        self.take("}")
        return "".join(parts)

    def atom(self):
        kind, text = self.take()
        if kind == "num":
            if "." in text:
                whole, frac = text.split(".")
                return sympy.Rational(int((whole or "0") + frac), 10 ** len(frac))
            return sympy.Integer(int(text))
        if kind == "letter":
            return self._letter(text)
        if text in ("(", "["):
            value = self.additive()
            self.take(")" if text == "(" else "]")
            return value
        if text == "{":
            self.i -= 1
            return self.group()
        if text == "|":
            value = self.additive()
            self.take("|")
            return sympy.Abs(value)
        if kind == "cmd":
            return self._command(text[1:])
        raise ParseError(f"unexpected {text!r}")

    def _command(self, name: str):
        if name in ("frac", "dfrac", "tfrac"):
            top, bottom = self.group(), self.group()
            return top / bottom
        if name == "sqrt":
            index = None
            if self.peek()[1] == "[":
                self.take()
                index = self.additive()
                self.take("]")
            radicand = self.group() if self.peek()[1] == "{" else self.atom()
            return sympy.sqrt(radicand) if index is None else sympy.root(radicand, index)
        if name == "pi":
            return sympy.pi
        if name == "infty":
            return sympy.oo
        if name in _GREEK:
            return sympy.Symbol(name)
        if name == "binom":
            n, k = self.group(), self.group()
            if not (n.is_Integer and k.is_Integer and 0 <= k <= n <= 10_000):
                raise ParseError("binomial of a non-literal")  # it would evaluate eagerly
            return sympy.binomial(n, k)
        if name in _FUNCS or name == "log":
            return self._function(name)
        raise ParseError(f"unsupported \\{name}")

    def _function(self, name: str):
        base = None
        if name == "log" and self.peek()[1] == "_":
            self.take()
            base = self.group() if self.peek()[1] == "{" else self.atom()
        power = None
        if self.peek()[1] == "^":  # \sin^2 x
            self.take()
            power = self._exponent()
        if self.peek()[1] in ("(", "{", "["):
            arg = self.atom()
        else:  # `\sin 2x`: numbers and letters up to the next operator or command
            arg = self.power()
            while self.peek()[0] in ("num", "letter"):
                arg = arg * self.power()
        if name == "log":
            value = sympy.log(arg, base) if base is not None else sympy.log(arg, 10)
        else:
            value = _FUNCS[name](arg)
        return value if power is None else sympy.Pow(value, power)


def parse_latex(s: str):
    """sympy expression (or Eq) for `s`; ParseError when it is outside this parser's subset."""
    tokens = tokenize(s)
    if not tokens:
        raise ParseError("empty")
    return _Parser(tokens).parse()
