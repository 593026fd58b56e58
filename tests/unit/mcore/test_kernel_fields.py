"""The machine-dependent TransformerConfig fields (hf_config.kernel_fields) and the layer-spec choice
(hf_config.use_transformer_engine), with the "has CUDA / has TE / has apex" facts injected so that the
GPU branch is checked on a CPU too."""

from __future__ import annotations

import warnings

import pytest

from megatron_oreal.mcore.hf_config import kernel_fields, use_transformer_engine

FUSIONS = ("apply_rope_fusion", "bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion")


@pytest.mark.parametrize("cuda,te", [(False, False), (False, True), (True, False)])
def test_without_cuda_and_te_every_kernel_is_off_and_init_is_on_the_cpu(cuda, te):
    f = kernel_fields(cuda=cuda, te=te, apex_grad_fusion=True)
    assert f["use_cpu_initialization"] is True and f["perform_initialization"] is True
    assert f["gradient_accumulation_fusion"] is False and f["persist_layer_norm"] is False
    assert not any(f[k] for k in FUSIONS)


def test_with_cuda_and_te_fusions_on_gpu_init_and_no_wasted_init_before_hf_weights():
    f = kernel_fields(cuda=True, te=True, apex_grad_fusion=True)
    assert f["use_cpu_initialization"] is False
    assert f["perform_initialization"] is False  # HF weights overwrite them
    assert f["gradient_accumulation_fusion"] is True
    assert all(f[k] for k in FUSIONS)
    # A model that is not loaded from HF weights must still be initialised.
    assert kernel_fields(cuda=True, te=True, apex_grad_fusion=True, from_hf_weights=False)["perform_initialization"]
    # Without apex's fused_weight_gradient_mlp_cuda our (non-TE) output layer would raise at build time.
    assert kernel_fields(cuda=True, te=True, apex_grad_fusion=False)["gradient_accumulation_fusion"] is False


def test_gpu_fusions_pass_megatron_config_validation_for_our_architecture():
    """megatron-core 0.16.1's TransformerConfig accepts bias_activation_fusion with SwiGLU (silu + GLU, no
    bias) and the other GPU fields; apply_rope_fusion is left out only because its check imports TE."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    f = kernel_fields(cuda=True, te=True, apex_grad_fusion=False)
    f.pop("apply_rope_fusion")
    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                            ffn_hidden_size=128, gated_linear_unit=True, activation_func=F.silu,
                            normalization="RMSNorm", add_bias_linear=False, **f)
    assert cfg.bias_activation_fusion and cfg.masked_softmax_fusion and not cfg.use_cpu_initialization


def _broken_te():
    raise RuntimeError("libcudnn.so.9: cannot open shared object file")


def test_cuda_without_importable_te_fails_loudly_unless_allowed():
    assert use_transformer_engine(cuda=False, import_te=_broken_te) is False  # CPU: local spec, no question
    assert use_transformer_engine(cuda=True, import_te=lambda: None) is True
    with pytest.raises(RuntimeError, match="Transformer Engine does not import: RuntimeError: libcudnn.so.9.*"
                                           "policy.allow_local_spec=true"):
        use_transformer_engine(cuda=True, import_te=_broken_te)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert use_transformer_engine(cuda=True, import_te=_broken_te, allow_local_spec=True) is False
    assert any("libcudnn" in str(w.message) for w in caught)


def test_allow_local_spec_is_a_policy_config_key():
    from megatron_oreal.config import RunConfig, load_config

    cfg = load_config(None, ["policy.allow_local_spec=true", "policy.hf_path=x"])
    assert cfg.policy.allow_local_spec is True and RunConfig().policy.allow_local_spec is False
