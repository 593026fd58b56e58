"""Prompt files: formats, errors naming file:line, difficulty balancing; the prompt stream's
determinism, epochs, DP sharding and exact resume."""

import json

import pytest

from megatron_oreal.config import DataConfig
from megatron_oreal.data.char_tokenizer import build_tokenizer
from megatron_oreal.data.prompts import (
    DataError,
    PromptStream,
    balance_difficulty,
    load_eval_prompts,
    load_eval_set,
    load_prompts,
    parse_answer,
)
from megatron_oreal.data.templates import apply_template
from megatron_oreal.types import Prompt


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_formats_of_the_usual_sets(tmp_path):
    gsm = _write(tmp_path / "gsm.jsonl", [{"question": "Eggs?", "answer": "16 - 3 = <<16-3=13>>13\n#### 1,300"}])
    amc = _write(tmp_path / "amc.jsonl", [{"problem": "Miles?", "answer": 27.0, "id": 0}, {"problem": "p", "answer": 2.5}])
    math = _write(tmp_path / "math.jsonl", [
        {"problem": "Convert.", "solution": "...", "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2},
        "",  # blank lines are skipped, line numbers still count them
        {"problem": "Sum?", "answer": " 7 ", "subject": "Algebra", "level": 1},
    ])
    oreal = _write(tmp_path / "oreal.jsonl", [{"question": "Q", "gold_answer": "\\frac{1}{2}", "pass_rate": 0.25}])
    (g,) = load_prompts(gsm)
    assert (g.text, g.gold, g.uid) == ("Eggs?", "1300", "gsm.jsonl:1")
    assert [p.gold for p in load_prompts(amc)] == ["27", "2.5"]  # JSON numbers -> exact short text
    evals = load_eval_set(math)
    assert [p.uid for p in evals] == ["math.jsonl:1", "math.jsonl:3"]
    assert evals[0].gold == "\\left( 3, \\frac{\\pi}{2} \\right)" and evals[1].gold == "7"
    assert evals[0].meta == {"subject": "Precalculus", "level": 2} and evals[1].meta["level"] == 1
    assert len(load_eval_set(math, limit=1)) == 1
    (o,) = load_prompts(oreal, prompt_key="question", answer_key="gold_answer")
    assert (o.gold, o.meta) == ("\\frac{1}{2}", {"pass_rate": 0.25})
    # a configured key wins over the defaults
    custom = _write(tmp_path / "c.jsonl", [{"q": "x", "question": "not this", "final": "4"}])
    assert load_prompts(custom, prompt_key="q", answer_key="final")[0].text == "x"
    assert parse_answer("#### 42", "plain") == "#### 42" and parse_answer("a #### 42", "gsm8k") == "42"


@pytest.mark.parametrize("rows, line, message", [
    ([{"question": "a", "answer": "1"}, "{not json", {"question": "c", "answer": "3"}], 2, "not valid JSON"),
    ([{"question": "a", "answer": "1"}, {"question": "b", "answer": "2"}, {"text": "c", "answer": "3"}], 3,
     "no prompt field \\(tried question, problem, prompt; the row has text, answer\\)"),
    ([{"question": "a"}], 1, "no answer field"),
    ([{"question": "a", "answer": "1"}, {"question": "b", "answer": "  "}], 2, "field 'answer': answer is empty"),
    ([{"question": "a", "answer": "#### "}], 1, "answer is empty"),
    ([{"question": "a", "answer": None}], 1, "answer must be a string or a number"),
    ([{"question": "", "answer": "1"}], 1, "prompt field 'question' is empty"),
    ([{"question": "a", "answer": "1", "pass_rate": 1.5}], 1, "pass_rate must be a number in \\[0, 1\\]"),
    (["[1, 2]"], 1, "expected a JSON object"),
])
def test_bad_rows_name_file_and_line(tmp_path, rows, line, message):
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=f"{path}:{line}: .*{message}"):
        load_prompts(path)


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: cannot read"):
        load_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        load_prompts(_write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'answer'.*'#### '"):
        load_prompts(_write(tmp_path / "bad.jsonl", [{"question": "a", "answer": "12"}]), answer_format="gsm8k")


def test_difficulty_balancing_counts():
    rates = [0.0, 0.1, 0.2, 0.39, 0.4, 0.59, 0.6, 0.79, 0.8, 1.0]
    prompts = [Prompt(uid=f"p{i}", text=f"q{i}", gold="1", meta={"pass_rate": r}) for i, r in enumerate(rates)]
    out = balance_difficulty(prompts)
    counts = {p.uid: sum(q.uid.split("#")[0] == p.uid for q in out) for p in prompts}
    assert [q.uid for q in out[:7]] == ["p0", "p0#2", "p0#3", "p0#4", "p0#5", "p0#6", "p1"]  # distinct uids
    # docs/algorithm.md §4.1: [0,.2) 6x, [.2,.4) 4x, [.4,.6) 4x, [.6,.8) 2x, >= .8 dropped; half-open intervals
    assert list(counts.values()) == [6, 6, 4, 4, 4, 4, 2, 2, 0, 0] and len(out) == 32
    out[0].meta["x"] = 1
    assert "x" not in out[1].meta and "x" not in prompts[0].meta  # copies, not aliases
    with pytest.raises(DataError, match="p0: data.difficulty_balance needs a pass_rate"):
        balance_difficulty([Prompt(uid="p0", text="q", gold="1")])
    with pytest.raises(DataError, match="dropped every prompt"):
        balance_difficulty([Prompt(uid="p0", text="q", gold="1", meta={"pass_rate": 0.9})])


def _pool(n):
    return [Prompt(uid=f"u{i}", text=f"q{i}", gold=str(i)) for i in range(n)]


def _uids(step):
    return [p.uid for p in step]


def test_stream_is_seeded_and_reshuffles_each_epoch():
    pool = _pool(12)
    a, b = PromptStream(pool, 4, seed=5), PromptStream(pool, 4, seed=5)
    steps = [_uids(next(a)) for _ in range(6)]  # two epochs
    assert steps == [_uids(next(b)) for _ in range(6)]
    epoch0, epoch1 = sum(steps[:3], []), sum(steps[3:], [])
    assert sorted(epoch0) == sorted(epoch1) == sorted(p.uid for p in pool)  # each epoch: every prompt once
    assert epoch0 != epoch1 and epoch0 != [p.uid for p in pool]
    assert [_uids(next(PromptStream(pool, 4, seed=6)))] != steps[:1]
    # an epoch's tail shorter than a step is skipped: 12 prompts, 5 per step -> 2 steps per epoch
    c = PromptStream(pool, 5, seed=5)
    flat = sum((_uids(next(c)) for _ in range(4)), [])
    assert flat[:10] == epoch0[:10] and flat[10:] == epoch1[:10] and c.state_dict()["epoch"] == 1
    # a set smaller than one step runs on across epochs
    d = PromptStream(pool[:3], 5, seed=5)
    assert len(_uids(next(d))) == 5 and d.state_dict()["epoch"] == 1


def test_stream_resumes_exactly_from_its_state():
    pool = _pool(10)
    run = PromptStream(pool, 4, seed=1)
    for _ in range(4):
        next(run)
    state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint's serialisation
    expected = [_uids(next(run)) for _ in range(5)]
    resumed = PromptStream(pool, 4, seed=1)
    resumed.load_state_dict(state)
    assert [_uids(next(resumed)) for _ in range(5)] == expected
    with pytest.raises(DataError, match="seed=1 in the checkpoint but 2 now"):
        PromptStream(pool, 4, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="num_prompts=10 in the checkpoint but 9 now"):
        PromptStream(pool[:9], 4, seed=1).load_state_dict(state)


def test_stream_dp_shards_are_disjoint_slices_of_one_global_order():
    pool = _pool(20)
    glob = PromptStream(pool, 8, seed=3)
    ranks = [PromptStream(pool, 8, seed=3, dp_rank=r, dp_size=4) for r in range(4)]
    for _ in range(5):
        whole = _uids(glob.next_global())
        parts = [_uids(next(r)) for r in ranks]
        assert all(len(p) == 2 for p in parts)
        assert sum(parts, []) == whole and len(set(whole)) == 8  # disjoint, in global order
    with pytest.raises(DataError, match="prompts_per_step=6 must be a positive multiple .* \\(4\\)"):
        PromptStream(pool, 6, dp_size=4)


def test_from_config_templates_tokenises_and_balances(tmp_path):
    rows = [{"question": "1+2", "gold_answer": "3", "pass_rate": 0.1}, {"question": "2*3", "gold_answer": "6", "pass_rate": 0.9}]
    path = _write(tmp_path / "train.jsonl", rows)
    tok = build_tokenizer()
    cfg = DataConfig(train_file=str(path), prompts_per_step=2, system_prompt="none", difficulty_balance=True,
                     eval_file=str(path), eval_limit=1)
    stream = PromptStream.from_config(cfg, tok, dp_rank=1, dp_size=2)
    assert len(stream.prompts) == 6  # the 0.1 prompt six times, the 0.9 prompt dropped
    (p,) = next(stream)
    assert p.input_ids == apply_template(tok, "1+2", "none") and tok.decode(p.input_ids) == "<|user|>1+2<|assistant|>"
    (e,) = load_eval_prompts(cfg, tok)
    assert e.input_ids == p.input_ids and e.meta == {"pass_rate": 0.1}
    with pytest.raises(DataError, match="'builtin:arith' is not a JSONL file"):
        PromptStream.from_config(DataConfig(train_file="builtin:arith"))


def test_difficulty_balance_is_the_recipe_default(tmp_path):
    # The reference 7B recipe balances by pass_rate ([C7] data_difficulty_balance_cfg), so the default does too.
    assert DataConfig().difficulty_balance is True
    rated = _write(tmp_path / "rated.jsonl", [{"question": "1+2", "gold_answer": "3", "pass_rate": 0.3},
                                              {"question": "2*3", "gold_answer": "6", "pass_rate": 0.85}])
    assert [p.uid for p in PromptStream.from_config(DataConfig(train_file=str(rated), prompts_per_step=1)).prompts] \
        == ["rated.jsonl:1", "rated.jsonl:1#2", "rated.jsonl:1#3", "rated.jsonl:1#4"]  # 4x, the 0.85 row dropped
    # A file with no pass_rate at all (the built-in tasks) is used as is, with a warning naming the key.
    plain = _write(tmp_path / "plain.jsonl", [{"question": "1+2", "gold_answer": "3"}, {"question": "4", "gold_answer": "4"}])
    with pytest.warns(UserWarning, match="data.difficulty_balance: .*plain.jsonl has no pass_rate"):
        stream = PromptStream.from_config(DataConfig(train_file=str(plain), prompts_per_step=1))
    assert len(stream.prompts) == 2
    # Some rows rated and some not is a data error, as before.
    mixed = _write(tmp_path / "mixed.jsonl", [{"question": "1+2", "gold_answer": "3", "pass_rate": 0.3},
                                              {"question": "4", "gold_answer": "4"}])
    with pytest.raises(DataError, match="mixed.jsonl:2: data.difficulty_balance needs a pass_rate"):
        PromptStream.from_config(DataConfig(train_file=str(mixed), prompts_per_step=1))
