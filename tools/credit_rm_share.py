"""Where does the token RM put its weight on the credit task? Reads a run's token-weight pages.

    python tools/credit_rm_share.py RUN_DIR [RUN_DIR ...] [--from-step 10]
    python tools/credit_rm_share.py --eval RUN_DIR [RUN_DIR ...]   # held-out breakdown at the deciding step

Every `log.html_every` steps the trainer writes RUN_DIR/html/step_N.json: the trained sequences with
their per-token weights (ω⁻ for incorrect, ω⁺ for correct responses). On the credit task
(megatron_oreal/data/credit.py) an incorrect response whose deciding value (a - b*c, the second state)
is wrong lost at that step; this tool takes those responses and reports the share of their total ω⁻
that falls on the deciding value's tokens, next to those tokens' share of all tokens (a share above the
token share means the RM concentrates blame on the deciding step), and the mean ω⁻ per token before,
on, and after the deciding value. ω at a token comes from the RM's value of the prefix *before* that
token (docs/algorithm.md), so the RM can react to a wrong sign only from the next token on; the
"window" columns add that one token to the deciding span.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_oreal.data import credit  # noqa: E402


def token_span(tokens: list[str], span: tuple[int, int]) -> tuple[int, int]:
    """Character span -> token index span [a, b) of the tokens that overlap it."""
    a = b = None
    pos = 0
    for i, t in enumerate(tokens):
        lo, hi = pos, pos + len(t)
        if hi > span[0] and lo < span[1]:
            a = i if a is None else a
            b = i + 1
        pos = hi
    if a is None:
        raise ValueError(f"span {span} outside the response")
    return a, b


def decisive_negatives(pages: list[Path]) -> list[tuple[list[float], int, int]]:
    """(ω⁻ per token, deciding token start, end) for each incorrect response lost at the deciding step."""
    out = []
    for page in pages:
        for s in json.loads(page.read_text()):
            if s["is_positive"]:
                continue
            text = "".join(s["tokens"])
            span = credit.deciding_span(text)
            if span is None:
                continue
            try:
                written = int(text[span[0]:span[1]])
            except ValueError:
                continue
            if written == credit.deciding_value(s["prompt"]):
                continue  # lost elsewhere (a later addition or the format)
            a, b = token_span(s["tokens"], span)
            out.append(([float(w) for w in s["weights"]], a, b))
    return out


def shares(rows: list[tuple[list[float], int, int]], extra: int = 0) -> dict:
    w_on = w_all = n_on = n_all = 0.0
    before = [0.0, 0]
    on = [0.0, 0]
    after = [0.0, 0]
    for w, a, b in rows:
        b = min(b + extra, len(w))
        w_on += sum(w[a:b])
        w_all += sum(w)
        n_on += b - a
        n_all += len(w)
        for acc, seg in ((before, w[:a]), (on, w[a:b]), (after, w[b:])):
            acc[0] += sum(seg)
            acc[1] += len(seg)
    return {
        "responses": len(rows),
        "omega_share": w_on / w_all if w_all else float("nan"),
        "token_share": n_on / n_all if n_all else float("nan"),
        "mean_omega_before": before[0] / max(before[1], 1),
        "mean_omega_on": on[0] / max(on[1], 1),
        "mean_omega_after": after[0] / max(after[1], 1),
    }


def deciding_written(response: str) -> int | None:
    span = credit.deciding_span(response)
    try:
        return int(response[span[0]:span[1]]) if span else None
    except ValueError:
        return None


def breakdown(run_dir: str) -> list[str]:
    """Markdown rows: greedy pass@1 per evaluation (RUN_DIR/eval/step_N.jsonl), split by sub-type, and
    on the sub-type how often the deciding value is right and how often its sign was dropped."""
    rows = []
    for f in sorted(Path(run_dir, "eval").glob("step_*.jsonl")):
        ev = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        sub = [r for r in ev if credit.has_negative_step(r["question"])]
        non = [r for r in ev if not credit.has_negative_step(r["question"])]
        pct = lambda k, n: f"{100 * k / max(n, 1):.1f}"  # noqa: E731
        right = sum(deciding_written(r["response"]) == credit.deciding_value(r["question"]) for r in sub)
        dropped = sum(deciding_written(r["response"]) == -credit.deciding_value(r["question"]) for r in sub)
        rows.append(f"| {run_dir} | {int(f.stem[5:])} | {pct(sum(r['correct'] for r in ev), len(ev))} | "
                    f"{pct(sum(r['correct'] for r in non), len(non))} | {pct(sum(r['correct'] for r in sub), len(sub))} | "
                    f"{pct(right, len(sub))} | {pct(dropped, len(sub))} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+")
    ap.add_argument("--from-step", type=int, default=0, help="ignore pages before this step")
    ap.add_argument("--eval", action="store_true", help="instead: the held-out breakdown at the deciding step")
    a = ap.parse_args()
    if a.eval:
        print("| run | step | pass@1 | not sub-type | sub-type right | sub-type: deciding value right | "
              "sub-type: its sign dropped |")
        print("|---|---|---|---|---|---|---|")
        for d in a.run_dirs:
            print("\n".join(breakdown(d)))
        return 0
    print("| run | decisive incorrect responses | share of ω⁻ on the deciding value (window +1) | its share of "
          "tokens (window +1) | mean ω⁻ before / on / after |")
    print("|---|---|---|---|---|")
    for d in a.run_dirs:
        pages = sorted(p for p in Path(d, "html").glob("step_*.json") if int(p.stem[5:]) >= a.from_step)
        rows = decisive_negatives(pages)
        s, w = shares(rows), shares(rows, extra=1)
        print(f"| {d} | {s['responses']} | {100 * s['omega_share']:.1f} % ({100 * w['omega_share']:.1f} %) | "
              f"{100 * s['token_share']:.1f} % ({100 * w['token_share']:.1f} %) | {s['mean_omega_before']:.3f} / "
              f"{s['mean_omega_on']:.3f} / {s['mean_omega_after']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
