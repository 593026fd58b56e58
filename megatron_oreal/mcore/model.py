"""Model builders: the policy, the token-level RM and the frozen reference, all one GPTModel backbone.

- Policy: Megatron GPTModel for a Qwen2/Llama HF config (local spec on CPU, TE spec with CUDA+TE).
- Token RM (docs/algorithm.md §3, §11): the same backbone with `output_layer` replaced by a replicated,
  zero-initialised `Linear(hidden, 1, bias=False)` on the final-norm hidden states, so every TP rank
  gets the full score of every position ([B, S] after squeeze). The reference code replaces
  `lm_head` the same way ([docs/algorithm.md, train_oreal.py:L210-224]); zero init makes every initial token score 0 (q_t = 0.5).
- Reference (docs/design.md decision 3): `ReferenceWeights` keeps a host copy of the initial policy
  weights and copies them into the policy's own parameter storage for a no-grad forward, then copies
  the live weights back. Parameters keep their identity and storage (the optimizer, DDP buffers and
  grads still point at the right tensors), and no third model lives on the GPU.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from megatron_oreal.mcore.hf_config import arch_spec, transformer_config_from_hf, use_transformer_engine


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / Float16Module wrappers (each keeps the wrapped model in `.module`)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _layer_spec(use_te: bool):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te:
        return get_gpt_layer_with_transformer_engine_spec()
    from megatron_oreal.mcore.cpu_attention import PackedLocalAttention

    # The local spec's DotProductAttention costs (packed row)²; ours takes the row's cu_seqlens.
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = PackedLocalAttention
    return spec


def build_policy(hf_config: dict, layout, *, dtype: str = "fp32", fp8: str = "", use_te: bool | None = None,
                 tie: bool | None = None, allow_local_spec: bool = False, from_hf_weights: bool = True, **overrides):
    """GPTModel for this PP stage / TP shard; load HF weights with
    `megatron_oreal.checkpoint.hf_io.load_hf_weights`. The model carries `.arch` (ArchSpec).

    use_te None: TE with CUDA, the local spec without (a CUDA machine whose TE fails to import raises
    unless allow_local_spec, hf_config.use_transformer_engine). On a CPU the weights are randomly
    initialised; on a GPU with TE they are left uninitialised when `from_hf_weights` (the default:
    every caller loads HF weights next); pass from_hf_weights=False for a randomly initialised model."""
    from megatron.core.models.gpt import GPTModel

    from megatron_oreal.mcore.cpu_attention import LocalGPTModel

    spec = arch_spec(hf_config, layout.tp)
    use_te = use_transformer_engine(allow_local_spec=allow_local_spec) if use_te is None else use_te
    if fp8 and not use_te:
        raise ValueError("fp8 needs the Transformer Engine layer spec (use_te=True)")
    config = transformer_config_from_hf(hf_config, layout, dtype=dtype, fp8=fp8, use_te=use_te,
                                        from_hf_weights=from_hf_weights, **overrides)
    tied = spec.tied if tie is None else tie
    local = {} if use_te else {"real_vocab_size": spec.vocab_size}
    model = (GPTModel if use_te else LocalGPTModel)(
        config=config,
        transformer_layer_spec=_layer_spec(use_te),
        vocab_size=spec.padded_vocab_size,
        max_sequence_length=spec.max_position,
        pre_process=layout.is_first_stage,
        post_process=layout.is_last_stage,
        share_embeddings_and_output_weights=tied,
        position_embedding_type="rope",
        rotary_base=int(spec.rope_theta),
        rope_scaling=spec.rope_scaling_factor is not None,
        rope_scaling_factor=spec.rope_scaling_factor or 8.0,
        **local,
    )
    model.arch = spec
    model.is_token_rm = False
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


class ScoreHead(nn.Module):
    """Replicated H -> 1 head standing in for GPTModel.output_layer (same call signature).

    GPTModel._postprocess calls `output_layer(hidden [S, B, H], weight=..., runtime_gather_output=...)`
    and transposes the result to [B, S, 1]. Without sequence parallelism the final-norm hidden
    states are identical on every TP rank, so each rank computes the full score and the gradient
    flowing back into the backbone is identical across TP ranks, as Megatron expects for
    replicated activations. The weight has no `tensor_model_parallel` attribute, so Megatron DDP and
    dist checkpointing treat it as replicated.
    """

    def __init__(self, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, hidden, dtype=dtype))
        self.sequence_parallel = False  # read by GPTModel._postprocess in inference mode

    def forward(self, hidden_states, weight=None, runtime_gather_output=None):
        return torch.matmul(hidden_states, self.weight.t()), None


def build_token_rm(hf_config: dict, layout, *, dtype: str = "fp32", fp8: str = "", use_te: bool | None = None,
                   allow_local_spec: bool = False, **overrides):
    """Token-level RM: the policy backbone (untied, so the embedding stays a plain embedding) with a
    zero-initialised ScoreHead. `model(input_ids, position_ids, mask)` returns scores [B, S, 1]."""
    model = build_policy(hf_config, layout, dtype=dtype, fp8=fp8, use_te=use_te, tie=False,
                         allow_local_spec=allow_local_spec, **overrides)
    if model.config.sequence_parallel:
        raise ValueError("token RM: sequence_parallel shards the final hidden states along the sequence; "
                         "the replicated score head needs them whole (leave sequence_parallel off)")
    if model.post_process:
        model.output_layer = ScoreHead(model.config.hidden_size, model.config.params_dtype)
        if torch.cuda.is_available():
            model.output_layer.cuda(torch.cuda.current_device())
    model.is_token_rm = True
    return model


class ReferenceWeights:
    """Host snapshot of a model's weights, swapped into the live parameters for a no-grad forward.

    with ref.swapped_in(model):   # model now computes with the snapshot weights
        ref_logits = model(...)
    # model's parameters are bit-identical to before, same storage, same objects.

    A parameter on the snapshot's device with its dtype (the CPU path) is swapped by pointer: its
    `.data` points at the snapshot tensor for the forward and back at its own storage afterwards (no
    copies; on the tiny task 3 ms a step less). Others (GPU parameters, a live dtype cast after the
    snapshot) are copied in through a host stash and copied back.
    """

    def __init__(self, model: nn.Module):
        pin = torch.cuda.is_available()
        self._names = [n for n, _ in unwrap(model).named_parameters()]
        self._ref = {n: _host_copy(p, pin) for n, p in unwrap(model).named_parameters()}
        self._stash: dict[str, torch.Tensor] = {}  # host copies of the live weights, for copied parameters only

    def match_dtypes(self, model: nn.Module) -> None:
        """Cast the snapshot to the live parameter dtypes, once, after wrapping: Float16Module (bf16
        runs) casts every parameter, including the norms the local spec builds in fp32, *after* the
        snapshot was taken. Exactly what the bf16 policy would compute with, half the size, and a CPU
        run can then swap it in by pointer instead of casting on every copy."""
        for name, p in unwrap(model).named_parameters():
            if name in self._ref and self._ref[name].dtype != p.dtype:
                self._ref[name] = self._ref[name].to(p.dtype)  # the stash follows on first use

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._ref.values())

    def _check(self, params: dict) -> None:
        if list(params) != self._names:
            raise ValueError("ReferenceWeights: the model's parameters differ from the snapshot's "
                             f"({len(params)} vs {len(self._names)} names)")
        for n, p in params.items():
            if p.shape != self._ref[n].shape:
                raise ValueError(f"ReferenceWeights: parameter {n} is {tuple(p.shape)}, "
                                 f"snapshot has {tuple(self._ref[n].shape)}")

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        params = dict(unwrap(model).named_parameters())
        self._check(params)
        was_training = model.training
        pointed = {n: p.data for n, p in params.items()
                   if p.device == self._ref[n].device and p.dtype == self._ref[n].dtype}
        copied = [n for n in params if n not in pointed]
        with torch.no_grad():
            for n in copied:  # live -> host stash, snapshot -> live storage
                p = params[n]
                if n not in self._stash or self._stash[n].dtype != p.dtype:
                    # The live dtype may differ from the snapshot's (e.g. Float16Module casts the fp32
                    # norms to bf16 when wrapping): the snapshot is cast on copy, the stash matches exactly.
                    self._stash[n] = torch.empty(p.shape, dtype=p.dtype, pin_memory=torch.cuda.is_available())
                self._stash[n].copy_(p.data, non_blocking=True)
            if copied and torch.cuda.is_available():
                torch.cuda.synchronize()
            for n in copied:
                params[n].data.copy_(self._ref[n], non_blocking=True)  # casts if the live dtype differs
            for n in pointed:
                params[n].data = self._ref[n]
        model.eval()
        try:
            with torch.no_grad():
                yield model
        finally:
            with torch.no_grad():
                for n, live in pointed.items():
                    params[n].data = live
                for n in copied:
                    params[n].data.copy_(self._stash[n], non_blocking=True)
                if copied and torch.cuda.is_available():
                    torch.cuda.synchronize()
            model.train(was_training)


def _host_copy(p: torch.Tensor, pin: bool) -> torch.Tensor:
    out = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin)
    out.copy_(p.detach())
    return out


def mask_padded_vocab(local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the vocabulary-padding columns of a vocab-parallel logits shard [..., V_pad/TP] to -inf,
    so a softmax over the padded vocabulary equals the softmax over the true one."""
    from megatron_oreal.mcore.parallel import current_layout

    width = local_logits.shape[-1]
    start = current_layout().tp_rank * width
    if start + width <= vocab_size:
        return local_logits
    cols = torch.arange(start, start + width, device=local_logits.device) >= vocab_size
    return local_logits.masked_fill(cols, float("-inf"))


def gather_vocab_logits(local_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Vocab-parallel logits shard [..., V_pad/TP] -> full logits [..., vocab_size] on every TP rank
    (differentiable: Megatron's gather splits the gradient back on backward)."""
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    full = gather_from_tensor_model_parallel_region(local_logits)
    return full[..., :vocab_size]


def forward_logits(model, input_ids, position_ids=None, attention_mask=None) -> torch.Tensor:
    """One-stage (PP=1) forward -> gathered logits [B, S, vocab] (the RM: scores [B, S, 1])."""
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    out = model(input_ids, position_ids, attention_mask)
    if getattr(unwrap(model), "is_token_rm", False):
        return out
    return gather_vocab_logits(out, unwrap(model).arch.vocab_size)
