"""Build the external verifier benchmark (data only; run once, output committed).

    python tools/make_external_cases.py --math-verify-git DIR --math-data DIR [--out tests/assets/external]

Two sources nobody on this project wrote:
1. Math-Verify's own published test cases: the literal `(gold, pred, expected)` tuples of the
   `@pytest.mark.parametrize` lists in its `tests/*.py`, read with `ast.literal_eval` (no code of
   theirs is run or copied), with the settings each test passes to its `compare_strings`
   (match_types, precision, strict, allow_set_relation_comp) so their harness can be replayed.
2. Answer pairs from public math sets (MATH-500 solution box vs answer, GSM8K worked solution vs
   its `#### ` answer, AIME24 solution vs answer, AMC23 answer written as a sentence vs the JSON
   number). Each positive pair gets a negative twin: the same solution against another problem's
   gold whose text and exact number differ.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
from fractions import Fraction
from pathlib import Path

MV_TEST_FILES = ("tests/test_all.py", "tests/test_boxed.py", "tests/test_numina_cases.py",
                 "tests/test_open_thoughts.py", "tests/test_strict.py", "tests/test_yujianll.py")
MV_DEFAULTS = {"match_types": ["latex", "expr"], "precision": 6, "strict": True, "allow_set_relation_comp": False}


def _git_show(repo: str, commit: str, path: str) -> str:
    return subprocess.run(["git", "-C", repo, "show", f"{commit}:{path}"], check=True, capture_output=True, text=True).stdout


def _call_settings(func: ast.FunctionDef) -> dict | None:
    """Keyword literals of the test's `compare_strings(...)` call; {} for a bare `verify(parse..)`."""
    for node in ast.walk(func):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "compare_strings":
            out = {}
            for kw in node.keywords:
                try:
                    out[kw.arg] = ast.literal_eval(kw.value)
                except ValueError:
                    out[kw.arg] = kw.value.id  # a parametrize column such as `precision`
            return out
    return {"match_types": None}  # `verify(parse(gold), parse(pred))` with Math-Verify's defaults


def math_verify_cases(repo: str, commit: str) -> list[dict]:
    rows = []
    for path in MV_TEST_FILES:
        tree = ast.parse(_git_show(repo, commit, path))
        for func in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
            for deco in func.decorator_list:
                if not (isinstance(deco, ast.Call) and getattr(deco.func, "attr", "") == "parametrize"):
                    continue
                names = [n.strip() for n in ast.literal_eval(deco.args[0]).split(",")]
                if "gold" not in names or "pred" not in names:
                    continue
                settings = _call_settings(func)
                for node in deco.args[1].elts:
                    try:
                        values = ast.literal_eval(node)
                    except ValueError:
                        continue  # an f-string or computed case: not data, skipped
                    case = dict(zip(names, values))
                    expected = case.get("expected", case.get("result"))
                    mv = dict(MV_DEFAULTS)
                    for key, value in settings.items():
                        mv[key] = case[value] if isinstance(value, str) and value in case else value
                    rows.append({"solution": case["pred"], "gold": case["gold"], "expected": bool(expected),
                                 "category": f"mv/{func.name}", "mv": mv})
    return rows


def _key(answer: str) -> str:
    answer = re.sub(r"^\s*[A-Za-z]\s*=", "", str(answer))  # `x=5` and `5` state the same value
    return re.sub(r"\s+|\$|\\!|\\,|\\left|\\right|\\dfrac|\\frac|\\text\{[^}]*\}", "", str(answer))


def _num(answer: str):
    try:
        return Fraction(str(answer).replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _pairs(name: str, items: list[tuple[str, str]]) -> list[dict]:
    """Positive pair per item, plus the solution against the next item's gold whose key differs."""
    rows = []
    n = len(items)
    for i, (solution, gold) in enumerate(items):
        rows.append({"solution": solution, "gold": gold, "expected": True, "category": f"{name}/pos"})
        for step in range(1, n):
            other = items[(i + step) % n][1]
            if _key(other) != _key(gold) and (_num(other) is None or _num(other) != _num(gold)):
                rows.append({"solution": solution, "gold": other, "expected": False, "category": f"{name}/neg"})
                break
    return rows


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def math_data_cases(root: Path, gsm8k_rows: int) -> list[dict]:
    rows = []
    rows += _pairs("math500", [(r["solution"], r["answer"]) for r in _jsonl(root / "math500.jsonl")])
    gsm = []
    for r in _jsonl(root / "gsm8k_test.jsonl")[:gsm8k_rows]:
        work, final = r["answer"].rsplit("####", 1)
        gsm.append((work.strip(), final.strip()))
    rows += _pairs("gsm8k", gsm)
    rows += _pairs("aime24", [(r["solution"], str(r["answer"])) for r in _jsonl(root / "aime24.jsonl")])
    amc = []
    for r in _jsonl(root / "amc23.jsonl"):
        value = r["answer"]
        text = str(int(value)) if float(value).is_integer() else str(value)
        amc.append((f"So the final answer is ${text}$.", json.dumps(value)))
    rows += _pairs("amc23", amc)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--math-verify-git", required=True, help="git dir of huggingface/Math-Verify")
    parser.add_argument("--commit", default="HEAD")
    parser.add_argument("--math-data", required=True, help="folder with math500/gsm8k_test/aime24/amc23 .jsonl")
    parser.add_argument("--gsm8k-rows", type=int, default=300)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "assets" / "external"))
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", args.math_verify_git, "rev-parse", args.commit], check=True,
                            capture_output=True, text=True).stdout.strip()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("math_verify_cases.jsonl", math_verify_cases(args.math_verify_git, commit)),
                       ("math_data_pairs.jsonl", math_data_cases(Path(args.math_data), args.gsm8k_rows))):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{out / name}: {len(rows)} cases")
    print(f"Math-Verify commit {commit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
