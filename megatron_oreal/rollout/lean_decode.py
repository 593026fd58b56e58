"""A lean one-token decode step for Llama-family models, reading the `transformers` model's own weights.

Why: an HF forward of one decode step is mostly Python and dispatch overhead at small batches (module
calls, hooks, mask and cache plumbing, kwargs checks: 1.5 ms at 1 row on the tiny model, measured).
This step does the same arithmetic with about a third of the ops: one fused q/k/v matmul, rope on q
and k together from a cos/sin table, attention written directly against the engine's preallocated
(transposed-key) cache, one fused gate/up matmul, residual adds inside addmm. At 128+ rows the
matmuls dominate and the gain shrinks (tests/unit/rollout/bench_cpu_engine.py --step-table). With the
native kernels (megatron_oreal.native; fp32) the attention part, from rotating q and k to the output,
is one C call per layer (`_attend_native`; `grpo` generate 0.80x in an in-process A/B; `_attend` is
the PyTorch code it replaces), and so are each RMSNorm and the SwiGLU (`_norm`, `_swiglu`: a further
0.88x, in-process A/B against their PyTorch ops).

Covered, checked once by `unsupported_reason` (anything else keeps the HF forward; the CPU engine
chooses at construction): exactly `Qwen2ForCausalLM` or `LlamaForCausalLM` (SmolLM2 is Llama) with
their own decoder/attention/MLP/RMSNorm classes, full attention on every layer (no sliding window),
`hidden_act` silu. Biases (Qwen2's q/k/v, Llama's `attention_bias`/`mlp_bias`), tied embeddings,
`head_dim`, GQA and `rms_norm_eps` are read from the modules. Rotary cos/sin come from the model's own
`rotary_emb` module (tabulated once per call over the positions it will see; called every step for
the dynamic/longrope types, whose frequencies follow the positions), so every rope type transformers
implements gives what the HF path gives.

Fusion without copies: the q/k/v (and gate/up) weights are moved once into one contiguous tensor per
layer and the HF Linear parameters are re-pointed at row slices of it (row slices of a row-major
matrix are contiguous). So the HF modules, `update_weights`' in-place copies and anyone else's
in-place writes all land in the fused tensor: nothing to rebuild. If a parameter object or its
storage is replaced (`model.to(...)`, `load_state_dict(assign=True)`, a new nn.Parameter), `refresh`
sees the pointer change and fuses again; the engine calls it at the start of every `generate`.

Results equal the HF forward's up to float round-off: the same formulas in the same order (RMSNorm in
fp32 then cast, bit-equal; fp32 softmax over the additive key mask). What differs in the last bits:
the fused matmuls' blocking, the residual added inside addmm, and the attention scaling applied to q
(with rope) instead of to the scores. The rotate-half sign trick and the roll are exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_oreal import native


def _classes():
    from transformers.models.llama import modeling_llama as ml
    from transformers.models.qwen2 import modeling_qwen2 as mq

    return {
        mq.Qwen2ForCausalLM: (mq.Qwen2DecoderLayer, mq.Qwen2Attention, mq.Qwen2MLP, mq.Qwen2RMSNorm),
        ml.LlamaForCausalLM: (ml.LlamaDecoderLayer, ml.LlamaAttention, ml.LlamaMLP, ml.LlamaRMSNorm),
    }


def unsupported_reason(model) -> str | None:
    """None when `LeanDecoder` computes exactly what `model`'s forward does; else why not (one line)."""
    parts = _classes().get(type(model))
    if parts is None:
        return f"model class {type(model).__name__} (lean decode covers Qwen2ForCausalLM, LlamaForCausalLM)"
    layer_cls, attn_cls, mlp_cls, norm_cls = parts
    cfg = model.config
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(cfg, 'hidden_act', None)!r} (lean decode implements silu)"
    if getattr(cfg, "use_sliding_window", False) or set(getattr(cfg, "layer_types", None) or ["full_attention"]) != {"full_attention"}:
        return "sliding-window attention"
    if int(getattr(cfg, "pretraining_tp", 1) or 1) != 1:
        return f"pretraining_tp {cfg.pretraining_tp}"
    inner = model.model
    if type(inner.norm) is not norm_cls or len(inner.layers) != cfg.num_hidden_layers:
        return "unexpected model structure"
    for i, layer in enumerate(inner.layers):
        if (type(layer) is not layer_cls or type(layer.self_attn) is not attn_cls or type(layer.mlp) is not mlp_cls
                or type(layer.input_layernorm) is not norm_cls or type(layer.post_attention_layernorm) is not norm_cls):
            return f"unexpected module types in layer {i}"
        if getattr(layer.self_attn, "sliding_window", None):
            return f"sliding window on layer {i}"
    return None


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One contiguous weight (and bias) for `linears`, with each Linear's parameters re-pointed at its
    row slice. A mix of biased and unbiased Linears gets zero bias rows for the unbiased ones (only
    used by the lean step; the HF modules keep bias None)."""
    weight = torch.cat([m.weight.detach() for m in linears], dim=0)
    has_bias = any(m.bias is not None for m in linears)
    bias = None
    if has_bias:
        bias = torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[start : start + rows]
        if m.bias is not None:
            m.bias.data = bias[start : start + rows]
        start += rows
    return weight, bias


def _norm(x: torch.Tensor, norm: tuple[torch.Tensor, float], lib=None) -> torch.Tensor:
    """HF Qwen2/Llama RMSNorm, `norm` = (its weight, its eps): fp32 statistics, cast back, then the weight
    (F.rms_norm without a weight is HF's fp32 formula in one op; bit-equal in fp32, measured). fp32 input
    skips the two casts, which would return x itself but still cost a dispatch each. With the native
    kernels (`lib`, fp32 only) one pass (native.rms_norm_forward), equal up to round-off."""
    weight, eps = norm
    if lib is not None and x.is_contiguous() and weight.dtype == torch.float32 and weight.is_contiguous():
        y = torch.empty_like(x)
        lib.rms_norm_forward(x.data_ptr(), weight.data_ptr(), eps, y.data_ptr(), None, x.shape[0], x.shape[1])
        return y
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], None, eps) * weight
    return F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype) * weight


class LeanDecoder:
    """One decode step for all rows: token ids -> last-position logits, appending K/V to the cache."""

    def __init__(self, model):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"LeanDecoder: unsupported {reason}")
        self.model = model
        cfg = model.config
        attn = model.model.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.q_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.scaling = attn.scaling
        self._ptrs: list[int] = []
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None
        self._native = native.kernels()  # None: no compiler, or turned off (the PyTorch `_attend` then)
        self._scratch: torch.Tensor | None = None  # the kernel's per-thread score rows
        self.refresh()

    def _linears(self):
        for layer in self.model.model.layers:
            a, m = layer.self_attn, layer.mlp
            yield from (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)

    def _param_ptrs(self) -> list[int]:
        inner = self.model.model
        others = [n.weight for layer in inner.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        others += [inner.norm.weight, inner.embed_tokens.weight, self.model.lm_head.weight, self.model.lm_head.bias]
        return [t.data_ptr() if t is not None else 0
                for t in [t for lin in self._linears() for t in (lin.weight, lin.bias)] + others]

    def refresh(self) -> None:
        """Re-fuse if any Linear parameter no longer points where the fused/transposed views point, and
        take the step's other tensors again if any was replaced (the step reads them from here, not
        through the modules: nn.Module attribute lookups cost ~40 a step)."""
        if self._ptrs == self._param_ptrs():
            return
        self.layers = []
        for layer in self.model.model.layers:
            a, m = layer.self_attn, layer.mlp
            qkv_w, qkv_b = _fuse([a.q_proj, a.k_proj, a.v_proj])
            gu_w, gu_b = _fuse([m.gate_proj, m.up_proj])
            # transposed views (no copies) so the residual add rides in addmm's C (h + x @ W^T, one op)
            self.layers.append((_norm_of(layer.input_layernorm), qkv_w.t(), qkv_b, gu_w.t(), gu_b, a.o_proj.weight.t(),
                                a.o_proj.bias, _norm_of(layer.post_attention_layernorm), m.down_proj.weight.t(),
                                m.down_proj.bias))
        inner, head = self.model.model, self.model.lm_head
        self._final_norm, self._embed, self._head = _norm_of(inner.norm), inner.embed_tokens.weight, (head.weight, head.bias)
        self._ptrs = self._param_ptrs()

    def _rope(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, Hq+Hkv, D] from the model's own rotary module (any rope type), ready for the step:
        rotate_half(x) * sin == halves-swapped(x) * (sin with its first half negated), exact and fewer
        ops; the query rows also carry the attention scaling (HF scales the scores; same up to round-off)."""
        cos, sin = self.model.model.rotary_emb(h, positions)  # [B, n, D]
        half = self.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        scale = cos.new_ones(self.q_heads + self.kv_heads, 1)
        scale[: self.q_heads] = self.scaling
        return cos.view(-1, 1, self.head_dim) * scale, sin.view(-1, 1, self.head_dim) * scale

    def prepare(self, positions: int) -> None:
        """Before a decode loop whose positions are < `positions`: tabulate cos/sin once (a dozen ops a
        step fewer). Not for "dynamic"/"longrope" rope, whose frequencies follow the positions of each
        call (transformers' dynamic_rope_update): those call the module every step, as HF does."""
        rope_type = str(getattr(self.model.model.rotary_emb, "rope_type", "default"))
        if "dynamic" in rope_type or rope_type == "longrope":
            self._table = None
            return
        weight = self.model.model.embed_tokens.weight
        self._table = self._rope(weight[:1], torch.arange(positions)[None, :])

    def _attend(self, qkv, cos, sin, cache_layer, key_mask) -> torch.Tensor:
        """Rotate q and k, append k and v to the cache, attend: [B, Hq * D] (PyTorch ops)."""
        bsz, dim, hq, hkv = qkv.shape[0], self.head_dim, self.q_heads, self.kv_heads
        qk = qkv[:, : (hq + hkv) * dim].view(bsz, hq + hkv, dim)
        qk = qk * cos + torch.roll(qk, dim // 2, -1) * sin  # roll = halves swapped (5x faster than flip)
        v = qkv[:, (hq + hkv) * dim :].view(bsz, hkv, dim)
        kt, vv = cache_layer.append_step(qk[:, hq:], v)  # [B, Hkv, D, L], [B, Hkv, L, D]
        q = qk[:, :hq].reshape(bsz, hkv, hq // hkv, dim)  # query head h reads kv head h // group
        scores = torch.matmul(q, kt)
        if key_mask is not None:
            scores.add_(key_mask[..., : kt.shape[-1]])
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if probs.dtype != vv.dtype:
            probs = probs.to(vv.dtype)
        return torch.matmul(probs, vv).view(bsz, hq * dim)

    def _attend_native(self, lib, qkv, cos, sin, cache_layer, key_mask) -> torch.Tensor:
        """`_attend` in one fused kernel (native.decode_attention, fp32): the same values up to round-off."""
        bsz = qkv.shape[0]
        if not (qkv.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous()
                and (key_mask is None or (key_mask.stride(-1) == 1 and key_mask.shape[-1] > cache_layer.length))):
            return self._attend(qkv, cos, sin, cache_layer, key_mask)
        kt, v, pos = cache_layer.reserve_step()
        out = qkv.new_empty(bsz, self.q_heads * self.head_dim)
        mask_ptr, mask_stride = (None, 0) if key_mask is None else (key_mask.data_ptr(), key_mask.stride(0))
        threads = torch.get_num_threads()
        cap = kt.shape[-1]
        scratch = self._scratch
        if scratch is None or scratch.numel() < threads * cap:
            scratch = self._scratch = qkv.new_empty(threads * cap)
        lib.decode_attention(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), kt.data_ptr(),
                             v.data_ptr(), mask_ptr, mask_stride, out.data_ptr(), bsz, self.q_heads, self.kv_heads,
                             self.head_dim, pos, cap, scratch.data_ptr(), threads)
        return out

    def step(self, token: torch.Tensor, positions: torch.Tensor, cache_layers, key_mask: torch.Tensor | None) -> torch.Tensor:
        """token, positions [B] (long); cache_layers: the engine's _PreallocLayer per layer (this step's
        K/V are appended at their current length); key_mask additive [B, 1, 1, >= length+1], or None
        when it would be all zeros (adding zeros changes no bit of the softmax: only a -0.0 score
        becomes +0.0, and exp treats them alike). Returns logits [B, V] of the new token's position."""
        h = F.embedding(token, self._embed)
        if self._table is not None:
            cos, sin = self._table[0].index_select(0, positions), self._table[1].index_select(0, positions)
        else:
            cos, sin = self._rope(h, positions[:, None])
        native = self._native if h.dtype == torch.float32 else None
        for (in_norm, qkv_wt, qkv_b, gu_wt, gu_b, o_wt, o_b, post_norm, down_wt, down_b), cl in zip(self.layers, cache_layers):
            x = _norm(h, in_norm, native)
            qkv = torch.addmm(qkv_b, x, qkv_wt) if qkv_b is not None else torch.mm(x, qkv_wt)
            if native is not None:
                out = self._attend_native(native, qkv, cos, sin, cl, key_mask)
            else:
                out = self._attend(qkv, cos, sin, cl, key_mask)
            h = _residual(h, out, o_wt, o_b)
            x = _norm(h, post_norm, native)
            gu = torch.addmm(gu_b, x, gu_wt) if gu_b is not None else torch.mm(x, gu_wt)
            h = _residual(h, _swiglu(gu, native), down_wt, down_b)
        h = _norm(h, self._final_norm, native)
        return F.linear(h, *self._head)


def _swiglu(gu: torch.Tensor, lib=None) -> torch.Tensor:
    """silu(gate) * up for gu [B, 2I] = [gate | up]; with the native kernels (fp32) one pass."""
    inter = gu.shape[1] // 2
    if lib is not None and gu.is_contiguous():
        out = gu.new_empty(gu.shape[0], inter)
        lib.swiglu_forward(gu.data_ptr(), out.data_ptr(), gu.shape[0], inter)
        return out
    return F.silu(gu[:, :inter]).mul_(gu[:, inter:])


def _norm_of(module) -> tuple[torch.Tensor, float]:
    return module.weight, module.variance_epsilon


def _residual(h: torch.Tensor, x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """h + (x @ W^T + bias), as HF adds them (the Linear first, then the residual)."""
    if bias is None:
        return torch.addmm(h, x, wt)
    return h + torch.addmm(bias, x, wt)
