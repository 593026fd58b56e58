"""Real-model plumbing without the real model: the CPU engine on a Llama (greedy = HF generate), stop
ids from eos + chat template + generation_config, prompt-length errors, layout errors, skip reasons."""

import json

import pytest
import torch
from helpers.tiny_hf import make_tiny_llama
from transformers import AutoModelForCausalLM

from megatron_oreal.data.prompts import DataError, check_prompt_lengths
from megatron_oreal.mcore.hf_config import check_layout
from megatron_oreal.rollout.cpu_engine import CPUEngine
from megatron_oreal.rollout.engine import SamplingParams
from megatron_oreal.rollout.stops import default_stop_ids
from megatron_oreal.train import nothing_to_learn
from megatron_oreal.types import Group, Prompt, Sample


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/rollout/conftest.py


def test_llama_engine_greedy_equals_hf_generate_and_stops_at_the_position_limit(tmp_path):
    # Llama's model builds its mask with create_causal_mask (no per-layer-type dict): the engine's
    # prebuilt 4D mask must reach it unchanged, else left-padded batches attend to padding.
    make_tiny_llama(tmp_path, vocab_size=60, hidden=64, layers=2, heads=4, kv_heads=2, tie=True, seed=2, max_position=24)
    engine = CPUEngine(tmp_path, threads=1)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 60, (n,), generator=g).tolist() for n in (3, 9, 6)]
    outs = engine.generate(prompts, SamplingParams.greedy_eval(8, ()))
    for p, o in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=None)
        assert o[0].token_ids == ref[0, len(p):].tolist()
    # a 20-token prompt of a 24-position model gets 4 tokens, not 8
    long = engine.generate([list(range(3, 23))], SamplingParams.greedy_eval(8, ()))[0][0]
    assert len(long.token_ids) == 4 and long.finish_reason == "length"
    with pytest.raises(ValueError, match="prompt 0 is 24 tokens; the model's max_position_embeddings is 24"):
        engine.generate([list(range(3, 27))], SamplingParams.greedy_eval(8, ()))


class _Tok:
    eos_token_id = 0  # a base eos: <|endoftext|>
    chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"

    def get_vocab(self):
        return {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|eot_id|>": 7}


def test_stop_ids_from_eos_template_and_generation_config(tmp_path):
    assert default_stop_ids(_Tok()) == [0, 2]  # <|eot_id|> is in the vocab but not in the template
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 2]}))
    assert default_stop_ids(_Tok(), tmp_path) == [0, 2, 5]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert default_stop_ids(_Tok(), tmp_path) == [0, 2, 9]


def test_prompt_length_errors_name_the_prompt():
    ps = [Prompt("a.jsonl:1", "q", "1", input_ids=[1] * 5), Prompt("a.jsonl:2", "q", "1", input_ids=[1] * 9)]
    check_prompt_lengths(ps, 10, 10, "rollout.sampling")  # 9 < 10: one token of room
    with pytest.raises(DataError, match=r"^a.jsonl:2: the templated prompt is 9 tokens, no room .* max_total_length=9"):
        check_prompt_lengths(ps, 9, 100, "rollout.sampling")
    with pytest.raises(DataError, match=r"^a.jsonl:2: .* 9 tokens; the model's max_position_embeddings is 8"):
        check_prompt_lengths(ps, 0, 8, "eval")


def test_layout_errors_list_the_possible_sizes():
    smol = {"num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30}
    check_layout(smol, 3, 2)
    with pytest.raises(ValueError, match="tensor parallel size 2 .*heads=9 .*heads=3; possible sizes: 1, 3$"):
        check_layout(smol, 2, 1)
    with pytest.raises(ValueError, match="pipeline size 4 must divide num_hidden_layers=30; possible sizes: 1, 2, 3, 5, 6, 10, 15, 30$"):
        check_layout(smol, 1, 4)


def test_skip_reason_counts_all_wrong_groups():
    def group(rewards, reasons):
        return Group(Prompt("p", "q", "1"), [Sample([1], r, reward=w) for w, r in zip(rewards, reasons)])

    groups = [group([-1, -1], ["length", "stop"]), group([-1, -1], ["length", "length"]), group([1, 1], ["stop", "stop"])]
    text = nothing_to_learn(groups, "one_pair")
    assert text.startswith("2 of 3 groups all wrong, 1 all correct; 3 of 6 samples hit the token limit; OREAL's 1+1")
    assert "1+1" not in nothing_to_learn(groups[2:], "one_pair")


def test_tiny_model_tokenizer_keeps_spaces_and_its_task_ids():
    # transformers 5 would load examples/tiny/model as Qwen2Tokenizer (from config.json's model_type),
    # which drops every space; load_tokenizer honours the folder's generic class. The tiny task's
    # texts have no spaces, so its ids are the same either way.
    from pathlib import Path

    from transformers import AutoTokenizer

    from megatron_oreal.data.templates import load_tokenizer

    model = Path(__file__).resolve().parents[3] / "examples/tiny/model"
    tok = load_tokenizer(model)
    text = "Compute 3 + 4 * 2. The answer is \\boxed{11}"
    assert tok.decode(tok.encode(text)) == text
    auto = AutoTokenizer.from_pretrained(model)
    chat = [{"role": "user", "content": "2-0+7"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == auto.apply_chat_template(chat, add_generation_prompt=True)
    assert tok.encode("2+7=9\\boxed{9}") == auto.encode("2+7=9\\boxed{9}")


def test_top_p_head_shortcut_keeps_the_nucleus_of_a_full_sort():
    from megatron_oreal.rollout.cpu_engine import TOP_P_HEAD, filter_probs

    g = torch.Generator().manual_seed(0)
    vocab = 8 * TOP_P_HEAD
    peaked = torch.randn(3, vocab, generator=g) * 6  # a trained model's peaked rows: the head holds the nucleus
    flat = torch.randn(1, vocab, generator=g) * 0.1  # a flat row: the head cannot; full sort
    for logits in (peaked, flat, torch.cat([peaked, flat])):
        sp = SamplingParams(temperature=1.0, top_p=0.9)
        probs, order = filter_probs(logits, sp)
        ref = torch.softmax(logits, dim=-1)
        kept = torch.zeros_like(ref).scatter_(1, order, (probs > 0).float()).bool()
        srt, idx = torch.sort(ref, dim=-1, descending=True)
        ref_kept = torch.zeros_like(ref).scatter_(1, idx, ((torch.cumsum(srt, -1) - srt) < 0.9).float()).bool()
        assert torch.equal(kept, ref_kept)
        assert torch.allclose(probs.sum(-1), (ref * ref_kept).sum(-1))
