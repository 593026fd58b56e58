"""Forward passes over packed micro-batches through Megatron's pipeline schedule.

`run_schedule` drives `get_forward_backward_func()` (no pipelining at PP=1, 1F1B at PP>1) over a
list of MicroBatch; on the last stage `post(idx, mb, output)` turns the model output into
(local loss, metrics). Per-token quantities come out in the packed response-token layout
(packing.py): the outputs at the `pred_index` positions, in order.

Log-probs are computed the way Megatron computes its LM loss: vocab-parallel cross entropy in fp32 on
the TP-sharded logits (logp = -CE(labels)), with the vocabulary-padding columns masked to -inf first
(model.mask_padded_vocab), so no rank ever materialises the full [L, V] logits (docs/algorithm.md §11).
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_oreal.mcore.model import mask_padded_vocab, unwrap
from megatron_oreal.mcore.packing import MicroBatch

Tensor = torch.Tensor
PostFn = Callable[[int, MicroBatch, Tensor], tuple[Tensor, dict]]


def _attention_kind(model) -> str:
    """"thd" (Transformer Engine), "packed" (PackedLocalAttention) or "dense" (local, [L, L] mask).

    Cached on the model: the layer types never change after building, and scanning every module
    on each schedule call (several per step) showed up in the CPU step profile.
    """
    from megatron_oreal.mcore.cpu_attention import PackedLocalAttention

    m = unwrap(model)
    kind = getattr(m, "_oreal_attention_kind", None)
    if kind is None:
        mods = list(m.modules())
        if any(type(x).__name__ == "TEDotProductAttention" for x in mods):
            kind = "thd"
        elif any(isinstance(x, PackedLocalAttention) for x in mods):
            kind = "packed"
        else:
            kind = "dense"
        m._oreal_attention_kind = kind
    return kind


def uses_thd(model) -> bool:
    """True when the model runs Transformer Engine attention (packed THD input, no dense mask)."""
    return _attention_kind(model) == "thd"


def uses_packed_local(model) -> bool:
    """True when the local spec's attention is PackedLocalAttention (takes cu_seqlens, no dense mask)."""
    return _attention_kind(model) == "packed"


def needs_dense_mask(model) -> bool:
    """True when packed rows need the [1, 1, L, L] block-causal mask (neither THD nor PackedLocalAttention)."""
    return not uses_thd(model) and not uses_packed_local(model)


def token_logprobs(local_logits: Tensor, labels: Tensor, vocab_size: int) -> Tensor:
    """log π(label) per position from a vocab-parallel logits shard [B, L, V_pad/TP] -> [B, L], fp32."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = mask_padded_vocab(local_logits.float(), vocab_size)
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        # The whole vocabulary is here: torch's fused log-softmax, the same values to round-off, without
        # the cross entropy's TP all-reduces and its ~10 elementwise passes (measured 1.2 -> 0.5 ms per
        # fwd+bwd of the tiny task's [2.1 k, 102] logits, one thread).
        return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # vocab_parallel_cross_entropy subtracts the max in place; the logits are read by nobody else
    # (Megatron's own compute_language_model_loss passes them the same way, saving an [L, V/TP] copy).
    return -vocab_parallel_cross_entropy(logits, labels)


def response_values(per_position: Tensor, mb: MicroBatch) -> Tensor:
    """[1, L] per-position values -> [T], the value at the position predicting each response token
    (packed order; with shared prompts one position can serve several tokens)."""
    return per_position[0, mb.pred_index.to(per_position.device)]


def response_logprobs(local_logits: Tensor, mb: MicroBatch, vocab_size: int) -> Tensor:
    """log π of every response token of mb -> [T] fp32, from the row's vocab-parallel logits [1, L, V/TP]."""
    idx = mb.pred_index.to(local_logits.device)
    labels = mb.pred_labels.to(local_logits.device)
    if mb.shares_prompts:  # a position predicts several tokens: take its rows once per token (CPU path)
        return token_logprobs(local_logits[:, idx], labels[None], vocab_size)[0]
    # Whole sequences (every GPU row): the cross entropy runs on the logits in place, with no [T, V] copy.
    row_labels = torch.zeros(local_logits.shape[:2], dtype=torch.long, device=local_logits.device)
    row_labels[0, idx] = labels
    return token_logprobs(local_logits, row_labels, vocab_size)[0, idx]


def run_schedule(model, micro_batches: list[MicroBatch], post: PostFn, *, forward_only: bool, loss_scale: float = 1.0):
    """Run every micro-batch through the (pipelined) model; returns the metrics dicts (last stage only).

    `loss_scale` multiplies each micro-batch's loss before backward. Megatron's schedule divides each
    micro-batch loss by num_microbatches (schedules.py forward_step_calc_loss, legacy 2-tuple path)
    and DDP averages grads over DP, so the caller passes loss_scale = dp_size and we multiply by the
    number of micro-batches here: the gradient is then exactly Σ(local sums)/N_global.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        raise ValueError("run_schedule: no micro-batches (build_micro_batches always returns at least one)")
    n = len(micro_batches)
    thd, packed_local = uses_thd(model), uses_packed_local(model)
    device = next(unwrap(model).parameters()).device

    def forward_step(data_iterator, chunk):
        idx, mb = next(data_iterator)
        mb = mb.to(device)
        if thd:
            kwargs = {"packed_seq_params": mb.packed_seq_params()}
        elif packed_local:
            kwargs = {"packed_seq_params": mb.local_packed_seq_params()}
        else:
            kwargs = {}
        mask = None if kwargs else mb.attention_mask
        if mask is None and not kwargs:
            raise ValueError("run_schedule: this model needs the dense block-causal mask; build the "
                             "micro-batches with with_mask=needs_dense_mask(model)")
        out = chunk(mb.tokens, mb.position_ids, mask, **kwargs)

        def loss_func(output_tensor):
            loss, metrics = post(idx, mb, output_tensor)
            return loss * (n * loss_scale), metrics

        return out, loss_func

    # Rows differ in length; at PP>1 the p2p layer must exchange shapes first.
    unwrap(model).config.variable_seq_lengths = True
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(enumerate(micro_batches)),
        model=[model],
        num_microbatches=n,
        seq_length=max(mb.tokens.shape[1] for mb in micro_batches),
        micro_batch_size=1,
        forward_only=forward_only,
    )
