"""A lean forward for packed rows on the CPU path: the same model and parameters, fewer and cheaper ops.

Why: at TP = PP = 1 on a CPU the decoder's own arithmetic is small (the tiny model's 128-wide layers)
and what Megatron's generic layer code adds around it shows up in the step time: a per-layer RoPE
table (cos, sin, a cat each), autograd's zero-filled gradients for every slice of the fused q/k/v and
gate/up outputs, a composite RMSNorm backward, separate residual adds, flash attention tuned for long
sequences (at head dim 32 and ~25-position slots a plain batched matmul is twice as fast). Measured on
the tiny model with a real `grpo` micro-batch (2.1 k row positions, 128 sequences sharing 16
prompts), 2 threads: forward 40.6 -> 30.8 ms, forward + backward 122 -> 99 ms (README, "Measured",
has the whole-step figures).

`lean_forward(model, input_ids, params)` computes exactly what `GPTModel.forward` computes for the
row (logits [1, L, V] or the token RM's scores [1, L, 1]) up to float round-off, on the model's own
parameter objects, so DDP's gradient hooks, the optimizer and ReferenceWeights see no difference:
- embedding, final norm and output layer are the model's modules, called as Megatron calls them;
- each layer is RMSNorm -> fused q/k/v matmul -> RoPE on q and k by each token's position in its
  sequence -> causal attention within each slot (packing.py's slots) -> output projection with the
  residual added inside addmm -> RMSNorm -> fc1 -> SwiGLU -> fc2 with the residual added inside addmm;
- autograd Functions (`_RMSNorm`, `_SwiGLU`, `_SlotAttention` / `_NativeSlotAttention`) have
  hand-written backwards that write each gradient once, where autograd would zero-fill and
  accumulate per slice.

Two implementations of the elementwise and attention parts, chosen per call:
- the native kernels (megatron_oreal.native, C compiled on first use) when they load and the
  tensors are contiguous fp32: RMSNorm, SwiGLU and the RoPE rotation in one pass each, and
  `_NativeSlotAttention`, which attends each slot query by query without materialising the padded
  buckets (`native_slot_plan`). Measured on a `grpo` row (2.1 k positions, 128 slots of 16 shared
  prompts), one layer's attention forward + backward 5.2 -> 3.3 ms; the whole `grpo` update 0.88x
  (in process, calls alternating between the two implementations);
- otherwise the PyTorch code: `_SlotAttention` over cpu_attention.slot_layout's length buckets
  with batched matmuls, torch's RMSNorm and silu. The same values up to float round-off
  (tests/unit/test_native.py).

`unsupported_reason(model)` says why a model is not covered (None when it is); LocalGPTModel falls
back to Megatron's forward then, and for any call this path does not take (see `LocalGPTModel`).
Tests: tests/unit/mcore/test_lean_forward.py compares logits and every parameter gradient with
Megatron's forward on the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_oreal import native

Tensor = torch.Tensor


def _kernels(*tensors: Tensor):
    """The native kernel library when every tensor is a contiguous fp32 CPU tensor, else None."""
    lib = native.kernels()
    if lib is None:
        return None
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            return None
    return lib


class _RMSNorm(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * w over the last dim; x [N, H]. With the native kernels, one pass
    each way; otherwise the forward is torch.nn.RMSNorm's own fused kernel (which also returns rsqrt)
    and the backward 7 ops instead of the composite's ~12."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        lib = _kernels(x, weight)
        if lib is not None:  # one pass per row (native.rms_norm_forward)
            y, rstd = torch.empty_like(x), x.new_empty(x.shape[0], 1)
            lib.rms_norm_forward(x.data_ptr(), weight.data_ptr(), eps, y.data_ptr(), rstd.data_ptr(), x.shape[0],
                                 x.shape[1])
        else:
            y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, rstd, weight = ctx.saved_tensors
        grad = grad.contiguous()
        lib = _kernels(grad, x, rstd, weight)
        if lib is not None:  # dx and dweight in one pass over the rows (native.rms_norm_backward)
            dx, dweight = torch.empty_like(x), torch.empty_like(weight)
            threads = torch.get_num_threads()
            scratch = x.new_empty(threads, x.shape[1])
            lib.rms_norm_backward(grad.data_ptr(), x.data_ptr(), rstd.data_ptr(), weight.data_ptr(), dx.data_ptr(),
                                  dweight.data_ptr(), scratch.data_ptr(), threads, x.shape[0], x.shape[1])
            return dx, dweight, None
        xhat = x * rstd
        gw = grad * weight
        dweight = (grad * xhat).sum(0)
        # d/dx of xhat: (gw - xhat * mean(gw * xhat)) * rstd
        dx = gw.sub_(xhat * (gw * xhat).mean(-1, keepdim=True)).mul_(rstd)
        return dx, dweight, None


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up for fc1's output [N, 2F] = [gate; up] (Megatron's gated linear unit layout).
    The backward writes both halves of one [N, 2F] gradient (autograd would concatenate two) and
    reuses the forward's silu(gate) (kept only when a backward will run)."""

    @staticmethod
    def forward(ctx, fc1: Tensor) -> Tensor:
        lib = _kernels(fc1)
        if lib is not None:  # one pass; the backward recomputes silu(gate) (native.swiglu_*)
            out = fc1.new_empty(fc1.shape[0], fc1.shape[1] // 2)
            lib.swiglu_forward(fc1.data_ptr(), out.data_ptr(), fc1.shape[0], out.shape[1])
            if ctx.needs_input_grad[0]:
                ctx.save_for_backward(fc1)
                ctx.lib = lib
            return out
        gate, up = fc1.chunk(2, dim=-1)
        act = F.silu(gate)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(fc1, act)
            return act * up
        return act.mul_(up)

    @staticmethod
    def backward(ctx, grad: Tensor):
        fc1, *act = ctx.saved_tensors
        grad = grad.contiguous()
        if not act:  # the native forward ran
            out = torch.empty_like(fc1)
            ctx.lib.swiglu_backward(grad.data_ptr(), fc1.data_ptr(), out.data_ptr(), fc1.shape[0],
                                             grad.shape[1])
            return out
        act = act[0]
        gate, up = fc1.chunk(2, dim=-1)
        out = torch.empty_like(fc1)
        dgate, dup = out.chunk(2, dim=-1)
        torch.mul(grad, up, out=dup)  # scratch: d(silu(gate)) = grad * up
        torch.ops.aten.silu_backward.grad_input(dup, gate, grad_input=dgate)
        torch.mul(act, grad, out=dup)
        return out


def rope_tables(cos: Tensor, sin: Tensor, groups: int, per_group: int) -> tuple[Tensor, Tensor]:
    """Row-wise RoPE tables [N, groups * (per_group + 2) * D] for the fused q/k/v rows, from each row's
    cos/sin [N, D/2]: the rotate-half form x * cos + rotate_half(x) * sin as `_rotate`'s
    x * C + halves_swapped(x) * S, with C = [cos, cos] and S = [-sin, sin] on the query and key heads
    and C = 1, S = 0 on the value head (x * 1 + y * 0 == x for finite values). Whole-row tables keep
    the rotation three contiguous passes, where per-head broadcasting over 16-wide halves was slow."""
    n = cos.shape[0]
    c = torch.cat((cos, cos), -1)[:, None, None]
    s = torch.cat((-sin, sin), -1)[:, None, None]
    big_c = cos.new_empty(n, groups, per_group + 2, c.shape[-1])
    big_s = torch.empty_like(big_c)
    big_c[:, :, : per_group + 1] = c
    big_c[:, :, per_group + 1] = 1.0
    big_s[:, :, : per_group + 1] = s
    big_s[:, :, per_group + 1] = 0.0
    return big_c.view(n, -1), big_s.view(n, -1)


def _rotate(src: Tensor, tables: tuple[Tensor, Tensor], head_dim: int, sign: float, out: Tensor) -> None:
    """out = RoPE of the fused q/k/v rows src [N, F] by `rope_tables` (v passes through); sign -1
    rotates back (the backward of a rotation is the rotation by the opposite angle)."""
    big_c, big_s = tables
    n = src.shape[0]
    lib = _kernels(big_c, big_s)
    if (lib is not None and src.dtype == out.dtype == torch.float32 and src.stride(1) == 1 == out.stride(1)
            and src.shape == out.shape == big_c.shape):
        lib.rope_rotate(src.data_ptr(), src.stride(0), big_c.data_ptr(), big_s.data_ptr(), sign, out.data_ptr(),
                        out.stride(0), n, src.shape[1], head_dim)
        return
    swapped = src.view(n, -1, 2, head_dim // 2).roll(1, dims=2).view(n, -1)  # the halves of each head swapped
    torch.mul(src, big_c, out=out)
    out.addcmul_(swapped, big_s, value=sign)


_MASKS: dict[tuple, Tensor] = {}


def _causal_bias(width: int, repeat: int, dtype: torch.dtype, device) -> Tensor:
    """Additive causal mask [repeat * width, width] (0 on and below the diagonal, -inf above), the
    same for each of the `repeat` query heads stacked on a key/value head (GQA). Cached: widths are
    bounded by the longest sequence."""
    key = (width, repeat, dtype, str(device))
    mask = _MASKS.get(key)
    if mask is None:
        upper = torch.ones(width, width, dtype=torch.bool, device=device).triu(1)
        mask = torch.zeros(width, width, dtype=dtype, device=device).masked_fill(upper, float("-inf"))
        mask = _MASKS[key] = mask.repeat(repeat, 1)
    return mask


def slot_index(layout, n_rows: int, groups: int, per_group: int) -> tuple[list, Tensor, int]:
    """Flat indices that let `_SlotAttention` gather and scatter head vectors directly, from
    cpu_attention.slot_layout's (buckets, read) for a row of `n_rows` positions.

    The rotated q/k/v rows [N + 1, G, R + 2, D] are read as one [(N + 1) * G * (R + 2), D] table of
    head vectors (row N: the zero pad row). Per bucket (gather [n * w], n slots, width w):
    - q [n * G * R * w] indexes the queries in [n * G, R * w, D] order (slot, group, head, position),
      k and v [n * G * w] the keys and values in [n * G, w, D] order;
    - the bucket's attention output [n * G, R * w, D] lands at `base` in one [total, D] buffer.
    `out` [N * G * R] reads each row position's G * R head outputs back from that buffer, from the
    first slot holding it (`read`). One index_select per tensor replaces a gather of whole rows
    followed by a permuting copy per q, k, v and per output. Measured, with the same bits out: one
    layer's attention forward 1.2-2.6 -> 1.0-1.3 ms on a `grpo` row; the `grpo` update -3.4 % (in-process,
    alternating calls); the demo's `train` 26.5-28 -> 24-26 s (runs alternating with the old code).
    Returns ([(q, k, v, n, w, base)], out, total)."""
    buckets, read = layout
    r, stride = per_group, per_group + 2
    group_off = (torch.arange(groups) * stride).view(1, groups, 1, 1)
    heads = torch.arange(r).view(1, 1, r, 1)
    index, starts, base, pos = [], [], 0, 0
    for gather, n, w in buckets:
        first = gather.view(n, 1, 1, w) * (groups * stride) + group_off  # [n, G, 1, w]
        index.append(((first + heads).reshape(-1), (first + r).reshape(-1), (first + r + 1).reshape(-1), n, w, base))
        starts.append((pos, n, w, base))
        pos += n * w
        base += n * groups * r * w
    out = torch.empty(n_rows, groups, r, dtype=torch.long)
    head_rank = (torch.arange(groups).view(1, groups, 1) * r + torch.arange(r).view(1, 1, r))  # g * R + h
    for start, n, w, b in starts:
        mine = (read >= start) & (read < start + n * w)
        p = read[mine] - start
        slot, position = p.div(w, rounding_mode="floor"), p % w
        # element [slot, g, h, position] of the bucket's [n, G, R, w] outputs
        out[mine] = b + (slot.view(-1, 1, 1) * (groups * r) + head_rank) * w + position.view(-1, 1, 1)
    return index, out.view(-1), base


class _SlotAttention(torch.autograd.Function):
    """Causal attention of every slot of a packed row, from the fused q/k/v projection.

    qkv [N, G * (R + 2) * D] is Megatron's layout (per key/value group: R query heads, then its key,
    then its value; R = heads per group). q and k are rotated by `rope_tables`, then each bucket's
    queries [n * G, R * w, D] and keys/values [n * G, w, D] are gathered head vector by head vector
    (`slot_index`; index N reads a zero pad row): the R query heads of a group share one batched
    matmul with its key and value (GQA without repeating them). The outputs are read back to row
    order, a shared prompt's positions from their first slot. Output [N, heads * D], heads in
    Megatron's order (group-major). Padded queries attend only to their own slot's positions and the
    zero pad row, and their outputs are never read (cpu_attention's module docstring).
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, tables: tuple[Tensor, Tensor], index, groups: int, per_group: int,
                head_dim: int, scale: float) -> Tensor:
        buckets, read, total = index
        n_rows, r, d = qkv.shape[0], per_group, head_dim
        rows = qkv.new_empty(n_rows + 1, groups * (r + 2) * d)
        rows[n_rows].zero_()
        _rotate(qkv, tables, d, 1.0, out=rows[:n_rows])
        vectors = rows.view(-1, d)
        outs = qkv.new_empty(total, d)
        saved = []
        for q_idx, k_idx, v_idx, n, w, base in buckets:
            q = vectors.index_select(0, q_idx).view(n * groups, r * w, d)
            k = vectors.index_select(0, k_idx).view(n * groups, w, d)
            v = vectors.index_select(0, v_idx).view(n * groups, w, d)
            bias = _causal_bias(w, r, qkv.dtype, qkv.device).expand(n * groups, -1, -1)
            probs = torch.softmax(torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale), dim=-1)
            torch.bmm(probs, v, out=outs[base: base + n * groups * r * w].view(n * groups, r * w, d))
            saved += [q, k, v, probs]
        ctx.save_for_backward(*tables, *saved)
        ctx.meta = (index, groups, r, d, scale, n_rows)
        return outs.index_select(0, read).view(n_rows, groups * r * d)

    @staticmethod
    def backward(ctx, grad: Tensor):
        big_c, big_s, *saved = ctx.saved_tensors
        (buckets, read, total), groups, r, d, scale, n_rows = ctx.meta
        douts = grad.new_zeros(total, d)  # slot positions not read (pads, repeated prompts) get 0
        douts.index_copy_(0, read, grad.reshape(-1, d))
        dvectors = grad.new_zeros((n_rows + 1) * groups * (r + 2), d)
        for i, (q_idx, k_idx, v_idx, n, w, base) in enumerate(buckets):
            q, k, v, probs = saved[4 * i: 4 * i + 4]
            dout = douts[base: base + n * groups * r * w].view(n * groups, r * w, d)
            dv = torch.bmm(probs.transpose(1, 2), dout)
            dscores = torch._softmax_backward_data(torch.bmm(dout, v.transpose(1, 2)), probs, -1, probs.dtype)
            dscores.mul_(scale)
            dq, dk = torch.bmm(dscores, k), torch.bmm(dscores.transpose(1, 2), q)
            # a shared prompt's slots sum their key/value gradients into its one copy
            dvectors.index_add_(0, q_idx, dq.view(-1, d))
            dvectors.index_add_(0, k_idx, dk.view(-1, d))
            dvectors.index_add_(0, v_idx, dv.view(-1, d))
        dqkv = grad.new_empty(n_rows, groups * (r + 2) * d)
        _rotate(dvectors.view(n_rows + 1, -1)[:n_rows], (big_c, big_s), d, -1.0, out=dqkv)
        return dqkv, None, None, None, None, None, None


def native_slot_plan(slots: Tensor, cu_seqlens: Tensor, length: int) -> tuple:
    """What native.slot_attention_* need to know about a row's slots (see cpu_kernels.c):
    (slots int32 [S, W], slot lengths int32 [S], owner uint8 [S, W], segment starts int32 [n + 1]).

    A position's owner is the first slot holding it; segments are the runs of slots whose positions
    lie in the same `cu_seqlens` segment (a prompt and its responses; a trailing pad slot is its own).
    Raises ValueError if a slot spans two segments or a segment's slots are not consecutive: the kernels
    would then race on the shared positions (packing.py never builds such rows)."""
    slots = slots.to(torch.long)
    n_slots, width = slots.shape
    valid = slots < length
    slot_id = torch.arange(n_slots).view(-1, 1).expand(n_slots, width)
    first = torch.full((length + 1,), n_slots, dtype=torch.long)
    first.scatter_reduce_(0, slots.reshape(-1), slot_id.reshape(-1), reduce="amin")
    owner = (first[slots] == slot_id) & valid
    seg_of = torch.searchsorted(cu_seqlens.to(torch.long)[1:], slots.clamp(max=length - 1), right=True)
    seg = seg_of[:, 0]
    if bool(((seg_of != seg[:, None]) & valid).any()) or bool((seg[1:] < seg[:-1]).any()):
        raise ValueError("native_slot_plan: a slot spans two segments, or a segment's slots are not consecutive")
    if bool((first[:length] == n_slots).any()):
        raise ValueError("native_slot_plan: a row position is in no slot")
    starts = torch.nonzero(torch.cat([torch.ones(1, dtype=torch.bool), seg[1:] != seg[:-1]])).view(-1)
    seg_starts = torch.cat([starts, torch.tensor([n_slots])]).to(torch.int32)
    return (slots.to(torch.int32).contiguous(), valid.sum(1).to(torch.int32), owner.to(torch.uint8).contiguous(),
            seg_starts)


class _NativeSlotAttention(torch.autograd.Function):
    """`_SlotAttention`'s result from native.slot_attention_forward/backward (fp32 CPU): each query of
    each slot attends in one pass, the scores never leave the cache, a shared prompt's queries are
    computed once (by their owner slot) and the backward recomputes the probabilities from the saved
    log-sum-exp. Same values up to float round-off; `plan` is `native_slot_plan`'s."""

    @staticmethod
    def forward(ctx, qkv: Tensor, tables: tuple[Tensor, Tensor], plan, groups: int, per_group: int,
                head_dim: int, scale: float) -> Tensor:
        lib = native.kernels()
        slots, lens, owner, segs = plan
        n_rows, width = qkv.shape[0], slots.shape[1]
        rows = torch.empty_like(qkv)
        _rotate(qkv, tables, head_dim, 1.0, out=rows)
        out = qkv.new_empty(n_rows, groups * per_group * head_dim)
        lse = qkv.new_empty(n_rows, groups * per_group)
        threads = torch.get_num_threads()
        scratch = qkv.new_empty(threads, lib.slot_scratch_floats(width, head_dim))
        lib.slot_attention_forward(rows.data_ptr(), rows.stride(0), slots.data_ptr(), lens.data_ptr(),
                                   owner.data_ptr(), segs.data_ptr(), segs.numel() - 1, width, groups, per_group,
                                   head_dim, scale, out.data_ptr(), lse.data_ptr(), scratch.data_ptr(), threads)
        ctx.save_for_backward(*tables, rows, out, lse)
        ctx.meta = (lib, plan, groups, per_group, head_dim, scale)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        big_c, big_s, rows, out, lse = ctx.saved_tensors
        lib, (slots, lens, owner, segs), groups, r, d, scale = ctx.meta
        grad = grad.contiguous()
        width = slots.shape[1]
        dvec = torch.zeros_like(rows)
        threads = torch.get_num_threads()
        scratch = rows.new_empty(threads, lib.slot_scratch_floats(width, d))
        lib.slot_attention_backward(
            rows.data_ptr(), rows.stride(0), slots.data_ptr(), lens.data_ptr(), owner.data_ptr(), segs.data_ptr(),
            segs.numel() - 1, width, groups, r, d, scale, grad.data_ptr(), out.data_ptr(), lse.data_ptr(),
            dvec.data_ptr(), scratch.data_ptr(), threads)
        dqkv = torch.empty_like(rows)
        _rotate(dvec, (big_c, big_s), d, -1.0, out=dqkv)
        return dqkv, None, None, None, None, None, None


def unsupported_reason(model) -> str | None:
    """None when `lean_forward` computes what `model.forward` computes for a packed row; else why not.

    Covered: the local spec (cpu_attention.PackedLocalAttention) on the CPU at TP = PP = CP = 1, fp32, RMSNorm,
    SwiGLU, RoPE (rotate-half, any inv_freq: Llama-3 scaling is baked into it), no dropout, no
    recomputation, no q/k norm, no MoE/MTP/MLA, optional q/k/v and linear biases.
    """
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_oreal.mcore.cpu_attention import PackedLocalAttention

    c = model.config
    checks = [
        # Written and measured for the CPU; a GPU without Transformer Engine keeps Megatron's local layers.
        (next(model.parameters()).device.type == "cpu", "not on the CPU"),
        (model.pre_process and model.post_process, "pipeline stage (PP > 1)"),
        (c.tensor_model_parallel_size == 1, f"tensor_model_parallel_size {c.tensor_model_parallel_size}"),
        (c.context_parallel_size == 1, f"context_parallel_size {c.context_parallel_size}"),
        (not c.sequence_parallel, "sequence_parallel"),
        (c.params_dtype == torch.float32 and not c.bf16 and not c.fp16, f"params_dtype {c.params_dtype}"),
        (c.recompute_granularity is None, f"recompute_granularity {c.recompute_granularity}"),
        (c.hidden_dropout == 0.0 and c.attention_dropout == 0.0, "dropout"),
        (c.normalization == "RMSNorm" and not c.layernorm_zero_centered_gamma, f"normalization {c.normalization}"),
        (c.gated_linear_unit and c.activation_func is F.silu, "activation (lean path: SwiGLU)"),
        (not c.apply_residual_connection_post_layernorm and not c.fp32_residual_connection, "residual variant"),
        (not c.qk_layernorm and not c.multi_latent_attention and c.num_moe_experts is None, "q/k norm, MLA or MoE"),
        (not c.apply_query_key_layer_scaling and c.window_size is None and c.softmax_type == "vanilla",
         "attention variant"),
        (getattr(c, "mtp_num_layers", None) is None and not getattr(c, "fine_grained_activation_offloading", False)
         and not getattr(c, "cpu_offloading", False), "MTP or activation offloading"),
        (model.position_embedding_type == "rope" and type(model.rotary_pos_emb) is RotaryEmbedding,
         f"position embedding {model.position_embedding_type}"),
    ]
    for ok, why in checks:
        if not ok:
            return why
    rope = model.rotary_pos_emb
    if rope.rotary_interleaved or rope.seq_len_interpolation_factor is not None:
        return "interleaved or interpolated RoPE"
    if rope.inv_freq.numel() * 2 != c.kv_channels:
        return "partial RoPE (rotary_percent < 1)"
    for i, layer in enumerate(model.decoder.layers):
        attn, mlp = layer.self_attention, layer.mlp
        if not (type(layer) is TransformerLayer and type(attn) is SelfAttention and type(mlp) is MLP
                and isinstance(attn.core_attention, PackedLocalAttention)
                and isinstance(layer.input_layernorm, torch.nn.RMSNorm)
                and isinstance(layer.pre_mlp_layernorm, torch.nn.RMSNorm)
                and isinstance(layer.cross_attention, IdentityOp)
                and isinstance(attn.q_layernorm, IdentityOp) and isinstance(attn.k_layernorm, IdentityOp)):
            return f"layer {i}: module types outside the local spec"
    if not isinstance(model.decoder.final_layernorm, torch.nn.RMSNorm):
        return "final norm type"
    return None


def _norm(x: Tensor, module: torch.nn.RMSNorm) -> Tensor:
    eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
    return _RMSNorm.apply(x, module.weight, eps)


def _linear_add(residual: Tensor, x: Tensor, linear) -> Tensor:
    """residual + linear(x) in one addmm (Megatron's bias-dropout-add with dropout 0)."""
    out = torch.addmm(residual, x, linear.weight.t())
    return out if linear.bias is None else out + linear.bias


def _row_cache(params, key, build):
    """build() cached on the row's PackedSeqParams under key: computed once per forward pass and used
    by every layer. (Each pass gets its own PackedSeqParams from MicroBatch.local_packed_seq_params, so
    the reference, token-RM and policy passes each build it; sharing it between them measured no faster.)"""
    cache = params.__dict__.setdefault("_lean_cache", {})
    if key not in cache:
        cache[key] = build()
    return cache[key]


def lean_forward(model, input_ids: Tensor, params) -> Tensor:
    """GPTModel.forward of one packed row [1, L] for a covered model (`unsupported_reason` is None):
    logits [1, L, V] (the token RM: scores [1, L, 1]). `params` carries the row's `slots`,
    `cu_seqlens_q` and `rope_positions` (MicroBatch.local_packed_seq_params). Attention runs in the
    native kernels when they are available (native.kernels()), else in `_SlotAttention`."""
    c = model.config
    n_rows = input_ids.shape[1]
    groups = c.num_query_groups
    per_group = c.num_attention_heads // groups
    head_dim = c.kv_channels
    inv_freq = model.rotary_pos_emb.inv_freq
    # Megatron's table is outer(position, inv_freq) in fp32 (RotaryEmbedding.forward): the same products.
    angles = params.rope_positions.to(inv_freq.device, inv_freq.dtype)[:, None] * inv_freq[None]
    tables = rope_tables(angles.cos().to(c.params_dtype), angles.sin().to(c.params_dtype), groups, per_group)
    scale = model.decoder.layers[0].self_attention.core_attention.softmax_scale
    if native.kernels() is not None:  # covered models are fp32 on the CPU (`unsupported_reason`)
        plan = _row_cache(params, "native", lambda: native_slot_plan(params.slots, params.cu_seqlens_q, n_rows))

        def attend(qkv):
            return _NativeSlotAttention.apply(qkv, tables, plan, groups, per_group, head_dim, scale)
    else:
        from megatron_oreal.mcore.cpu_attention import row_slot_layout

        index = _row_cache(params, (groups, per_group), lambda: slot_index(row_slot_layout(params, input_ids), n_rows,
                                                                          groups, per_group))

        def attend(qkv):
            return _SlotAttention.apply(qkv, tables, index, groups, per_group, head_dim, scale)

    x = model.embedding(input_ids=input_ids, position_ids=None)[:, 0]  # [L, 1, H] -> [L, H]
    for layer in model.decoder.layers:
        attn, mlp = layer.self_attention, layer.mlp
        qkv = F.linear(_norm(x, layer.input_layernorm), attn.linear_qkv.weight, attn.linear_qkv.bias)
        x = _linear_add(x, attend(qkv), attn.linear_proj)
        fc1 = F.linear(_norm(x, layer.pre_mlp_layernorm), mlp.linear_fc1.weight, mlp.linear_fc1.bias)
        x = _linear_add(x, _SwiGLU.apply(fc1), mlp.linear_fc2)
    hidden = _norm(x, model.decoder.final_layernorm)[:, None]  # [L, 1, H], as the decoder returns it
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits, _ = model.output_layer(hidden, weight=weight)
    return logits.transpose(0, 1)
