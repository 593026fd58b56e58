"""FLOPs, parameter counts and MFU against hand-computed and published numbers."""

import json

import pytest

from megatron_oreal.observability.flops import (ARCHS, arch_by_name, arch_from_hf_config,
                                                forward_flops_per_token, gpu_by_name, mfu, peak_flops,
                                                tokens_per_second, train_flops_per_token)


def test_param_counts_match_the_published_checkpoints():
    # safetensors index "total_size" / 2 bytes (bf16) of the HF checkpoints.
    assert arch_by_name("qwen2.5-7b").params() == 15231233024 // 2
    assert arch_by_name("qwen2.5-32b").params() == 65527752704 // 2
    assert arch_by_name("Qwen2.5-7B").params() == arch_by_name("deepseek-r1-distill-qwen-7b").params()
    assert abs(arch_by_name("llama-3.1-8b").params() / 8.03e9 - 1) < 0.002  # model card: 8.03B


def test_gpt3_flops_equal_megatron_formula():
    # Narayanan et al. 2021 appendix: 96·B·s·L·h²·(1 + s/6h + V/16Lh) per iteration, with recompute.
    a, s = arch_by_name("gpt3-175b"), 2048
    h, L, V = a.hidden, a.layers, a.vocab
    megatron = 96 * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))
    model, hardware = train_flops_per_token(a, s, recompute=True)
    assert hardware == pytest.approx(megatron, rel=1e-12)
    assert model == pytest.approx(3 * forward_flops_per_token(a, s), rel=1e-12)
    assert train_flops_per_token(a, s, recompute=False)[1] == model


def test_forward_flops_hand_computed_tiny_gqa():
    a = arch_from_hf_config({"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "num_key_value_heads": 2, "intermediate_size": 16, "vocab_size": 10})
    # per layer: q 8·8 + kv 2·8·4 + o 8·8 + mlp 3·8·16 = 64 + 64 + 64 + 384 = 576
    assert a.layer_matmul_params() == 576
    # 2·2·576 + 2·10·8 + 4·2·4·2·s(=5) = 2304 + 160 + 320
    assert forward_flops_per_token(a, 5) == 2784


def test_hf_config_round_trip_and_errors(tmp_path):
    cfg = {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
           "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
           "tie_word_embeddings": False}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    a = arch_from_hf_config(path, name="qwen2.5-7b")
    assert a == ARCHS["qwen2.5-7b"]
    del cfg["intermediate_size"]
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*intermediate_size"):
        arch_from_hf_config(path)
    with pytest.raises(KeyError, match="qwen2.5-32b"):
        arch_by_name("qwen-99b")


def test_mfu_and_tokens_per_second():
    h100 = gpu_by_name("h100-80g")
    # 8 GPUs, 10 s, 3.9576e16 model FLOPs -> 3.9576e15 FLOP/s over 8·989.4e12 = 0.5
    assert mfu(3.9576e16, 10.0, 8, peak_flops(h100)) == pytest.approx(0.5)
    assert peak_flops(h100, fp8=True) == pytest.approx(2 * peak_flops(h100), rel=1e-3)
    assert tokens_per_second(8000, 2.0, 4) == 1000
    assert mfu(1.0, 0.0, 1, 1.0) == 0.0
    with pytest.raises(ValueError, match="a100-80g has no FP8"):
        peak_flops(gpu_by_name("a100-80g"), fp8=True)


def test_measured_cpu_peak_replaces_the_nominal_figure():
    from megatron_oreal.observability.flops import cpu_spec_measured

    spec = cpu_spec_measured()
    assert spec.name == "cpu" and 1e8 < spec.bf16_flops < 1e14  # a real GEMM rate, not the 1e12 default
    assert spec.hbm_bw == gpu_by_name("cpu").hbm_bw


def test_step_throughput_hand_computed():
    from megatron_oreal.observability.flops import step_throughput

    a = arch_from_hf_config({"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 4,
                             "num_key_value_heads": 2, "intermediate_size": 16, "vocab_size": 10})
    times = {"time/rollout": 4.0, "time/token_rm": 1.0, "time/policy": 3.0, "time/weight_sync": 0.5,
             "time/step": 10.0, "time/selection": 9.0}
    m = step_throughput(times, arch=a, n_devices=2, peak=1e6, rollout_tokens=800, train_tokens=100,
                        train_seq_len=5, trained_models=2, forward_only_passes=2, sync_bytes=2e9)
    # F_fwd(5) = 2784 (above); 100 tokens × 2784 × (3·2 + 2) = 2,227,200 FLOPs over 4 s on 2 × 1e6
    assert m["mfu"] == pytest.approx(2_227_200 / 4 / 2e6)
    assert m["tokens/s/train"] == 12.5 and m["tokens/s/rollout"] == 100 and m["tokens/s/step"] == 40
    assert m["sync/gbps"] == 4.0
    # train.py times the whole training side as one "train" stage: same FLOPs, same seconds
    one = step_throughput({"time/train": 4.0}, arch=a, n_devices=2, peak=1e6, rollout_tokens=0,
                          train_tokens=100, train_seq_len=5)
    assert one["mfu"] == m["mfu"] and "sync/gbps" not in one


def test_cuda_device_names_pick_their_chip_for_mfu():
    from megatron_oreal.observability.flops import GPUS, gpu_for_device_name

    assert gpu_for_device_name("NVIDIA H200") is GPUS["h200"]  # the name the lent H200 reported
    assert gpu_for_device_name("NVIDIA H100 80GB HBM3") is GPUS["h100-80g"]
    a100 = gpu_for_device_name("NVIDIA A100-SXM4-80GB")
    assert a100 is GPUS["a100-80g"] and a100.bf16_flops == 312e12  # not the H100's 989e12
    other = gpu_for_device_name("NVIDIA L40S")
    assert other.bf16_flops == GPUS["h100-80g"].bf16_flops and other.name == "NVIDIA L40S (as h100-80g)"
