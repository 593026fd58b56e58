"""Which token ids end a response: eos, the chat template's end-of-turn token, generation_config's ends.

A chat model ends its turn with a template token (`<|im_end|>` for ChatML / Qwen, `<|eot_id|>` for
Llama-3, DeepSeek-R1-Distill's `<｜end▁of▁sentence｜>`), which is not always the tokenizer's eos: a base
tokenizer whose eos is `<|endoftext|>` would otherwise never stop. The reference code hard-codes
`<|im_end|>`; we derive the set from the model folder so any chat model stops where its template says.
`rollout.stop_token_ids` / `--stop-token-ids` replace the derived set entirely (configurable).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# End-of-turn markers of the chat templates we know; one is used only if the template writes it.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<｜end▁of▁sentence｜>", "<|end|>", "<end_of_turn>")


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def default_stop_ids(tokenizer: Any, model_dir: str | Path | None = None) -> list[int]:
    """Sorted stop ids: the tokenizer's eos, every end-of-turn marker its chat template emits (that is a
    single token), and every `eos_token_id` in `model_dir/generation_config.json` (int or list)."""
    stops = set(_ids(getattr(tokenizer, "eos_token_id", None)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        stops.update(vocab[m] for m in END_OF_TURN if m in template and m in vocab)
    if model_dir is not None:
        gen = Path(model_dir) / "generation_config.json"
        if gen.is_file():
            try:
                stops.update(_ids(json.loads(gen.read_text()).get("eos_token_id")))
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{gen}: eos_token_id is not an int or a list of ints ({exc})") from None
    return sorted(stops)
