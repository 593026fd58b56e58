"""Table-driven accuracy: tests/assets/verifier_cases.jsonl, every category, about half negatives."""

import collections
import json
from pathlib import Path

from megatron_oreal.reward import verify

ASSET = Path(__file__).resolve().parents[2] / "assets" / "verifier_cases.jsonl"
THRESHOLD = 0.99


def load_cases() -> list[dict]:
    return [json.loads(line) for line in ASSET.read_text().splitlines() if line.strip()]


def test_asset_shape():
    cases = load_cases()
    assert len(cases) >= 500
    negatives = sum(not c["expected"] for c in cases)
    assert 0.4 <= negatives / len(cases) <= 0.6
    categories = collections.Counter(c["category"] for c in cases)
    for needed in ("integer", "thousands", "fraction", "mixed_number", "decimal", "percent", "radical", "pi_e",
                   "symbolic", "equation", "inequality", "interval", "set", "tuple", "matrix", "degree", "units",
                   "currency", "complex", "base", "choice", "text", "extraction", "hedge"):
        assert categories[needed] >= 8, needed


def test_pass_rate(pool):
    cases = load_cases()
    results = pool.verify_batch([(c["solution"], c["gold"]) for c in cases])
    failures = [
        f"[{c['category']}] expected={c['expected']} got={r.reason}: {c['solution'][-80:]!r} vs gold {c['gold']!r}"
        for c, r in zip(cases, results)
        if r.correct != c["expected"]
    ]
    rate = 1 - len(failures) / len(cases)
    assert rate >= THRESHOLD, f"pass rate {rate:.4f} < {THRESHOLD}; failures:\n" + "\n".join(failures)
    assert "timeout" not in {r.reason for r in results}, "a table case needed the kill-based timeout"


def test_pure_function_agrees_on_fast_categories():
    """`verify` in-process (no pool) on the categories the fast path settles."""
    fast = {"integer", "thousands", "fraction", "mixed_number", "percent", "degree", "units", "currency", "base",
            "choice", "text", "hedge"}
    cases = [c for c in load_cases() if c["category"] in fast]
    wrong = [c for c in cases if verify(c["solution"], c["gold"]) != c["expected"]]
    assert not wrong, wrong


def test_strict_hedging_option():
    """Cases whose label depends on the hedging rule: correct by default (last box), wrong when strict."""
    from megatron_oreal.reward.judge import judge

    cases = [c for c in load_cases() if "strict_expected" in c]
    assert len(cases) >= 5
    for c in cases:
        assert (judge(c["solution"], c["gold"]) == "correct") == c["expected"], c
        assert (judge(c["solution"], c["gold"], strict_hedging=True) == "correct") == c["strict_expected"], c
