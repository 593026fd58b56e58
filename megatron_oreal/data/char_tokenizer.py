"""A character-level Hugging Face tokenizer for the built-in tiny task.

One token per character of printable ASCII plus newline, and a few special tokens that are single
tokens: pad, unk, `<|im_end|>` (the stop token, as in Qwen's chat format), and one role marker per
chat role. The chat template is the shortest one that keeps roles apart, so a tiny model spends its
few positions on the problem, not on boilerplate:

    [{"role": "user", "content": "1-4*5"}]  ->  <|user|>1-4*5<|assistant|>      (generation prompt)
    ... + assistant "1-20=-19\\boxed{-19}"   ->  ...<|assistant|>1-20=-19\\boxed{-19}<|im_end|>

Built with `tokenizers` (WordLevel over a per-character Split pre-tokenizer, Fuse decoder) and saved
as an HF tokenizer folder that `AutoTokenizer.from_pretrained` loads, with `apply_chat_template`.
"""

from __future__ import annotations

import string
from pathlib import Path

PAD, UNK, EOS = "<|pad|>", "<|unk|>", "<|im_end|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, UNK, EOS, SYSTEM, USER, ASSISTANT]  # ids 0..5, in this order
# Printable ASCII except the other whitespace (\t \r \x0b \x0c), which a math prompt never needs.
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]

# Jinja, rendered by transformers' apply_chat_template. No whitespace between the tags: every
# character is a token. An unknown role is an error rather than silently dropped text.
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}" + SYSTEM + "{{ m['content'] }}"
    "{%- elif m['role'] == 'user' -%}" + USER + "{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}" + ASSISTANT + "{{ m['content'] }}" + EOS + ""
    "{%- else -%}{{ raise_exception('char tokenizer: unknown chat role ' + m['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)


def vocab() -> dict[str, int]:
    toks = SPECIAL_TOKENS + CHARS
    return {t: i for i, t in enumerate(toks)}


def build_tokenizer(model_max_length: int = 512):
    """A `PreTrainedTokenizerFast` with the chat template, eos, pad and unk set."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab(), unk_token=UNK))
    # `[\s\S]` rather than `.`: the regex dot does not match a newline.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate characters back, no spaces in between
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        model_max_length=model_max_length,
        padding_side="left",  # generation pads on the left; training code packs, it does not pad
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(out_dir: str | Path, model_max_length: int = 512) -> Path:
    """Write the tokenizer folder (tokenizer.json, tokenizer_config.json, chat template)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(model_max_length).save_pretrained(str(out))
    return out
