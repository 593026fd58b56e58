"""`python -m megatron_oreal verify --pairs FILE.jsonl`."""

import json

from megatron_oreal.reward.cli import main


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_scores_and_reports(tmp_path, capsys):
    pairs = _write(tmp_path / "p.jsonl", [
        {"solution": r"\boxed{5}", "gold": "5", "expected": True},
        {"solution": r"\boxed{x^2-1}", "gold": "(x-1)(x+1)", "expected": True},
        {"solution": r"\boxed{4}", "gold": "5", "expected": False},
        {"solution": "nothing", "gold": "5"},
    ])
    assert main(["--pairs", pairs, "--workers", "1", "--timeout", "5"]) == 0
    out = capsys.readouterr().out
    assert "accuracy vs expected: 3/3 = 1.0000" in out
    assert "correct=2" in out and "wrong=" in out
    assert "cases/s" in out


def test_bad_line_names_file_and_line(tmp_path, capsys):
    pairs = _write(tmp_path / "bad.jsonl", [{"solution": "1", "gold": "1"}, "{not json", {"solution": "1"}])
    assert main(["--pairs", pairs]) == 2
    err = capsys.readouterr().err
    assert f"{pairs}:2:" in err and "not valid JSON" in err


def test_missing_field(tmp_path, capsys):
    pairs = _write(tmp_path / "bad.jsonl", [{"solution": "1", "gold": "1"}, {"solution": "1"}])
    assert main(["--pairs", pairs]) == 2
    assert f"{pairs}:2: missing or non-string 'gold'" in capsys.readouterr().err


def test_missing_file(tmp_path, capsys):
    assert main(["--pairs", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_non_utf8_file_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"solution": "1", "gold": "1"}\n{"solution": "caf\xe9", "gold": "1"}\n')
    assert main(["--pairs", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}:2: not UTF-8 (byte 18 of the line)"]
