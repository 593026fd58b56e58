"""The character-level tokenizer: one token per character, single-token specials, the chat template."""

import pytest

from megatron_oreal.data import char_tokenizer as ct


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = ct.save_tokenizer(tmp_path_factory.mktemp("tok"))
    return AutoTokenizer.from_pretrained(str(d))  # the saved folder, as a trainer would load it


def test_vocab_layout(tok):
    v = ct.vocab()
    assert len(tok) == len(v) == 6 + 96  # specials + printable ASCII without \t \r \x0b \x0c
    assert [v[t] for t in ct.SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert (tok.pad_token_id, tok.unk_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.eos_token == "<|im_end|>"


def test_one_token_per_character_matches_python_map(tok):
    v = ct.vocab()
    text = "12-5*6=-18\\boxed{-18} x\ny"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [v[c] for c in text]  # the tokenizers pipeline equals a plain char map
    assert tok.decode(ids) == text  # Fuse decoder: no spaces inserted, space and newline kept
    assert tok("a\tb", add_special_tokens=False)["input_ids"] == [v["a"], tok.unk_token_id, v["b"]]


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "1-4*5"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>1-4*5<|assistant|>"
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    v = ct.vocab()
    assert ids == [4, v["1"], v["-"], v["4"], v["*"], v["5"], 5]  # roles are single tokens
    full = msgs + [{"role": "assistant", "content": "1-20=-19\\boxed{-19}"}]
    full_ids = tok.apply_chat_template(full, tokenize=True, return_dict=False)
    assert full_ids[: len(ids)] == ids and full_ids[-1] == tok.eos_token_id
    assert tok.decode(full_ids[len(ids):-1]) == "1-20=-19\\boxed{-19}"
    sys_text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}] + msgs, tokenize=False)
    assert sys_text == "<|system|>Be brief.<|user|>1-4*5"
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_special_tokens_are_not_split(tok):
    ids = tok("<|user|>7<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [4, ct.vocab()["7"], 2]
    assert tok.decode(ids, skip_special_tokens=True) == "7"
