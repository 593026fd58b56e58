"""HF <-> Megatron mapping tables: names, layouts, and the reshapes between them.

One declarative table (torchtitan's state_dict_adapter style, STYLE.md "Conversion as tables")
serves import (hf_io.load_hf_weights), export and weight sync (gather.iter_hf_tensors).
Qwen2ForCausalLM and LlamaForCausalLM share HF module names; they differ only in the q/k/v biases
(ArchSpec.qkv_bias), so both use the same table.

Layouts (Megatron-Core 0.16.1; the logits-parity and round-trip tests check them):
- qkv: linear_qkv rows are grouped per query group g: [q heads of g (per*hd rows); k_g (hd); v_g (hd)]
  (megatron/core/transformer/attention.py SelfAttention.get_query_key_value_tensors splits
  [ng, (per+2)*hd] in this order). TP shards whole groups: rank r holds groups [r*ng/tp, (r+1)*ng/tp).
- gate_up: linear_fc1 = [gate; up]; TP rank r holds [gate_r; up_r] (not a contiguous slice of the
  full fc1): megatron/core/transformer/mlp.py glu() chunks the local output in two.
- vocab: embedding / output layer rows padded to ArchSpec.padded_vocab_size, split by rows.
- row: linear_proj / linear_fc2 split along dim 1. column: dim 0. replicated: norms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# (Megatron name candidates inside a decoder layer, HF names inside `model.layers.{i}.`, kind).
# The first Megatron name is the local spec's; the second the Transformer Engine spec's, where the
# norms are fused into the following linear layer (TE LayerNormLinear `layer_norm_weight`).
LAYER_TABLE: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"), ("input_layernorm.weight",), "replicated"),
    (("self_attention.linear_qkv.weight",),
     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
    (("self_attention.linear_qkv.bias",),
     ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv"),
    (("self_attention.linear_proj.weight",), ("self_attn.o_proj.weight",), "row"),
    (("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"), ("post_attention_layernorm.weight",), "replicated"),
    (("mlp.linear_fc1.weight",), ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    (("mlp.linear_fc2.weight",), ("mlp.down_proj.weight",), "row"),
]
EMBEDDING = ("embedding.word_embeddings.weight", "model.embed_tokens.weight")
FINAL_NORM = ("decoder.final_layernorm.weight", "model.norm.weight")
OUTPUT = ("output_layer.weight", "lm_head.weight")

TABLES = {"Qwen2ForCausalLM": LAYER_TABLE, "LlamaForCausalLM": LAYER_TABLE}


@dataclass(frozen=True)
class Entry:
    mcore: str  # parameter name inside this stage's (unwrapped) GPTModel
    hf: tuple[str, ...]  # HF tensor names it is built from
    kind: str  # qkv | gate_up | vocab | row | column | replicated
    export: bool = True  # False for the tied output layer copy on the last PP stage


def stage_entries(spec, stage: int, pp: int, *, te_names: bool = False, token_rm: bool = False) -> list[Entry]:
    """Entries for PP stage `stage`, in a fixed order every rank computes identically."""
    table = TABLES[spec.architecture]
    per_stage = spec.num_layers // pp
    out: list[Entry] = []
    if stage == 0:
        out.append(Entry(EMBEDDING[0], (EMBEDDING[1],), "vocab"))
    for j in range(per_stage):
        i = stage * per_stage + j  # Megatron numbers layers locally per stage; HF globally
        for mnames, hnames, kind in table:
            if kind == "qkv" and mnames[0].endswith("bias") and not spec.qkv_bias:
                continue
            mname = mnames[1] if te_names and len(mnames) > 1 else mnames[0]
            out.append(Entry(f"decoder.layers.{j}.{mname}", tuple(f"model.layers.{i}.{h}" for h in hnames), kind))
    if stage == pp - 1:
        out.append(Entry(FINAL_NORM[0], (FINAL_NORM[1],), "replicated"))
        if not token_rm:
            if not spec.tied:
                out.append(Entry(OUTPUT[0], (OUTPUT[1],), "vocab"))
            elif pp > 1:
                # Tied with PP>1: the last stage keeps its own copy of the embedding (Megatron
                # LanguageModule.setup_embeddings_and_output_layer); load it, never export it twice.
                out.append(Entry(OUTPUT[0], (EMBEDDING[1],), "vocab", export=False))
    return out


def hf_shapes(spec) -> dict[str, tuple[int, ...]]:
    """Expected full HF shape of every tensor name suffix (for clear errors and bucket planning)."""
    H, hd = spec.hidden, spec.head_dim
    q, kv = spec.heads * hd, spec.kv_heads * hd
    return {
        "self_attn.q_proj.weight": (q, H), "self_attn.k_proj.weight": (kv, H), "self_attn.v_proj.weight": (kv, H),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (H, q),
        "mlp.gate_proj.weight": (spec.ffn, H), "mlp.up_proj.weight": (spec.ffn, H), "mlp.down_proj.weight": (H, spec.ffn),
        "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
        "model.embed_tokens.weight": (spec.vocab_size, H), "lm_head.weight": (spec.vocab_size, H),
        "model.norm.weight": (H,),
    }


def hf_shape(spec, name: str) -> tuple[int, ...]:
    shapes = hf_shapes(spec)
    if name in shapes:
        return shapes[name]
    suffix = name.split(".", 3)[-1]  # model.layers.{i}.<suffix>
    return shapes[suffix]


# ---------------------------------------------------------------- HF -> one TP shard (load)
def shard_from_hf(entry: Entry, spec, tp: int, rank: int, read) -> torch.Tensor:
    """Build this TP rank's Megatron tensor. `read(hf_name, rows=None, cols=None)` returns the
    (sliced) HF tensor, so each rank reads only the rows/columns it owns."""
    if entry.kind == "replicated":
        return read(entry.hf[0])
    if entry.kind == "row":
        cols = hf_shape(spec, entry.hf[0])[1] // tp
        return read(entry.hf[0], cols=(rank * cols, (rank + 1) * cols))
    if entry.kind == "column":
        rows = hf_shape(spec, entry.hf[0])[0] // tp
        return read(entry.hf[0], rows=(rank * rows, (rank + 1) * rows))
    if entry.kind == "gate_up":
        f = spec.ffn // tp
        return torch.cat([read(n, rows=(rank * f, (rank + 1) * f)) for n in entry.hf], 0)
    if entry.kind == "qkv":
        hd, ng = spec.head_dim, spec.kv_heads // tp
        per = spec.heads // spec.kv_heads
        q = read(entry.hf[0], rows=(rank * ng * per * hd, (rank + 1) * ng * per * hd))
        k = read(entry.hf[1], rows=(rank * ng * hd, (rank + 1) * ng * hd))
        v = read(entry.hf[2], rows=(rank * ng * hd, (rank + 1) * ng * hd))
        tail = q.shape[1:]
        return torch.cat([q.reshape(ng, per * hd, *tail), k.reshape(ng, hd, *tail), v.reshape(ng, hd, *tail)], 1
                         ).reshape(-1, *tail)
    if entry.kind == "vocab":
        rows = spec.padded_vocab_size // tp
        lo, hi = rank * rows, (rank + 1) * rows
        real = read(entry.hf[0], rows=(min(lo, spec.vocab_size), min(hi, spec.vocab_size)))
        if real.shape[0] == rows:
            return real
        pad = torch.zeros(rows - real.shape[0], *real.shape[1:], dtype=real.dtype)  # padding rows: zero
        return torch.cat([real, pad], 0)
    raise ValueError(f"unknown mapping kind {entry.kind!r} for {entry.mcore}")


# ---------------------------------------------------------------- TP shards -> HF (export/sync)
def hf_from_shards(entry: Entry, spec, shards: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Combine the TP shards (in TP-rank order) of one Megatron tensor into its HF tensors."""
    tp = len(shards)
    if entry.kind == "replicated":
        return [(entry.hf[0], shards[0])]
    if entry.kind == "row":
        return [(entry.hf[0], torch.cat(shards, 1))]
    if entry.kind == "column":
        return [(entry.hf[0], torch.cat(shards, 0))]
    if entry.kind == "gate_up":
        halves = [s.chunk(2, 0) for s in shards]
        return [(entry.hf[0], torch.cat([h[0] for h in halves], 0)), (entry.hf[1], torch.cat([h[1] for h in halves], 0))]
    if entry.kind == "qkv":
        hd, ng = spec.head_dim, spec.kv_heads // tp
        per = spec.heads // spec.kv_heads
        qs, ks, vs = [], [], []
        for s in shards:
            tail = s.shape[1:]
            g = s.reshape(ng, (per + 2) * hd, *tail)
            qs.append(g[:, : per * hd].reshape(-1, *tail))
            ks.append(g[:, per * hd : (per + 1) * hd].reshape(-1, *tail))
            vs.append(g[:, (per + 1) * hd :].reshape(-1, *tail))
        return [(entry.hf[0], torch.cat(qs, 0)), (entry.hf[1], torch.cat(ks, 0)), (entry.hf[2], torch.cat(vs, 0))]
    if entry.kind == "vocab":
        return [(entry.hf[0], torch.cat(shards, 0)[: spec.vocab_size])]  # strip the padding rows
    raise ValueError(f"unknown mapping kind {entry.kind!r} for {entry.mcore}")


def all_entries(spec, pp: int, *, te_names: bool = False, token_rm: bool = False) -> list[list[Entry]]:
    return [stage_entries(spec, s, pp, te_names=te_names, token_rm=token_rm) for s in range(pp)]


def uses_te_names(model) -> bool:
    """Whether this model's layers use the TE spec's fused-norm parameter names."""
    return any(n.endswith("linear_qkv.layer_norm_weight") for n, _ in model.named_parameters())
