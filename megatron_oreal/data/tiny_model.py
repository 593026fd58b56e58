"""The embedded default's starting point: a randomly initialised tiny Qwen2 with the character tokenizer.

Written as a normal Hugging Face folder (config.json, generation_config.json, model.safetensors,
tokenizer files), so every later stage (SFT, RL, export, eval) treats it like a real checkpoint.
The default size (~0.6 M parameters: 4 layers, hidden 128, GQA 4/2 heads) was calibrated so that SFT
then RL on the arithmetic task runs on 2 CPU cores in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TinySize:
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 256
    max_position: int = 512
    tie: bool = True


def make_random_tiny_model(out_dir: str | Path, *, seed: int = 0, size: TinySize = TinySize()) -> Path:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from megatron_oreal.data.char_tokenizer import build_tokenizer

    out = Path(out_dir)
    tok = build_tokenizer(model_max_length=size.max_position)
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=size.hidden, intermediate_size=size.ffn,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        max_position_embeddings=size.max_position, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=size.tie, bos_token_id=None, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
