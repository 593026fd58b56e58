"""Chat templates and system prompts: the exact OREAL text, presets vs literal text, the plain
format for tokenizers without a chat template, and clear errors."""

import hashlib

import pytest
from transformers import AutoTokenizer

from megatron_oreal.data.char_tokenizer import build_tokenizer, save_tokenizer
from megatron_oreal.data.templates import (
    OREAL_SYSTEM_PROMPT,
    SYSTEM_PROMPTS,
    TemplateError,
    apply_template,
    format_prompt,
    resolve_system_prompt,
    tokenize_prompts,
)
from megatron_oreal.types import Prompt


def test_oreal_system_prompt_is_the_reference_text():
    # sha256 of the system prompt rendered from InternLM/OREAL's OREAL-7B-SFT chat_template (jinja2).
    digest = hashlib.sha256(OREAL_SYSTEM_PROMPT.encode()).hexdigest()
    assert digest == "c62fc0ae96f67b2bb9f77245fed02bb236d8cda1ffe5e75e9f0d31ca74857622"
    assert OREAL_SYSTEM_PROMPT.startswith("You are an expert mathematician with extensive experience")
    assert "repeat the final answer using a '\\boxed{}' without any units, you have [[8192]] tokens" in OREAL_SYSTEM_PROMPT
    assert SYSTEM_PROMPTS["oreal"] is OREAL_SYSTEM_PROMPT and SYSTEM_PROMPTS["none"] == ""
    assert resolve_system_prompt("oreal") == OREAL_SYSTEM_PROMPT
    assert resolve_system_prompt("Think step by step.") == "Think step by step."


def test_chat_template_with_and_without_system_prompt():
    tok = build_tokenizer()
    assert format_prompt(tok, "1+2", "none") == "<|user|>1+2<|assistant|>"
    assert format_prompt(tok, "1+2", "Be brief.") == "<|system|>Be brief.<|user|>1+2<|assistant|>"
    text = format_prompt(tok, "1+2", "oreal")
    assert text == "<|system|>" + OREAL_SYSTEM_PROMPT + "<|user|>1+2<|assistant|>"
    ids = apply_template(tok, "1+2", "none")
    assert ids == [tok.convert_tokens_to_ids(t) for t in ["<|user|>", "1", "+", "2", "<|assistant|>"]]
    prompts = [Prompt(uid="a", text="1+2", gold="3"), Prompt(uid="b", text="1+2", gold="3")]
    tokenize_prompts(prompts, tok, "none")
    assert prompts[0].input_ids == prompts[1].input_ids == ids and prompts[0].input_ids is not prompts[1].input_ids


def test_plain_format_and_errors(tmp_path):
    folder = save_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = None
    with pytest.raises(TemplateError, match=f"tokenizer '{folder}' has no chat template"):
        apply_template(tok, "1+2", "none")
    assert tok.decode(apply_template(tok, "1+2", "none", "{prompt}\n")) == "1+2\n"
    assert format_prompt(tok, "1+2", "Sys", "{system}|{prompt}") == "Sys|1+2"
    with pytest.raises(TemplateError, match="no '\\{system\\}' slot but the system prompt is 'oreal'"):
        format_prompt(tok, "1+2", "oreal", "{prompt}")
    with pytest.raises(TemplateError, match="must be 'chat' or contain '\\{prompt\\}'"):
        format_prompt(tok, "1+2", "none", "Q: {question}")
    with pytest.raises(TemplateError, match="only \\{prompt\\} and \\{system\\} are filled"):
        format_prompt(tok, "1+2", "none", "{prompt} {answer}")
