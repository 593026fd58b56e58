"""Write a random tiny Qwen2 (or Llama) HF checkpoint: config.json + safetensors (single or sharded).

Norm weights and biases are randomised (HF initialises them to 1 / 0, which would hide mapping
mistakes), and the default vocabulary (250) is not a multiple of 128, so vocab padding is exercised.

    from helpers.tiny_hf import make_tiny_qwen2
    cfg = make_tiny_qwen2(tmp_path / "hf", tie=True, shards=2)
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file


def randomise_norms_and_biases(model, seed: int) -> None:
    """Norm weights ~ 1 + 0.1 N(0, 1), biases ~ 0.1 N(0, 1), from a generator seeded with seed + 1."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _write(model, config, path, shards: int, tie: bool) -> dict:
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if tie:
        state.pop("lm_head.weight", None)  # save_pretrained omits the tied copy too
    names = sorted(state)
    if shards <= 1:
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            part = names[i::shards]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k] for k in part}, os.path.join(path, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        total = sum(t.numel() * t.element_size() for t in state.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    cfg = config.to_dict()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return cfg


def make_tiny_qwen2(path, *, vocab_size=250, tie=False, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128,
                    seed=0, shards=1, max_position=512) -> dict:
    """Random Qwen2ForCausalLM (fp32) written to `path`; returns the config.json dict."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6,
                         rope_theta=10000.0, tie_word_embeddings=tie, max_position_embeddings=max_position,
                         initializer_range=0.05, bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    config.architectures = ["Qwen2ForCausalLM"]
    model = Qwen2ForCausalLM(config).float()
    randomise_norms_and_biases(model, seed)
    return _write(model, config, str(path), shards, tie)


def make_tiny_llama(path, *, vocab_size=250, tie=False, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128,
                    seed=0, attention_bias=False, shards=1, max_position=512) -> dict:
    """Random LlamaForCausalLM (fp32) written to `path`; returns the config.json dict."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                         rope_theta=500000.0, tie_word_embeddings=tie, attention_bias=attention_bias,
                         max_position_embeddings=max_position, initializer_range=0.05, bos_token_id=1,
                         eos_token_id=2, torch_dtype="float32")
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).float()
    randomise_norms_and_biases(model, seed)
    return _write(model, config, str(path), shards, tie)
