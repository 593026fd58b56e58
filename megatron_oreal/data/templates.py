"""Prompt formatting: the tokenizer's chat template plus the system prompt from `data.system_prompt`.

Each prompt becomes one user message after the system prompt (docs/algorithm.md §4.1). `data.system_prompt`
is a preset name from SYSTEM_PROMPTS or the literal text. "none" passes no system message at all,
so a template that has its own default (Qwen2.5's "You are Qwen...", OREAL's own chat_template)
still inserts it: that is the model's trained format. A model without a chat template (the tiny
character-level task) uses a plain format string such as "{prompt}" instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from megatron_oreal.types import Prompt

# The OREAL SFT system prompt, exactly as the reference chat template renders it: InternLM/OREAL
# oreal/configs/oreal_w_tokenrm_OREAL-7B-SFT_seqlen16k.py, `chat_template`'s `sys_prompt` (the 32B
# and wo_tokenrm configs carry the same text; paper Fig. A4). The "[[8192]]" is in the original.
OREAL_SYSTEM_PROMPT = (
    'You are an expert mathematician with extensive experience in mathematical competitions. You approach problems through systematic thinking and rigorous reasoning. When solving problems, follow these thought processes:\n'
    '\n'
    '## Deep Understanding\n'
    'Take time to fully comprehend the problem before attempting a solution. Consider:\n'
    '- What is the real question being asked?\n'
    '- What are the given conditions and what do they tell us?\n'
    '- Are there any special restrictions or assumptions?\n'
    '- Which information is crucial and which is supplementary?\n'
    '\n'
    '## Multi-angle Analysis\n'
    'Before solving, conduct thorough analysis:\n'
    '- What mathematical concepts and properties are involved?\n'
    '- Can you recall similar classic problems or solution methods?\n'
    '- Would diagrams or tables help visualize the problem?\n'
    '- Are there special cases that need separate consideration?\n'
    '\n'
    '## Systematic Thinking\n'
    'Plan your solution path:\n'
    '- Propose multiple possible approaches\n'
    '- Analyze the feasibility and merits of each method\n'
    '- Choose the most appropriate method and explain why\n'
    '- Break complex problems into smaller, manageable steps\n'
    '\n'
    '## Rigorous Proof\n'
    'During the solution process:\n'
    '- Provide solid justification for each step\n'
    '- Include detailed proofs for key conclusions\n'
    '- Pay attention to logical connections\n'
    '- Be vigilant about potential oversights\n'
    '\n'
    '## Repeated Verification\n'
    'After completing your solution:\n'
    '- Verify your results satisfy all conditions\n'
    '- Check for overlooked special cases\n'
    '- Consider if the solution can be optimized or simplified\n'
    '- Review your reasoning process\n'
    '\n'
    'Remember:\n'
    '1. Take time to think thoroughly rather than rushing to an answer\n'
    '2. Rigorously prove each key conclusion\n'
    '3. Keep an open mind and try different approaches\n'
    '4. Summarize valuable problem-solving methods\n'
    '5. Maintain healthy skepticism and verify multiple times\n'
    '\n'
    'Your response should reflect deep mathematical understanding and precise logical thinking, making your solution path and reasoning clear to others.\n'
    '\n'
    "When you're ready, present your complete solution with:\n"
    '- Clear problem understanding\n'
    '- Detailed solution process\n'
    '- Key insights\n'
    '- Thorough verification\n'
    '\n'
    "Focus on clear, logical progression of ideas and thorough explanation of your mathematical reasoning. Provide answers in the same language as the user asking the question, repeat the final answer using a '\\boxed{}' without any units, you have [[8192]] tokens to complete the answer."
)

SYSTEM_PROMPTS: dict[str, str] = {"oreal": OREAL_SYSTEM_PROMPT, "none": ""}

CHAT = "chat"  # prompt_format value: use the tokenizer's chat template


class TemplateError(ValueError):
    """A prompt cannot be formatted: the message names the tokenizer folder or the format string."""


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of an HF folder, as its tokenizer.json defines it.

    transformers 5 picks the class from config.json's model_type even when tokenizer_config.json names
    the generic fast class: for the tiny model (model_type qwen2) that is Qwen2Tokenizer, which rebuilds
    a byte-level pre-tokenizer over our character vocabulary and silently drops every space. A folder
    that declares the generic class gets the generic class (its tokenizer.json as written)."""
    from transformers import AutoTokenizer
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    tok = AutoTokenizer.from_pretrained(path)
    cfg_file = Path(path) / "tokenizer_config.json"
    declared = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.is_file() else None
    generic = ("TokenizersBackend", "PreTrainedTokenizerFast")
    if declared in generic and type(tok).__name__ not in generic and (Path(path) / "tokenizer.json").is_file():
        tok = TokenizersBackend.from_pretrained(path)
    return tok


def resolve_system_prompt(value: str) -> str:
    """A preset name ("oreal", "none") -> its text; anything else is the literal system prompt."""
    return SYSTEM_PROMPTS.get(value, value)


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def format_prompt(tokenizer: Any, question: str, system_prompt: str = "", prompt_format: str = CHAT) -> str:
    """The prompt text the model sees (before tokenisation).

    prompt_format == "chat": `tokenizer.apply_chat_template` with a system message (when the system
    prompt is not empty) and the question as the user message, plus the generation prompt.
    Otherwise prompt_format is a format string with "{prompt}" (and optionally "{system}").
    """
    system = resolve_system_prompt(system_prompt)
    if prompt_format == CHAT:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                f"tokenizer {_tokenizer_name(tokenizer)!r} has no chat template; add one to its "
                "tokenizer_config.json or use a plain prompt format such as '{prompt}'"
            )
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if "{prompt}" not in prompt_format:
        raise TemplateError(f"prompt format {prompt_format!r} must be 'chat' or contain '{{prompt}}'")
    if system and "{system}" not in prompt_format:
        # Silently dropping a system prompt would train a different task than configured.
        raise TemplateError(
            f"prompt format {prompt_format!r} has no '{{system}}' slot but the system prompt is "
            f"{system_prompt!r}; set data.system_prompt to 'none' or add '{{system}}' to the format"
        )
    try:
        return prompt_format.format(prompt=question, system=system)
    except (KeyError, IndexError, ValueError) as exc:
        raise TemplateError(f"prompt format {prompt_format!r}: {exc!r} (only {{prompt}} and {{system}} are filled)") from None


def apply_template(tokenizer: Any, question: str, system_prompt: str = "", prompt_format: str = CHAT) -> list[int]:
    """Token ids of the formatted prompt. The chat template already carries any BOS/role tokens, so
    no special tokens are added on top (the reference tokenises the rendered template as is)."""
    text = format_prompt(tokenizer, question, system_prompt, prompt_format)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_prompts(prompts: Iterable[Prompt], tokenizer: Any, system_prompt: str = "", prompt_format: str = CHAT) -> None:
    """Fill `input_ids` of each prompt in place (once, at load time; the stream then only indexes)."""
    cache: dict[str, list[int]] = {}
    for p in prompts:
        if p.text not in cache:
            cache[p.text] = apply_template(tokenizer, p.text, system_prompt, prompt_format)
        p.input_ids = list(cache[p.text])
