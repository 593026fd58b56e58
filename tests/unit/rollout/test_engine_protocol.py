"""The engine protocol's pure parts: SamplingParams from the config, budgets, output checks, and
engine outputs -> Groups with the text the verifier reads."""

import pytest

from megatron_oreal.config import SamplingConfig
from megatron_oreal.data.char_tokenizer import build_tokenizer
from megatron_oreal.data.templates import apply_template
from megatron_oreal.rollout.cpu_engine import CPUEngine
from megatron_oreal.rollout.engine import (
    GenOutput,
    RolloutEngine,
    SamplingParams,
    check_outputs,
    generate_groups,
    to_groups,
)
from megatron_oreal.types import Prompt


def test_sampling_params_from_config():
    cfg = SamplingConfig(n=8, temperature=0.7, top_p=0.95, top_k=5, max_new_tokens=31, max_total_length=64, seed=3)
    sp = SamplingParams.from_config(cfg, default_stop_ids=[2])
    assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_new_tokens, sp.seed) == (8, 0.7, 0.95, 5, 31, 3)
    assert sp.stop_token_ids == (2,)  # [] in the config = the tokenizer's eos
    cfg.stop_token_ids = [7, 9]
    assert SamplingParams.from_config(cfg, default_stop_ids=[2]).stop_token_ids == (7, 9)
    assert SamplingParams.from_config(cfg, max_new_tokens=5).max_new_tokens == 5
    assert sp.with_seed(10).seed == 10 and sp.seed == 3
    # budget: min(max_new_tokens, max_total_length - prompt length), never negative
    assert [sp.budget(n) for n in (10, 40, 64, 80)] == [31, 24, 0, 0]
    g = SamplingParams.greedy_eval(12, [2])
    assert g.greedy and g.n == 1 and g.budget(1000) == 12
    for bad in (dict(n=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1), dict(max_new_tokens=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_to_groups_decodes_without_the_stop_token():
    tok = build_tokenizer()
    eos = tok.eos_token_id
    ids = tok("1-20=-19\\boxed{-19}", add_special_tokens=False)["input_ids"]
    prompts = [Prompt(uid="t:1", text="1-4*5", gold="-19", input_ids=[4])]
    outs = [[GenOutput(ids + [eos], "stop"), GenOutput(ids[:5], "length")]]
    (group,) = to_groups(prompts, outs, tok)
    assert group.prompt is prompts[0]
    assert [s.text for s in group.samples] == ["1-20=-19\\boxed{-19}", "1-20="]
    assert group.samples[0].response_ids == ids + [eos]  # the trained tokens keep the stop token
    assert [s.finish_reason for s in group.samples] == ["stop", "length"]
    with pytest.raises(ValueError, match="2 prompts but 1 output"):
        to_groups(prompts * 2, outs, tok)


def test_check_outputs_names_the_problem():
    good = [[GenOutput([1], "stop"), GenOutput([], "length")]]
    check_outputs(good, 1, 2)
    with pytest.raises(RuntimeError, match="returned 1 prompt results for 2 prompts"):
        check_outputs(good, 2, 2)
    with pytest.raises(RuntimeError, match="prompt 0 got 2 samples, expected n=3"):
        check_outputs(good, 1, 3)
    with pytest.raises(RuntimeError, match="unknown finish_reason 'abort'"):
        check_outputs([[GenOutput([1], "abort")]], 1, 1)


def test_generate_groups_end_to_end_with_the_char_tokenizer(tmp_path):
    from helpers.tiny_hf import make_tiny_qwen2

    tok = build_tokenizer()
    make_tiny_qwen2(tmp_path / "m", vocab_size=len(tok), hidden=32, layers=1, heads=2, kv_heads=1, ffn=64)
    engine = CPUEngine(tmp_path / "m", tok)
    assert isinstance(engine, RolloutEngine)
    prompts = [Prompt(uid=f"p{i}", text=q, gold="0", input_ids=apply_template(tok, q, "none"))
               for i, q in enumerate(["1+2", "3*4-5"])]
    sp = SamplingParams(n=3, max_new_tokens=6, stop_token_ids=(tok.eos_token_id,), seed=1)
    groups = generate_groups(engine, prompts, sp, tok)
    assert [g.prompt.uid for g in groups] == ["p0", "p1"] and all(len(g.samples) == 3 for g in groups)
    for g in groups:
        for s in g.samples:
            body = s.response_ids[:-1] if s.finish_reason == "stop" else s.response_ids
            assert s.text == tok.decode(body, skip_special_tokens=True)
    with pytest.raises(ValueError, match="prompt px: empty input_ids"):
        generate_groups(engine, [Prompt(uid="px", text="q", gold="1")], sp, tok)
