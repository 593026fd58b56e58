import json

import pytest

from megatron_oreal.data.tiny_model import TinySize, make_random_tiny_model
from megatron_oreal.evaluate import main
from megatron_oreal.reward import verify


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    hf = make_random_tiny_model(root / "hf", size=TinySize(layers=1, hidden=32, heads=2, kv_heads=1, ffn=64))
    rows = [{"problem": f"{a}+{a}", "answer": str(2 * a), "subject": "Algebra" if a % 2 else "Geometry", "level": a % 3}
            for a in range(6)]
    data = root / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, hf, data


def test_eval_writes_predictions_consistent_with_verifier(tiny, capsys):
    root, hf, data = tiny
    out = root / "preds.jsonl"
    rc = main(["--model", str(hf), "--data", str(data), "--system-prompt", "none", "--max-new-tokens", "8",
               "--workers", "1", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "pass@1" in text and "by subject: Algebra" in text and "by level" in text
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["question"] for p in preds] == [f"{a}+{a}" for a in range(6)]
    for p in preds:  # the verdict is the verifier's, on the decoded greedy response
        assert p["correct"] == (p["finish_reason"] == "stop" and verify(p["response"], p["gold"]))


def test_eval_bad_inputs_name_the_culprit(tiny, capsys):
    root, hf, data = tiny
    bad = root / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n')
    assert main(["--model", str(hf), "--data", str(bad)]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    assert main(["--model", str(root), "--data", str(data)]) == 2
    assert "has no config.json" in capsys.readouterr().err
