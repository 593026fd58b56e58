"""Pathological inputs return False within the limit; injected code never runs."""

import builtins
import os
import time

import pytest
import sympy.parsing.sympy_parser as sympy_parser

from megatron_oreal.reward import Verifier, verify
from verifier_pathological import CASES

# Needs the kill-based backstop: the pre-checks let (1000!)^9999 through (each part is small) and
# Python then spends minutes on a 25M-digit power. Everything else is refused by the pre-checks in
# normalize/symbolic (or is cheap) and must be quick even without a pool.
BACKSTOP_ONLY = {"factorial_power"}
LIMIT = 2.0


def test_enough_pathological_cases():
    assert len(CASES) >= 30


def test_pathological_inputs_are_false_within_the_limit():
    cases = [(s, g) for _, s, g in CASES]
    with Verifier(workers=2, timeout=LIMIT) as verifier:
        start = time.monotonic()
        results = verifier.verify_batch(cases)
        elapsed = time.monotonic() - start
    bad = [(name, r) for (name, _, _), r in zip(CASES, results) if r.correct]
    assert not bad, bad
    timeouts = {name for (name, _, _), r in zip(CASES, results) if r.reason == "timeout"}
    assert timeouts == BACKSTOP_ONLY, f"pre-checks missed {timeouts - BACKSTOP_ONLY}"
    # each case is bounded by LIMIT; the batch by the backstop cases plus a little work per case
    assert elapsed < LIMIT * len(BACKSTOP_ONLY) + 0.5 * len(CASES) / 2 + 2


@pytest.mark.parametrize("name,solution,gold", [c for c in CASES if c[0] not in BACKSTOP_ONLY], ids=lambda x: x if isinstance(x, str) and len(x) < 40 else "")
def test_pre_checks_make_in_process_verify_fast(name, solution, gold):
    start = time.monotonic()
    assert verify(solution, gold) is False
    assert time.monotonic() - start < LIMIT, name


INJECTIONS = [
    r"\boxed{__import__('os').system('touch {m}')}",
    r"\boxed{eval(\"__import__('os').system('touch {m}')\")}",
    r"\boxed{exec('import os; os.system(\"touch {m}\")')}",
    r"The answer is __import__('os').system('touch {m}')",
    r"\boxed{\text{__import__('subprocess').call(['touch', '{m}'])}}",
    r"\boxed{(lambda: __import__('os').system('touch {m}'))()}",
    r"\boxed{x} and also os.system('touch {m}')",
    r"\boxed{\operatorname{__import__}('os').system('touch {m}')}",
    r"\boxed{open('{m}', 'w')}",
    r"\boxed{Symbol('x').__class__.__mro__}",
]


@pytest.fixture
def spy(monkeypatch):
    """Record every call to eval/exec/sympify/parse_expr while letting sympy's own uses through."""
    calls = []
    real_eval, real_exec, real_parse = builtins.eval, builtins.exec, sympy_parser.parse_expr

    def rec(real, kind):
        def wrapper(*args, **kwargs):
            calls.append((kind, str(args[0])[:200] if args else ""))
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "eval", rec(real_eval, "eval"))
    monkeypatch.setattr(builtins, "exec", rec(real_exec, "exec"))
    monkeypatch.setattr(sympy_parser, "parse_expr", rec(real_parse, "parse_expr"))
    return calls


def test_injection_runs_nothing(tmp_path, spy):
    marker = tmp_path / "pwned"
    for template in INJECTIONS:
        text = template.replace("{m}", str(marker))
        for gold in ("0", "x", text):  # gold equal to the payload too: it must still not be executed
            verify(text, gold)
    assert not marker.exists()
    leaked = [c for c in spy if "import" in c[1] or "system" in c[1] or "open" in c[1]]
    assert not leaked, leaked


def test_injection_runs_nothing_in_workers(tmp_path, pool):
    marker = tmp_path / "pwned_pool"
    pairs = [(t.replace("{m}", str(marker)), "0") for t in INJECTIONS]
    results = pool.verify_batch(pairs)
    assert not any(r.correct for r in results)
    assert not os.path.exists(marker)


def test_fast_path_never_imports_sympy_and_is_quick():
    """The pool's parent-side fast path (judge.fast_judge) stays text-only and bounded."""
    import subprocess
    import sys

    code = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from megatron_oreal.reward.judge import fast_judge\n"
        "from verifier_pathological import CASES\n"
        "rows = [json.loads(l) for f in sorted(Path('tests/assets/external').glob('*.jsonl')) for l in f.read_text().splitlines()]\n"
        "cases = [(r['solution'], r['gold']) for r in rows] + [(s, g) for _, s, g in CASES]\n"
        "worst = 0.0\n"
        "for s, g in cases:\n"
        "    t = time.perf_counter(); fast_judge(s, g); worst = max(worst, time.perf_counter() - t)\n"
        "print('sympy' in sys.modules, worst)\n"
    )
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(os.path.dirname(here)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, here, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False"  # no case made the parent import sympy
    assert float(out[1]) < LIMIT
