"""Single-process (world of one) checks of the Megatron model builders and HF conversion.

Reference values come from `transformers` on the same random tiny checkpoints (tests/helpers/tiny_hf.py).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers.layout import single_rank_layout
from helpers.tiny_hf import make_tiny_llama, make_tiny_qwen2


@pytest.fixture(scope="module")
def layout():
    with single_rank_layout(seed=7) as lay:
        yield lay


def _hf_logits(hf_dir, ids):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


def _policy(hf_dir, layout, **kw):
    from megatron_oreal.checkpoint.hf_io import load_hf_weights
    from megatron_oreal.mcore.hf_config import load_hf_config
    from megatron_oreal.mcore.model import build_policy

    cfg = load_hf_config(hf_dir)
    model = build_policy(cfg, layout, **kw)
    load_hf_weights(model, hf_dir, layout)
    return cfg, model


@pytest.mark.parametrize("tie,shards", [(False, 1), (True, 2)])
def test_policy_logits_match_transformers_qwen2(tmp_path, layout, tie, shards):
    from megatron_oreal.mcore.model import forward_logits

    make_tiny_qwen2(tmp_path, tie=tie, shards=shards, seed=3)
    _, model = _policy(tmp_path, layout)
    assert model.arch.vocab_size == 250 and model.arch.padded_vocab_size == 1024
    ids = torch.randint(0, 250, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = forward_logits(model, ids)
    ref = _hf_logits(tmp_path, ids)
    assert ours.shape == ref.shape == (2, 33, 250)
    assert ref.abs().max() > 0.5  # a non-trivial comparison
    assert (ours - ref).abs().max().item() <= 1e-4


def test_llama_matches_transformers(tmp_path, layout):
    from megatron_oreal.mcore.model import forward_logits

    make_tiny_llama(tmp_path, kv_heads=1, seed=5)
    _, model = _policy(tmp_path, layout)
    assert not model.config.add_qkv_bias and model.config.num_query_groups == 1
    ids = torch.randint(0, 250, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = forward_logits(model, ids)
    assert (ours - _hf_logits(tmp_path, ids)).abs().max().item() <= 1e-4


def test_hf_roundtrip_is_bit_identical_and_loads_in_transformers(tmp_path, layout):
    from safetensors.torch import load_file

    from megatron_oreal.checkpoint.gather import export_hf

    src, out = tmp_path / "src", tmp_path / "out"
    cfg = make_tiny_qwen2(src, tie=False, seed=11)
    (src / "tokenizer_config.json").write_text("{}")  # side files are copied verbatim
    _, model = _policy(src, layout)
    export_hf(model, layout, str(out), cfg, hf_dir=str(src), max_shard_bytes=150_000, log=None)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and "tokenizer_config.json" in files
    assert "generation_config.json" in files and not any(".tmp" in f for f in os.listdir(tmp_path))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2  # 150 kB limit on ~0.85 MB of weights
    got = {}
    for s in shards:
        got.update(load_file(out / s))
    want = load_file(src / "model.safetensors")
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    ids = torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(2))
    assert torch.equal(_hf_logits(out, ids), _hf_logits(src, ids))


def test_token_rm_zero_init_one_score_per_token_and_grads_reach_backbone(tmp_path, layout):
    from megatron_oreal.checkpoint.hf_io import load_hf_weights
    from megatron_oreal.mcore.hf_config import load_hf_config
    from megatron_oreal.mcore.model import build_token_rm, forward_logits

    make_tiny_qwen2(tmp_path, tie=True, seed=4)
    rm = build_token_rm(load_hf_config(tmp_path), layout)
    load_hf_weights(rm, tmp_path, layout)  # backbone from the checkpoint, head stays zero
    assert rm.output_layer.weight.shape == (1, 64) and torch.count_nonzero(rm.output_layer.weight) == 0
    ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(3))
    scores = forward_logits(rm, ids)
    assert scores.shape == (2, 9, 1) and torch.count_nonzero(scores) == 0
    # Zero head: dL/dhidden = 0, so only the head gets a gradient.
    scores.sum().backward()
    backbone = [p for n, p in rm.named_parameters() if not n.startswith("output_layer")]
    assert rm.output_layer.weight.grad.abs().sum() > 0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in backbone)
    opt = torch.optim.SGD(rm.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    scores = forward_logits(rm, ids)
    assert torch.count_nonzero(scores) == scores.numel()
    scores.pow(2).mean().backward()
    emb = rm.embedding.word_embeddings.weight.grad
    assert emb is not None and emb.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone)


def test_reference_weights_give_initial_logprobs_and_restore_policy_exactly(tmp_path, layout):
    from megatron_oreal.mcore.model import ReferenceWeights, forward_logits

    make_tiny_qwen2(tmp_path, seed=6)
    _, policy = _policy(tmp_path, layout)
    ref = ReferenceWeights(policy)
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logp0 = torch.log_softmax(forward_logits(policy, ids), -1)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    torch.log_softmax(forward_logits(policy, ids), -1)[..., 0].mean().backward()
    opt.step()
    after = {n: p.detach().clone() for n, p in policy.named_parameters()}
    ptrs = {n: p.data_ptr() for n, p in policy.named_parameters()}
    grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    with torch.no_grad():
        logp1 = torch.log_softmax(forward_logits(policy, ids), -1)
    assert (logp1 - logp0).abs().max() > 1e-3  # the policy really moved
    with ref.swapped_in(policy):
        logp_ref = torch.log_softmax(forward_logits(policy, ids), -1)
    assert torch.equal(logp_ref, logp0)
    assert policy.training
    for n, p in policy.named_parameters():
        assert torch.equal(p, after[n]) and p.data_ptr() == ptrs[n] and torch.equal(p.grad, grads[n]), n
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in policy.parameters()}
    assert ref.nbytes == sum(p.numel() * 4 for p in policy.parameters())
    # A wrapper that casts the live weights after the snapshot (Float16Module): cast on copy.
    with torch.no_grad():
        policy.decoder.final_layernorm.weight.data = policy.decoder.final_layernorm.weight.data.bfloat16()
    with ref.swapped_in(policy):
        assert torch.equal(policy.decoder.final_layernorm.weight.float(),
                           ref._ref["decoder.final_layernorm.weight"].bfloat16().float())
    assert torch.equal(policy.decoder.final_layernorm.weight, after["decoder.final_layernorm.weight"].bfloat16())


def test_mask_padded_vocab_and_padding_rule(layout):
    from megatron_oreal.mcore.hf_config import padded_vocab_size
    from megatron_oreal.mcore.model import mask_padded_vocab

    assert [padded_vocab_size(250, tp) for tp in (1, 2, 4, 8)] == [1024] * 4
    assert padded_vocab_size(152064, 8) == 152576 and padded_vocab_size(1024, 1) == 1024
    assert padded_vocab_size(250, 16) == 2048
    x = torch.zeros(1, 2, 1024)
    m = mask_padded_vocab(x, 250)
    assert torch.isinf(m[..., 250:]).all() and (m[..., :250] == 0).all()
    assert torch.log_softmax(m, -1)[0, 0, 0].item() == pytest.approx(-torch.log(torch.tensor(250.0)).item())


def test_bad_inputs_give_clear_errors(tmp_path, layout):
    from safetensors.torch import load_file, save_file

    from megatron_oreal.checkpoint.hf_io import CheckpointError
    from megatron_oreal.mcore.hf_config import arch_spec
    from megatron_oreal.mcore.model import build_policy

    cfg = make_tiny_qwen2(tmp_path / "ok", seed=1)
    with pytest.raises(ValueError, match="unsupported architecture 'MistralForCausalLM'"):
        arch_spec({**cfg, "architectures": ["MistralForCausalLM"]})
    with pytest.raises(ValueError, match="tensor parallel size 4 must divide .*num_key_value_heads=2"):
        arch_spec(cfg, tp=4)
    with pytest.raises(ValueError, match="attention_bias=true .o_proj bias. is not supported"):
        arch_spec({**cfg, "architectures": ["LlamaForCausalLM"], "attention_bias": True})
    from megatron_oreal.mcore.hf_config import transformer_config_from_hf

    with pytest.raises(ValueError, match="fp8 must be '', 'blockwise' or 'tensorwise'"):
        transformer_config_from_hf(cfg, layout, dtype="bf16", fp8="delayed")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs Transformer Engine and a CUDA GPU"):
            transformer_config_from_hf(cfg, layout, dtype="bf16", fp8="blockwise")
    with pytest.raises(ValueError, match="not divisible by pipeline size"):
        build_policy({**cfg, "num_hidden_layers": 3}, type(layout)(**{**layout.__dict__, "pp": 2}))
    state = load_file(tmp_path / "ok" / "model.safetensors")
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "config.json").write_text(json.dumps(cfg))
    save_file({**state, "model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}, extra / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"no Megatron counterpart .*o_proj.bias"):
        _policy(extra, layout)
    for case, edit in [("missing", lambda s: s.pop("model.layers.1.mlp.up_proj.weight")),
                       ("shape", lambda s: s.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(16, 64)))]:
        d = tmp_path / case
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        bad = dict(state)
        edit(bad)
        save_file(bad, d / "model.safetensors")
        expect = (r"'model.layers.1.mlp.up_proj.weight' is missing from .*missing/model.safetensors" if case == "missing"
                  else r"'model.layers.0.self_attn.k_proj.weight' in .*shape/model.safetensors has shape \(16, 64\), "
                       r"expected \(32, 64\)")
        with pytest.raises(CheckpointError, match=expect):
            _policy(d, layout)


def test_bf16_policy_close_to_fp32_and_exports_config_dtype(tmp_path, layout):
    from safetensors.torch import load_file

    from megatron_oreal.checkpoint.gather import export_hf
    from megatron_oreal.mcore.model import forward_logits

    cfg = make_tiny_qwen2(tmp_path / "src", seed=12)
    _, model = _policy(tmp_path / "src", layout, dtype="bf16")
    assert model.config.bf16 and model.embedding.word_embeddings.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 250, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = forward_logits(model, ids).float()
    ref = _hf_logits(tmp_path / "src", ids)
    assert (ours - ref).abs().max().item() < 0.05 * ref.abs().max().item()  # bf16 rounding only
    export_hf(model, layout, str(tmp_path / "out"), cfg, log=None)  # config says float32
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "src" / "model.safetensors")
    k = "model.layers.0.mlp.down_proj.weight"
    assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k].bfloat16().float())
