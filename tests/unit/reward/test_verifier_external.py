"""Regression on answer pairs this project did not write (tests/assets/external, see its README):
Math-Verify's own published test cases and MATH-500/GSM8K/AIME24/AMC23 answer pairs.

Thresholds are the accuracies measured when the set was added (tools/bench_verifier.py prints them
per category, next to Math-Verify's), rounded down a little; a drop below them is a regression.
"""

import json
from pathlib import Path

import pytest

EXTERNAL = Path(__file__).resolve().parents[2] / "assets" / "external"
# file -> minimum accuracy against `expected`
# measured: 246/268 = 0.918 and 1734/1740 = 0.9966
THRESHOLDS = {"math_verify_cases.jsonl": 0.90, "math_data_pairs.jsonl": 0.99}


def _load(name: str) -> list[dict]:
    return [json.loads(line) for line in (EXTERNAL / name).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(THRESHOLDS))
def test_external_accuracy(name, pool):
    cases = _load(name)
    results = pool.verify_batch([(c["solution"], c["gold"]) for c in cases])
    misses = [f"[{c['category']}] expected={c['expected']} got={r.reason}: {c['solution'][-60:]!r} vs {c['gold'][:60]!r}"
              for c, r in zip(cases, results) if r.correct != c["expected"]]
    rate = 1 - len(misses) / len(cases)
    assert rate >= THRESHOLDS[name], f"{name}: {rate:.4f}\n" + "\n".join(misses)
    assert not [r for r in results if r.reason == "timeout"]


def test_external_sets_are_labelled_both_ways():
    for name in THRESHOLDS:
        cases = _load(name)
        assert len(cases) > 200
        assert 0.05 < sum(not c["expected"] for c in cases) / len(cases) < 0.6, name
