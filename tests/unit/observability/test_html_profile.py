"""Token-weight HTML (escaping, shading follows weights) and the profile table / trace window."""

import json
import re

import pytest
import torch

from megatron_oreal.observability.html import (TokenWeightSample, pick_examples, render_token_weights_html,
                                               write_token_weights_html)
from megatron_oreal.observability.profile import TraceWindow, format_profile_table, parse_step_range, summarize

EVIL = '<script>alert("x")</script>&'


def test_html_escapes_untrusted_text_everywhere():
    samples = [(EVIL, ["<u>", '" onmouseover="x', "\n&amp;"], [0.2, 0.9, 0.0], True, 1.0, 0.75, EVIL),
               TokenWeightSample("p", ["</span><img src=x>"], [1.0], False, -1.0, -0.25)]
    page = render_token_weights_html(samples, step=7)
    assert "<script" not in page and "<img" not in page and "<u>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in page  # prompt and gold
    assert "&quot; onmouseover=&quot;x" in page and "&amp;amp;" in page
    assert page.count("gold answer") == 1  # the second sample has none
    assert "step 7" in page and "advantage +0.750" in page and "reward -1.00" in page
    assert "http" not in page and "<link" not in page  # self-contained, no external resources


def test_shading_follows_weights():
    weights = [0.0, 0.3, 1.0, 1.7, -0.5, 0.55]
    page = render_token_weights_html([("q", [f"t{i}" for i in range(6)], weights, False, -1.0, -0.5)], 0)
    alphas = [float(a) for a in re.findall(r"rgba\(220,30,30,([0-9.]+)\)", page)]
    assert alphas == [0.0, 0.3, 1.0, 1.0, 0.0, 0.55]  # clipped to [0, 1], order kept
    pos = render_token_weights_html([("q", ["a", "b"], [0.25, 0.5], True, 1.0, 0.5)], 0)
    assert re.findall(r"rgba\(0,170,60,([0-9.]+)\)", pos) == ["0.250", "0.500"]
    with pytest.raises(ValueError, match="tokens \\(2\\) and weights \\(1\\)"):
        render_token_weights_html([("q", ["a", "b"], [0.1], True, 1.0, 0.5)], 0)


def test_pick_and_write(tmp_path):
    samples = [(f"p{i}", ["x"], [0.5], i % 3 == 0, 1.0, 0.1) for i in range(12)]
    picked = pick_examples(samples, per_kind=2, seed=1)
    assert [s.is_positive for s in picked] == [True, True, False, False]
    out = write_token_weights_html(tmp_path / "html" / "step_10.html", samples, step=10)
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.count('class="sample') == 4
    assert not list((tmp_path / "html").glob("*.tmp"))


STEPS = [  # synthetic per-step metrics as train.py reports them; step 0 is warm-up and skipped
    {"time/rollout": 99.0, "time/train": 99.0, "time/step": 300.0, "memory/peak_gb": 90.0},
    {"time/rollout": 6.0, "time/train": 2.0, "time/weight_sync": 1.0, "time/step": 10.0,
     "tokens/s": 1000.0, "mfu": 0.30, "sync/gbps": 20.0, "memory/peak_gb": 40.0},
    {"time/rollout": 8.0, "time/train": 4.0, "time/weight_sync": 1.0, "time/step": 14.0,
     "tokens/s": 3000.0, "mfu": 0.40, "sync/gbps": 30.0, "tokens/s/rollout": 500.0, "memory/peak_gb": 42.5},
]


def test_profile_summary_hand_computed():
    s = summarize(STEPS)
    assert s["steps"] == 2 and s["step_s"] == 12.0
    assert s["stages"] == {"rollout": 7.0, "train": 3.0, "weight_sync": 1.0}
    assert s["rates"]["train"] == {"mfu": pytest.approx(0.35)}
    assert s["tokens/s"] == 2000.0  # a whole-step rate: on the step row
    assert s["rates"]["weight_sync"] == {"sync/gbps": 25.0}
    assert s["rates"]["rollout"] == {"tokens/s": 500.0}
    assert s["peak_gb"] == 42.5  # the warm-up step's 90 GiB is excluded
    table = format_profile_table(STEPS)
    rows = {line.split()[0]: line.split() for line in table.splitlines()[3:]}
    assert rows["rollout"][1:4] == ["7.000", "58.3%", "500"]
    assert rows["train"][1:5] == ["3.000", "25.0%", "-", "35.0%"]
    assert rows["step"][1:5] == ["12.000", "100.0%", "2000", "35.0%"]
    assert rows["weight_sync"][-1] == "25.00"
    assert rows["(untimed)"][1:] == ["1.000", "8.3%"]
    assert "peak memory: 42.50 GiB" in table
    assert s["step_median_s"] == 12.0 and "median step: 12.000 s wall, - CPU" in table
    with pytest.raises(ValueError, match="no step metrics"):
        summarize([])


def test_parse_step_range():
    assert parse_step_range("3:5") == (3, 5) and parse_step_range("4") == (4, 4)
    for bad in ("5:3", "a:b", "-1:2"):
        with pytest.raises(ValueError, match="--trace-steps"):
            parse_step_range(bad)


def test_trace_window_covers_only_the_chosen_steps(tmp_path):
    window = TraceWindow(tmp_path, (1, 2))
    for step in range(4):
        window.step_begin(step)
        with torch.profiler.record_function(f"marker_step{step}"):
            torch.ones(8).sum()
        window.step_end(step)
    window.close()
    assert window.written == tmp_path / "trace_rank0_steps1-2.json"
    names = {e.get("name") for e in json.loads(window.written.read_text())["traceEvents"]}
    assert {"marker_step1", "marker_step2"} <= names
    assert not {"marker_step0", "marker_step3"} & names


def test_profile_main_drives_the_trainer(tmp_path, monkeypatch, capsys):
    import sys
    import types

    from megatron_oreal.observability import profile

    calls = {}

    def run(cfg, max_steps, on_step):  # the trainer's contract: train.run(cfg, max_steps=N, on_step=cb)
        calls["steps"] = max_steps
        for i, m in enumerate(STEPS[:max_steps]):
            torch.ones(4).sum()
            on_step(i, m)

    monkeypatch.setitem(sys.modules, "megatron_oreal.train", types.SimpleNamespace(run=run))
    import megatron_oreal

    monkeypatch.setattr(megatron_oreal, "train", sys.modules["megatron_oreal.train"], raising=False)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\n")
    assert profile.main([str(cfg), "--steps", "3", "--trace-steps", "1:1"]) == 0
    out = capsys.readouterr().out
    assert calls["steps"] == 3 and "mean over 2 step(s)" in out and "rollout" in out
    assert (tmp_path / "run" / "profile" / "trace_rank0_steps1-1.json").is_file()
    assert profile.main([str(cfg), "--trace-steps", "x"]) == 2
