"""A self-contained HTML page of sampled responses with each token shaded by its OREAL token weight.

Correct responses are shaded green by ω⁺ and incorrect ones red by ω⁻ (docs/algorithm.md §0 "token weights":
ω⁺ = max(2q−1, 0), ω⁻ = max(1−2q, 0), both in [0, 1]), so one can see which tokens the token-level
RM credits or blames. The page has no scripts and no external resources. Everything that came from the
model or the dataset is untrusted text and is HTML-escaped (`html.escape(quote=True)`), including
inside attributes.
"""

from __future__ import annotations

import html
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

# Shading colours (RGB) for positive (ω⁺) and negative (ω⁻) samples; the weight is the alpha.
POS_RGB = (0, 170, 60)
NEG_RGB = (220, 30, 30)


@dataclass
class TokenWeightSample:
    prompt: str
    tokens: Sequence[str]  # decoded response tokens, one string per token
    weights: Sequence[float]  # ω⁺ for correct samples, ω⁻ for incorrect ones; same length as tokens
    is_positive: bool
    reward: float
    advantage: float
    gold_answer: str = ""


def _as_sample(item: TokenWeightSample | tuple) -> TokenWeightSample:
    if isinstance(item, TokenWeightSample):
        sample = item
    else:
        if len(item) not in (6, 7):
            raise ValueError("a sample tuple is (prompt, tokens, weights, is_positive, reward, advantage"
                             f"[, gold_answer]); got {len(item)} fields")
        sample = TokenWeightSample(*item)
    if len(sample.tokens) != len(sample.weights):
        raise ValueError(f"sample tokens ({len(sample.tokens)}) and weights ({len(sample.weights)}) "
                         "differ in length")
    return sample


def shade_alpha(weight: float) -> float:
    """The background opacity of a token: its weight clipped to [0, 1] (NaN -> 0)."""
    w = float(weight)
    if w != w:  # NaN
        return 0.0
    return min(max(w, 0.0), 1.0)


def _token_span(token: str, weight: float, rgb: tuple[int, int, int]) -> str:
    alpha = shade_alpha(weight)
    r, g, b = rgb
    return (f'<span class="t" style="background-color:rgba({r},{g},{b},{alpha:.3f})" '
            f'title="w={float(weight):.3f}">{html.escape(token, quote=True)}</span>')


def _sample_block(s: TokenWeightSample) -> str:
    rgb = POS_RGB if s.is_positive else NEG_RGB
    kind = "correct (shaded by &omega;&#8314;)" if s.is_positive else "incorrect (shaded by &omega;&#8315;)"
    css = "pos" if s.is_positive else "neg"
    gold = f"<div><b>gold answer:</b> {html.escape(s.gold_answer, quote=True)}</div>" if s.gold_answer else ""
    tokens = "".join(_token_span(t, w, rgb) for t, w in zip(s.tokens, s.weights))
    return (f'<div class="sample {css}"><div class="meta"><b>{kind}</b> &middot; reward {s.reward:+.2f} '
            f"&middot; advantage {s.advantage:+.3f} &middot; {len(s.tokens)} tokens</div>"
            f'<div class="prompt"><b>prompt:</b> {html.escape(s.prompt, quote=True)}</div>{gold}'
            f'<div class="resp">{tokens}</div></div>')


_CSS = """
body{font-family:sans-serif;margin:1.5em;max-width:70em}
.sample{border:1px solid #bbb;border-radius:6px;padding:.6em;margin:1em 0}
.pos{border-left:6px solid rgb(0,170,60)} .neg{border-left:6px solid rgb(220,30,30)}
.meta{color:#333;margin-bottom:.4em} .prompt{background:#f4f4f4;padding:.3em;white-space:pre-wrap}
.resp{font-family:monospace;white-space:pre-wrap;line-height:1.5;margin-top:.4em}
.t{border-radius:2px}
"""


def render_token_weights_html(samples: Iterable[TokenWeightSample | tuple], step: int,
                              title: str = "OREAL token weights") -> str:
    """The page as a string. `samples` are TokenWeightSample or tuples
    (prompt, tokens, weights, is_positive, reward, advantage[, gold_answer])."""
    blocks = [_sample_block(_as_sample(s)) for s in samples]
    head = html.escape(f"{title} - step {step}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{head}</title><style>{_CSS}</style></head><body>"
            f"<h2>{head}</h2><p>Green: correct response, shade = &omega;&#8314; = max(2q&minus;1, 0). "
            "Red: incorrect response, shade = &omega;&#8315; = max(1&minus;2q, 0). "
            "Hover a token for its weight.</p>"
            + "".join(blocks) + "</body></html>\n")


def pick_examples(samples: Sequence[TokenWeightSample | tuple], per_kind: int = 2,
                  seed: int = 0) -> list[TokenWeightSample]:
    """Up to `per_kind` random correct and `per_kind` random incorrect samples (correct ones first)."""
    rng = random.Random(seed)
    items = [_as_sample(s) for s in samples]
    pos = [s for s in items if s.is_positive]
    neg = [s for s in items if not s.is_positive]
    return rng.sample(pos, min(per_kind, len(pos))) + rng.sample(neg, min(per_kind, len(neg)))


def write_token_weights_html(path: str | Path, samples: Sequence[TokenWeightSample | tuple], step: int,
                             per_kind: int = 2, seed: int = 0) -> Path:
    """Pick examples and write the page atomically (tmp file + rename: a reader never sees half a page)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page = render_token_weights_html(pick_examples(samples, per_kind, seed + step), step)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
