"""Model FLOPs per token, MFU and tokens/s for dense Qwen2/Llama-style decoders; GPU peak table.

The FLOP count follows Megatron-LM (Narayanan et al. 2021, arXiv 2104.04473, appendix) and PaLM
(Chowdhery et al. 2022, appendix B), generalised to grouped-query attention, gated MLPs and untied
embeddings (docs/planning.md §1 has the derivation):

    forward FLOPs per token  F_fwd = 2·N_matmul + 2·V·h + 4·L·n_q·d·s
    training (fwd + bwd)     3·F_fwd        (the backward is two matmuls per forward matmul)
    with full recompute      + F_fwd of the layers (not the output layer): hardware FLOPs only;
                             MFU still counts 3·F_fwd

N_matmul are the weights of the per-layer linear layers (QKV, output projection, MLP), V·h the output
layer, s the attention context. Like Megatron and PaLM we count the full s×s score matrix, not its
causal half, so our MFU is comparable with the figures they publish. For GPT-3 (n_q·d = h, MLP 4h,
tied embeddings) this reduces exactly to Megatron's 24·L·h²·(1 + s/6h + V/16Lh) per token forward.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class ModelArch:
    """The architecture numbers a planner needs; built from an HF config.json or the table below."""

    name: str
    hidden: int  # h
    layers: int  # L
    heads: int  # n_q
    kv_heads: int  # n_kv (grouped-query attention)
    head_dim: int  # d (Qwen3: n_q·d != h)
    ffn: int  # intermediate size F
    vocab: int  # V
    tied_embeddings: bool = False
    qkv_bias: bool = True  # Qwen2 has biases on q/k/v
    gated_mlp: bool = True  # SwiGLU: gate, up, down = 3·h·F weights; GPT-style GeLU MLP: 2·h·F

    def layer_matmul_params(self) -> int:
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        out = self.heads * self.head_dim * self.hidden
        mlp = (3 if self.gated_mlp else 2) * self.hidden * self.ffn
        return q + kv + out + mlp

    def layer_params(self) -> int:
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return self.layer_matmul_params() + bias + 2 * self.hidden  # + two RMSNorm weights

    def embedding_params(self) -> int:
        """Input embedding plus the output layer when it is not tied."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def params(self) -> int:
        return self.layers * self.layer_params() + self.embedding_params() + self.hidden

    def kv_bytes_per_token(self, dtype_bytes: float = 2.0) -> float:
        """KV-cache bytes one token holds in the inference engine (all layers, K and V)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


# Built-in architectures (numbers copied from each model's config.json on the HF Hub) so `plan` works
# offline. Qwen3-32B, Llama-3.1-8B and GPT-3 175B are here for the published-figure checks.
ARCHS: dict[str, ModelArch] = {
    a.name: a
    for a in (
        ModelArch("qwen2.5-7b", 3584, 28, 28, 4, 128, 18944, 152064),
        ModelArch("qwen2.5-32b", 5120, 64, 40, 8, 128, 27648, 152064),
        # R1-Distill-Qwen-7B is Qwen2.5-Math-7B's architecture (same shapes as Qwen2.5-7B).
        ModelArch("deepseek-r1-distill-qwen-7b", 3584, 28, 28, 4, 128, 18944, 152064),
        ModelArch("qwen3-32b", 5120, 64, 64, 8, 128, 25600, 151936, qkv_bias=False),
        ModelArch("llama-3.1-8b", 4096, 32, 32, 8, 128, 14336, 128256, qkv_bias=False),
        # Megatron-LM paper (arXiv 2104.04473) Table 1 row "175B": h 12288, 96 layers, 96 heads, V 51200.
        ModelArch("gpt3-175b", 12288, 96, 96, 96, 128, 4 * 12288, 51200, True, True, False),
    )
}


def arch_by_name(name: str) -> ModelArch:
    key = name.lower()
    if key not in ARCHS:
        raise KeyError(f"unknown model {name!r}: known {sorted(ARCHS)} (or pass --model-config config.json)")
    return ARCHS[key]


def arch_from_hf_config(config: dict | str | Path, name: str = "") -> ModelArch:
    """ModelArch from an HF config.json (a dict or a path). Missing keys are errors naming the file."""
    where = "config"
    if not isinstance(config, dict):
        where = str(config)
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{where}: cannot read HF config: {exc}") from None
    cfg = config.get("text_config", config)  # multimodal wrappers keep the decoder under text_config

    def need(key: str) -> int:
        if key not in cfg:
            raise ValueError(f"{where}: missing key {key!r} (needed for FLOPs/memory estimates)")
        return int(cfg[key])

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    model_type = str(cfg.get("model_type", ""))
    return ModelArch(
        name=name or str(cfg.get("_name_or_path", model_type or "hf-model")),
        hidden=hidden,
        layers=need("num_hidden_layers"),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        ffn=need("intermediate_size"),
        vocab=need("vocab_size"),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
    )


def forward_flops_per_token(arch: ModelArch, context: float) -> float:
    """Forward FLOPs for one token attending to `context` tokens (full s×s counting, see module doc)."""
    matmul = 2.0 * arch.layers * arch.layer_matmul_params()
    logits = 2.0 * arch.vocab * arch.hidden
    attention = 4.0 * arch.layers * arch.heads * arch.head_dim * context  # QK^T and AV
    return matmul + logits + attention


def train_flops_per_token(arch: ModelArch, seq_len: float, recompute: bool = False) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) per trained token: 3·F_fwd; with full recompute the transformer
    layers run forward twice (4 passes) while the output layer is not recomputed (3 passes), which is
    exactly Megatron's 96·B·s·L·h²·(1 + s/6h + V/16Lh) for GPT-3."""
    fwd = forward_flops_per_token(arch, seq_len)
    logits = 2.0 * arch.vocab * arch.hidden
    return 3.0 * fwd, 3.0 * fwd + ((fwd - logits) if recompute else 0.0)


@dataclass(frozen=True)
class GpuSpec:
    """Dense (no sparsity) peak FLOP/s and bandwidths from the vendor datasheets."""

    name: str
    bf16_flops: float
    fp8_flops: float  # 0 = no FP8 tensor cores
    hbm_gib: float  # total as nvidia-smi reports it
    hbm_bw: float  # bytes/s
    nvlink_bw: float  # bytes/s per direction per GPU
    net_bw: float  # bytes/s per GPU across nodes (InfiniBand)
    pcie_bw: float  # bytes/s host <-> device
    gpus_per_node: int = 8


GPUS: dict[str, GpuSpec] = {
    # H100 SXM5 datasheet: 989 TFLOP/s BF16 dense, 1979 FP8 dense, 3.35 TB/s, NVLink 900 GB/s bidir.
    "h100-80g": GpuSpec("h100-80g", 989.4e12, 1978.9e12, 79.6, 3.35e12, 450e9, 50e9, 55e9),
    # H200 SXM: same compute as H100, 141 GB HBM3e at 4.8 TB/s.
    "h200": GpuSpec("h200", 989.4e12, 1978.9e12, 140.4, 4.8e12, 450e9, 50e9, 55e9),
    # A100 SXM4 80GB: 312 TFLOP/s BF16 dense, no FP8, 2.04 TB/s, NVLink 600 GB/s bidir, HDR 200 Gb/s.
    "a100-80g": GpuSpec("a100-80g", 312e12, 0.0, 79.2, 2.039e12, 300e9, 25e9, 25e9),
    # A nominal CPU "device" so CPU runs report an MFU at all: 1 TFLOP/s (a few AVX-512 cores).
    # Replace with measure_matmul_flops() for a real figure on the machine at hand.
    "cpu": GpuSpec("cpu", 1e12, 0.0, 16.0, 20e9, 20e9, 1e9, 20e9, 1),
}


def gpu_by_name(name: str) -> GpuSpec:
    if name.lower() not in GPUS:
        raise KeyError(f"unknown gpu {name!r}: known {sorted(GPUS)}")
    return GPUS[name.lower()]


# CUDA device names (torch.cuda.get_device_name) -> GPUS key, first match wins: "NVIDIA H200",
# "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB".
_DEVICE_NAME_KEYS = (("h200", "h200"), ("h100", "h100-80g"), ("a100", "a100-80g"))


def gpu_for_device_name(device_name: str) -> GpuSpec:
    """The spec of a CUDA device by its reported name, so MFU divides by that chip's peak; a chip not
    in GPUS is taken as an H100 (the spec the recipes assume), with that name kept in `name`."""
    low = device_name.lower()
    for part, key in _DEVICE_NAME_KEYS:
        if part in low:
            return GPUS[key]
    return replace(GPUS["h100-80g"], name=f"{device_name} (as h100-80g)")


def peak_flops(gpu: GpuSpec, fp8: bool = False) -> float:
    if fp8 and gpu.fp8_flops <= 0:
        raise ValueError(f"{gpu.name} has no FP8 tensor cores: policy.fp8 / rollout.fp8 need Hopper or newer")
    return gpu.fp8_flops if fp8 else gpu.bf16_flops


def measure_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 matmul FLOP/s on this machine's CPU (the best of `repeats`): a CPU 'peak' for MFU."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up (thread pool, allocator)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def cpu_spec_measured() -> GpuSpec:
    flops = measure_matmul_flops()
    return replace(GPUS["cpu"], bf16_flops=flops)


def mfu(model_flops: float, seconds: float, n_devices: int, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' combined peak."""
    if seconds <= 0 or n_devices <= 0 or peak <= 0:
        return 0.0
    return model_flops / seconds / (n_devices * peak)


def tokens_per_second(tokens: float, seconds: float, n_devices: int = 1) -> float:
    """Tokens per second per device (NeMo-RL's tokens/s/GPU when n_devices is the GPU count)."""
    return tokens / seconds / n_devices if seconds > 0 and n_devices > 0 else 0.0


def step_throughput(times: dict[str, float], *, arch: ModelArch, n_devices: int, peak: float,
                    rollout_tokens: float, train_tokens: float, train_seq_len: float,
                    trained_models: int = 2, forward_only_passes: float = 2.0, sync_bytes: float = 0.0,
                    train_stages: tuple[str, ...] = ("train", "token_rm", "policy", "reference")) -> dict[str, float]:
    """The throughput metrics of one step from its `time/<stage>` seconds (StageTimer.step_end()).

    `tokens/s/train`: trained tokens per second per device over the training stages (`train_stages`,
    whichever exist); `mfu`: their model FLOPs (3·F_fwd per trained
    model, F_fwd per forward-only pass) over those seconds; `tokens/s/rollout`: generated tokens per
    second per device; `tokens/s/step`: rollout tokens over the whole step (NeMo-RL's tokens/s/GPU);
    `sync/gbps`: weight-sync GB/s.
    """
    train_s = sum(times.get(f"time/{s}", 0.0) for s in train_stages)
    fwd = forward_flops_per_token(arch, train_seq_len)
    model_flops = train_tokens * fwd * (3.0 * trained_models + forward_only_passes)
    out = {
        "tokens/s/train": tokens_per_second(train_tokens, train_s, n_devices),
        "mfu": mfu(model_flops, train_s, n_devices, peak),
        "tokens/s/rollout": tokens_per_second(rollout_tokens, times.get("time/rollout", 0.0), n_devices),
        "tokens/s/step": tokens_per_second(rollout_tokens, times.get("time/step", 0.0), n_devices),
    }
    if sync_bytes and times.get("time/weight_sync", 0.0) > 0:
        out["sync/gbps"] = sync_bytes / times["time/weight_sync"] / 1e9
    return out
