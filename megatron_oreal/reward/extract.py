"""Find the final answer in a model response.

Follows OREAL's judge (docs/algorithm.md §5.1 steps 1-3): drop the reasoning before the last `<conclude>`,
`**Final Answer**` and `</think>` (in that order), then take the last `\\boxed{}` with brace
matching, else "the (final) answer is ..." / "Answer \\[ .. \\]", else a short bare answer, else
the last maths span (`$..$`, `\\(..\\)`) when no number follows it, else the last number. Every scan here is linear in the
input so 100k-character responses cost milliseconds in the parent process.
"""

from __future__ import annotations

import re

# OREAL's [J] markers, applied in this order; each keeps only the text after its last occurrence.
REASONING_MARKERS = ("<conclude>", "**Final Answer**", "</think>")

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER_IS_RE = re.compile(
    r"(?:final\s+answer|the\s+answer)\s*(?:is\s*:?|:)\s*"
    r"|\banswer\s*+(?:is\s*+:?|:)?\s*+(?=\\\[|\\\(|\$)",  # `Answer \[ 9 \]`, `Answer: $9$`
    re.IGNORECASE,
)
# Display/inline maths spans; `.` excludes newlines only in `$..$` (a `$` pair across lines is prose).
_MATH_SPAN_RE = re.compile(r"\$\$(.+?)\$\$|\$([^$\n]+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)
# The answer is at the end: maths spans are looked for in this many trailing characters only.
_SPAN_TAIL = 2000
# A number as a last resort: optional sign, digits with optional thousands groups, optional decimal.
_LAST_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+(?![\d/]))?|-?\.\d+")  # `2/3` is one number
# Three words in a row: a sentence, not a bare answer (`the number is 10 which is 1,000.99`).
_PROSE_RE = re.compile(r"[A-Za-z]{2,}\s+[A-Za-z]{2,}\s+[A-Za-z]{2,}")
# Bare answers (the brief lets `solution` be just the final answer) are used whole when this short.
_BARE_ANSWER_MAX = 200
_MAX_BOXES = 16
_MAX_BOX_SCAN = 20_000
_BRACE_RE = re.compile(r"(?<!\\)[{}]")  # `\{` and `\}` are literal braces, not grouping


def strip_reasoning(text: str, stop_word: str | None = None) -> str:
    """docs/algorithm.md §5.1 step 2: keep what follows the last reasoning marker, then drop the stop word."""
    for marker in REASONING_MARKERS:
        if marker in text:
            text = text.rsplit(marker, 1)[1]
    if stop_word:
        text = text.replace(stop_word, "")
    return text.strip()


def is_truncated(text: str, stop_word: str) -> bool:
    """docs/algorithm.md §5.1 step 1: a response that does not end with the stop word was cut off."""
    return not text.strip().endswith(stop_word)


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the `{...}` group opening at text[start], with its end index; None if unbalanced.

    Scans at most _MAX_BOX_SCAN characters: a longer box is no answer anyway, and the cap keeps
    thousands of unclosed `\\boxed{` linear.
    """
    depth = 0
    for m in _BRACE_RE.finditer(text, start, min(len(text), start + _MAX_BOX_SCAN)):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return text[start + 1 : m.start()], m.end()
    return None


def _box_content(text: str, match: re.Match) -> str | None:
    """What one `\\boxed` wraps: a balanced group, or `\\boxed 5` up to the next space or `$`."""
    i = match.end()
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        got = _braced(text, i)
        return got[0].strip() if got else None
    if match.end() < len(text) and text[match.end()] == " ":
        rest = re.match(r"[^\s$]+", text[i:])
        return rest.group(0) if rest else None
    return None


def boxed_answers(text: str) -> list[str]:
    """Contents of every `\\boxed{}` / `\\fbox{}` in order (unbalanced ones are skipped)."""
    out = []
    # Only the last few boxes matter; capping them keeps a text of thousands of unbalanced boxes
    # linear instead of quadratic (each unbalanced box scans to the end).
    for m in list(_BOX_RE.finditer(text))[-_MAX_BOXES:]:
        content = _box_content(text, m)
        # `\boxed{\boxed{9}}`: keep the inner box only (the next match)
        if content is not None and not _BOX_RE.search(content):
            out.append(content)
    return out


def _final_part(text: str) -> str:
    """The paragraph holding the last box and what follows: where a hedge would show up."""
    last = None
    for last in _BOX_RE.finditer(text):
        pass
    if last is None:
        return text
    start = text.rfind("\n\n", 0, last.start())
    return text[start + 2 :] if start >= 0 else text


def _answer_is(text: str) -> str | None:
    last = None
    for last in _ANSWER_IS_RE.finditer(text):
        pass
    if last is None:
        return None
    rest = text[last.end() :].strip()
    if rest.startswith("$"):  # `is $28\%$. I hope it is correct.`: the maths span is the answer
        m = re.match(r"\$\$?((?:\\\$|[^$])+)\$", rest)
        if m:
            return m.group(1).strip() or None
    if rest.startswith(("\\[", "\\(")):  # `Answer \[ 9 \]`, `Answer \( 9 \)`
        m = _MATH_SPAN_RE.match(rest[:_SPAN_TAIL])
        if m:
            return next(g for g in m.groups() if g is not None).strip() or None
    line = rest.split("\n", 1)[0].strip()
    line = re.split(r"\.\s", line, maxsplit=1)[0]  # first sentence
    line = line.strip("$ ").rstrip(".").strip("$ ")
    # `Final Answer: The largest $n$ is 34`: the sentence names its subject, the value follows `is`
    if re.match(r"[A-Za-z]+\s", line) and " is " in line:
        line = line.rsplit(" is ", 1)[1].strip("$ ")
    return line or None


def _last_math_span(text: str) -> str | None:
    """The last `$..$`, `$$..$$`, `\\(..\\)` or `\\[..\\]` of the response's tail."""
    tail = text[-_SPAN_TAIL:]
    last = None
    for last in _MATH_SPAN_RE.finditer(tail):
        pass
    if last is None or re.search(r"\d", tail[last.end() :]):
        return None  # a number after the last span (`$400 + $60 = 460`: `$` as currency) comes later
    return next(g for g in last.groups() if g is not None).strip() or None


def _last_number(text: str) -> str | None:
    last = None
    for last in _LAST_NUMBER_RE.finditer(text):
        pass
    return last.group(0).rstrip(",") if last else None


def extract_answers(text: str) -> list[str]:
    """Distinct candidate answers of the final part (after `strip_reasoning`), last one last.

    More than one entry means the response hedged (two different boxes in its final paragraph).
    Distinctness is textual after removing spaces; `equivalence.is_hedged` applies the value check.
    """
    boxes = boxed_answers(text)
    if boxes:
        finals = boxed_answers(_final_part(text)) or boxes[-1:]
        seen: dict[str, str] = {}
        for box in finals:
            seen.setdefault(re.sub(r"\s+", "", box), box)
        distinct = list(seen.values())
        # the last box is the answer; move it last even if it repeated an earlier one
        last_key = re.sub(r"\s+", "", finals[-1])
        return [b for b in distinct if re.sub(r"\s+", "", b) != last_key] + [seen[last_key]]
    if _BOX_RE.search(text):
        return []  # a box we cannot close (or too long to be an answer): no guessing from numbers
    said = _answer_is(text)
    if said is not None:
        return [said]
    bare = text.strip().strip("$").strip()
    prose = _PROSE_RE.search(bare) is not None and "\\" not in bare
    if bare and len(bare) <= _BARE_ANSWER_MAX and "\n" not in bare and "$" not in bare and not prose:
        return [bare]
    span = _last_math_span(text)  # `Therefore $x \geq 5$ is the solution.`
    if span is not None:
        return [span]
    number = _last_number(text)
    if number is None and prose and len(bare) <= _BARE_ANSWER_MAX and "\n" not in bare:
        return [bare]  # `no solution exists`: words are the answer when there is no number
    return [number] if number is not None else []


def extract_answer(text: str, stop_word: str | None = None) -> str | None:
    """The final answer of a response (reasoning stripped), or None when there is none."""
    answers = extract_answers(strip_reasoning(text, stop_word))
    return answers[-1] if answers else None
