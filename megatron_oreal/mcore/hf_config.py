"""HF `config.json` -> the architecture facts we use -> Megatron's TransformerConfig.

One function builds Megatron's own config (STYLE.md: "Reuse Megatron's own config"); `ArchSpec` only
holds the HF-side facts that conversion needs and TransformerConfig does not carry (the unpadded
vocabulary, tied embeddings, the architecture name).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# Architectures with a mapping table in megatron_oreal/checkpoint/mapping.py.
SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")

# Vocabulary padding. Megatron's VocabParallelEmbedding needs vocab % tp == 0, and a distributed
# checkpoint only reshards if the padded size is the same at every layout, so pad to a multiple of
# lcm(128 * tp, 1024): 1024 for every tp in {1, 2, 4, 8}, i.e. independent of the layout there.
# The padding rows are stripped on export (checkpoint/mapping.py) and must be masked (-inf) before
# any softmax over the vocabulary (model.mask_padded_vocab).
VOCAB_PAD_BASE = 1024


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    multiple = math.lcm(128 * tp, VOCAB_PAD_BASE)
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class ArchSpec:
    architecture: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab_size: int  # HF rows of embed_tokens / lm_head
    padded_vocab_size: int  # Megatron rows (a multiple of the TP-independent pad, see above)
    tied: bool
    qkv_bias: bool
    rms_eps: float
    rope_theta: float
    max_position: int
    rope_scaling_factor: float | None = None  # llama3-style scaling (Llama 3.1), else None


def load_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in HF checkpoint folder {hf_dir!r}")
    with open(path) as f:
        return json.load(f)


def _rope(hf: dict) -> tuple[float, float | None]:
    # transformers 5 writes `rope_parameters`; 4.x wrote `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "llama3":
        return theta, float(params["factor"])
    raise ValueError(f"config.json: rope type {kind!r} is not supported (only default and llama3)")


def arch_spec(hf: dict, tp: int = 1) -> ArchSpec:
    """Validate an HF config dict for our architectures and the TP size; return its facts."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"config.json: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    heads, kv_heads = int(hf["num_attention_heads"]), int(hf.get("num_key_value_heads") or hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    if heads % kv_heads:
        raise ValueError(f"config.json: num_attention_heads={heads} not divisible by num_key_value_heads={kv_heads}")
    check_layout(hf, tp, 1)  # TP must divide both head counts (one message, with the sizes that work)
    if arch == "Qwen2ForCausalLM" and hf.get("use_sliding_window"):
        raise ValueError("config.json: use_sliding_window=true is not supported")
    if arch == "LlamaForCausalLM" and hf.get("attention_bias"):
        # transformers LlamaAttention puts the bias on o_proj too; Megatron has only add_qkv_bias
        # (a linear_proj bias would need add_bias_linear, which also adds MLP biases).
        raise ValueError("config.json: LlamaForCausalLM with attention_bias=true (o_proj bias) is not supported")
    if hf.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (only silu)")
    theta, scaling = _rope(hf)
    vocab = int(hf["vocab_size"])
    return ArchSpec(
        architecture=arch,
        num_layers=int(hf["num_hidden_layers"]),
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=int(hf.get("head_dim") or hidden // heads),
        ffn=int(hf["intermediate_size"]),
        vocab_size=vocab,
        padded_vocab_size=padded_vocab_size(vocab, tp),
        tied=bool(hf.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases (transformers Qwen2Attention bias=True, o_proj none).
        qkv_bias=arch == "Qwen2ForCausalLM",
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position=int(hf.get("max_position_embeddings", 4096)),
        rope_scaling_factor=scaling,
    )


def _import_te() -> None:
    import transformer_engine.pytorch  # noqa: F401


def te_import_error(import_te: Callable[[], None] = _import_te) -> str | None:
    """Why Transformer Engine does not import (None: it does). TE raises RuntimeError, not ImportError,
    when a CUDA library such as cuDNN is missing, so every exception counts."""
    try:
        import_te()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def check_layout(hf: dict, tp: int, pp: int, where: str = "config.json") -> None:
    """Raise ValueError (one line) when the model cannot be split `tp` x `pp` ways; called before any
    process group or model is built, so a bad layout is one `error:` line instead of a worker traceback."""
    heads, kv_heads = int(hf["num_attention_heads"]), int(hf.get("num_key_value_heads") or hf["num_attention_heads"])
    layers = int(hf["num_hidden_layers"])
    if heads % tp or kv_heads % tp:
        ok = [t for t in range(1, kv_heads + 1) if heads % t == 0 and kv_heads % t == 0]
        raise ValueError(f"{where}: tensor parallel size {tp} must divide num_attention_heads={heads} and "
                         f"num_key_value_heads={kv_heads}; possible sizes: {', '.join(map(str, ok))}")
    if layers % pp:
        ok = [p for p in range(1, layers + 1) if layers % p == 0]
        raise ValueError(f"{where}: pipeline size {pp} must divide num_hidden_layers={layers}; "
                         f"possible sizes: {', '.join(map(str, ok))}")


def te_available() -> bool:
    """Transformer Engine usable: importable AND a GPU present (TE's import itself needs CUDA libs)."""
    return torch.cuda.is_available() and te_import_error() is None


def use_transformer_engine(*, allow_local_spec: bool = False, cuda: bool | None = None,
                           import_te: Callable[[], None] = _import_te) -> bool:
    """Which layer spec to build: TE on a CUDA machine, Megatron's local spec on a CPU.

    On a CUDA machine whose TE does not import, the local spec would still train, but with dense
    [S, S] attention masks (no THD/varlen kernel: at 16k tokens a 1 GiB mask per head group) and no
    FP8: a broken image would run slowly and wrongly sized for hours. So that case fails here, naming
    the import error, unless `policy.allow_local_spec=true` asks for the local spec on purpose.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        return False
    error = te_import_error(import_te)
    if error is None:
        return True
    if allow_local_spec:
        warnings.warn(f"Transformer Engine does not import ({error}); policy.allow_local_spec=true: "
                      "building Megatron's local layer spec on the GPU")
        return False
    raise RuntimeError(f"CUDA is available but Transformer Engine does not import: {error}. Fix the "
                       "environment (see Dockerfile), or set policy.allow_local_spec=true to train with "
                       "Megatron's local layer spec (dense attention masks, no FP8)")


def grad_accum_fusion_available() -> bool:
    """apex's `fused_weight_gradient_mlp_cuda`: megatron-core 0.16.1's non-TE ColumnParallelLinear (our
    output layer, also in the TE spec) raises at construction with gradient_accumulation_fusion and
    without it (tensor_parallel/layers.py:44-48, 924-933); TE's linears fuse on their own."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except Exception:
        return False
    return True


def kernel_fields(*, cuda: bool | None = None, te: bool | None = None, apex_grad_fusion: bool | None = None,
                  from_hf_weights: bool = True) -> dict:
    """TransformerConfig fields that depend on the machine, not the model: pure given the three facts
    (None: detect them), so both branches are tested on a CPU.

    Without CUDA + TE (the CPU path, megatron_core_on_cpu.md §2) every fused kernel stays off and the full
    master weights are initialised on the CPU then split, so every layout starts equal. With CUDA + TE
    (megatron-core 0.16.1, transformer_config.py:354-371, 1485-1552): weights are created on the GPU
    directly (use_cpu_initialization=False) and, when HF weights overwrite them (`from_hf_weights`), not
    initialised at all (perform_initialization=False: a 32B model's init is minutes of wasted work);
    RoPE, SwiGLU (bias_activation_fusion accepts F.silu with gated_linear_unit) and masked-softmax fusions
    on; gradient-accumulation fusion only with apex's kernel (see grad_accum_fusion_available).
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    te = te_available() if te is None else te
    if not (cuda and te):
        return dict(use_cpu_initialization=True, perform_initialization=True, gradient_accumulation_fusion=False,
                    apply_rope_fusion=False, persist_layer_norm=False, bias_activation_fusion=False,
                    bias_dropout_fusion=False, masked_softmax_fusion=False)
    apex_grad_fusion = grad_accum_fusion_available() if apex_grad_fusion is None else apex_grad_fusion
    return dict(use_cpu_initialization=False, perform_initialization=not from_hf_weights,
                gradient_accumulation_fusion=apex_grad_fusion, apply_rope_fusion=True,
                # persist_layer_norm selects apex's FastLayerNorm in the local spec only; TE norms ignore it.
                persist_layer_norm=False, bias_activation_fusion=True, bias_dropout_fusion=True,
                masked_softmax_fusion=True)


# policy.fp8 -> megatron-core 0.16.1 TransformerConfig FP8 fields (transformer_config.py:429-495; the
# recipe object is built by fp8_utils.py:536-590 get_fp8_recipe). Only the GEMMs of TE linear layers
# (QKV, proj, fc1, fc2) run in FP8: the word embedding (VocabParallelEmbedding), the output layer
# (tensor_parallel.ColumnParallelLinear, not a TE module in the TE spec) and the token RM's ScoreHead
# (nn.Linear) are never FP8, attention (DPA) stays BF16, master weights stay BF16/FP32 (fp8_param off:
# the weight sync exports BF16 and re-quantises, sync/fp8.py). first_last_layers_bf16 stays off: the
# first/last *transformer blocks* go FP8 too, as in slime's and NeMo-RL's FP8 training recipes.
#   blockwise  (Hopper default): DeepSeek-V3-style 1x128 activation / 128x128 weight blocks, E4M3 for
#              every tensor, TE >= 2.3 Float8BlockScaling. NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1 (read
#              by TE at import) picks FP32 instead of power-of-2 block scales for the training GEMMs,
#              as slime's and miles' Hopper recipes do. It is a training-numerics choice only: with
#              fp8_param=False no TE scale ever reaches the engine (the sync sends BF16 weights and
#              sync/fp8.py computes its own FP32 block scales), so the two are unrelated.
#   tensorwise: per-tensor current scaling (Float8CurrentScaling), "hybrid" = E4M3 forward, E5M2
#              gradients (the wider range a single per-tensor scale needs for gradients).
FP8_RECIPES: dict[str, dict] = {
    "blockwise": dict(fp8="e4m3", fp8_recipe="blockwise"),
    "tensorwise": dict(fp8="hybrid", fp8_recipe="tensorwise"),
}
FP8_COMMON = dict(fp8_param=False, fp8_dot_product_attention=False, fp8_multi_head_attention=False,
                  first_last_layers_bf16=False)


def fp8_config_fields(fp8: str, dtype: str = "bf16") -> dict:
    """The TransformerConfig fields for `policy.fp8` ("" -> {}); pure, so it is testable without TE."""
    if not fp8:
        return {}
    if fp8 not in FP8_RECIPES:
        raise ValueError(f"fp8 must be '', 'blockwise' or 'tensorwise', got {fp8!r}")
    if dtype != "bf16":
        raise ValueError("fp8 training needs dtype=bf16 (the non-FP8 ops run in bf16)")
    return {**FP8_RECIPES[fp8], **FP8_COMMON}


def transformer_config_from_hf(hf_config: dict, layout, *, dtype: str = "fp32", fp8: str = "",
                               use_te: bool | None = None, from_hf_weights: bool = True, **overrides):
    """TransformerConfig for a Qwen2/Llama HF config at `layout` (tp/pp must match parallel_state).

    dtype: "fp32" | "bf16". fp8: "" | "blockwise" | "tensorwise" (needs TE + CUDA; sets the recipe
    fields of megatron-core 0.16.1's TransformerConfig: fp8="e4m3", fp8_recipe=<recipe>).
    use_te: the layer spec uses Transformer Engine (None: detect); from_hf_weights: HF weights will
    overwrite the parameters (skip their initialisation on GPU, see kernel_fields).
    `overrides` are passed to TransformerConfig as-is (e.g. recompute_granularity, variable_seq_lengths).
    """
    from megatron.core.transformer import TransformerConfig

    spec = arch_spec(hf_config, layout.tp)
    if spec.num_layers % layout.pp:
        raise ValueError(f"config.json: num_hidden_layers={spec.num_layers} not divisible by pipeline size {layout.pp}")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be fp32 or bf16, got {dtype!r}")
    params_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    kwargs = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden,
        num_attention_heads=spec.heads,
        num_query_groups=spec.kv_heads,
        kv_channels=spec.head_dim,
        ffn_hidden_size=spec.ffn,
        gated_linear_unit=True,  # SwiGLU: fc1 = [gate; up], act = silu(gate) * up
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_eps,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        init_method_std=0.02,
        params_dtype=params_dtype,
        bf16=dtype == "bf16",
        pipeline_dtype=params_dtype,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        **kernel_fields(te=use_te, from_hf_weights=from_hf_weights),
    )
    if fp8:
        fields = fp8_config_fields(fp8, dtype)  # validates first: a bad name fails even without a GPU
        if not te_available():
            raise ValueError(f"fp8={fp8!r} needs Transformer Engine and a CUDA GPU")
        kwargs.update(fields)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
