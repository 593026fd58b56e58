"""Per-GPU memory and step-time estimates for one RL step (pure functions; formulas in docs/planning.md).

`Workload` describes a run in planner terms (model, cluster, parallel layout, batch, lengths);
`plan.py` builds one from a RunConfig, `published.py` from peers' published configurations.
Everything uncertain is an explicit, stated `Assumptions` field; nothing is fitted to the published
figures the estimates are checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_oreal.observability.flops import (GpuSpec, ModelArch, forward_flops_per_token, peak_flops,
                                                train_flops_per_token)

GIB = 2**30


@dataclass(frozen=True)
class Assumptions:
    # Fraction of peak the training GEMMs reach on executed FLOPs (HFU). Megatron-LM reports 41-52%
    # on A100/H100 for dense GPTs (arXiv 2104.04473 Table 1; Megatron-LM README); RL batches are
    # smaller and ragged, so we take the low end.
    train_eff_bf16: float = 0.40
    # Of FP8 peak: 0.27·1979 ≈ 1.35× the BF16 rate, the GEMM speed-up TE FP8 recipes typically give
    # (NeMo-RL docs/fp8.md reports a 15-25% step-time decrease end to end).
    train_eff_fp8: float = 0.27
    decode_bw_eff: float = 0.60  # fraction of HBM bandwidth a decode step achieves (weights + KV reads)
    decode_compute_eff: float = 0.50  # fraction of peak for decode/prefill GEMMs when compute-bound
    link_eff: float = 0.60  # fraction of NVLink / InfiniBand / PCIe bandwidth achieved by copies
    engine_load_gbps: float = 20.0  # engine-side weight loading rate per GPU (GB/s): names, copies
    bucket_latency_s: float = 0.02  # fixed cost per weight-sync bucket (IPC handles, engine RPC, barrier)
    decode_step_overhead_s: float = 0.001  # scheduler + sampling + launch per decode step (CUDA graphs on)
    allreduce_latency_s: float = 10e-6  # one small NVLink all-reduce; a TP engine does 2 per layer per step
    grad_bytes: float = 4.0  # Megatron DDP keeps fp32 main grads (accumulate/reduce in fp32)
    overhead_gib: float = 3.0  # CUDA context, NCCL buffers, allocator fragmentation per GPU
    mixed_fraction: float = 0.75  # share of prompts with 0 < pass rate < 1 (kept by one_pair selection)
    mean_response_fraction: float = 0.5  # mean response / max_new_tokens when the length is not given
    prompt_tokens: int = 256  # mean prompt length incl. chat template and system prompt


@dataclass(frozen=True)
class Workload:
    arch: ModelArch
    gpu: GpuSpec
    n_gpus: int
    tp: int = 1
    pp: int = 1
    distributed_optimizer: bool = True
    dtype_bytes: float = 2.0  # training params (bf16); 4 for fp32
    fp8: bool = False  # FP8 training GEMMs (Transformer Engine)
    recompute: bool = False  # full activation recompute
    micro_batch_tokens: int = 16384
    optimizer_offload: bool = False  # Adam state + master weights on the host
    # policy.offload_train_state: params, grads and optimizer of both models on the host during rollout
    # (mcore/offload.py); the policy's params stay until the weight sync has resumed the engine's KV cache.
    offload_train_state: bool = False
    rollout_tp: int = 1
    mem_fraction: float = 0.6  # SGLang mem_fraction_static / vLLM gpu_memory_utilization
    rollout_weight_bytes: float = 2.0  # 1 for an FP8 engine
    samples: int = 1024  # sequences generated per step
    prompt_tokens: float = 256
    mean_response_tokens: float = 4096
    max_response_tokens: float = 8192
    train_sequences: float = 1024  # sequences that go through training per step
    trained_models: int = 2  # policy + token RM (OREAL), 1 for GRPO
    fwd_only_passes: float = 2.0  # extra forwards per trained token (reference; RM scoring / old log-probs)
    reference_on_host: bool = True  # docs/design.md decision 3: reference weights off-GPU, swapped in
    rm_has_vocab_head: bool = False  # OREAL's RM replaces the V×h output layer with h→1
    optimizer_steps: int = 1  # optimizer steps per RL step (micro-batches are split across them)
    sync_bucket_mb: int = 512
    # True: one engine per replica, on its stage-0 TP group (runtime.py by default); False: engines on
    # every pipeline stage (rollout.engines_on_every_stage; NeMo-RL's vLLM in the published checks).
    engines_on_first_stage: bool = True
    assumptions: Assumptions = field(default_factory=Assumptions)

    @property
    def dp(self) -> int:
        return self.n_gpus // (self.tp * self.pp)

    @property
    def engines(self) -> int:
        """Rollout engines: one per `rollout_tp` GPUs, of the first pipeline stage only (the other stages
        wait during rollout) unless engines run on every stage."""
        stages = self.pp if self.engines_on_first_stage else 1
        return max(self.n_gpus // (self.rollout_tp * stages), 1)

    def check(self) -> None:
        if self.n_gpus % (self.tp * self.pp):
            raise ValueError(f"--gpus {self.n_gpus} is not divisible by parallel.tensor × parallel.pipeline "
                             f"= {self.tp}×{self.pp}")
        if self.n_gpus % self.rollout_tp:
            raise ValueError(f"--gpus {self.n_gpus} is not divisible by rollout.tensor_parallel_size "
                             f"= {self.rollout_tp}")
        if self.arch.layers % self.pp:
            raise ValueError(f"{self.arch.name}: {self.arch.layers} layers do not split into "
                             f"parallel.pipeline={self.pp} stages")


# ---------------------------------------------------------------- memory


def stage_params(arch: ModelArch, pp: int, vocab_head: bool = True) -> float:
    """Parameters of the largest pipeline stage: its layers plus the embedding (first stage) or the
    output layer (last stage); with pp=1 both."""
    layers = arch.layers // pp * arch.layer_params()
    emb, out = arch.vocab * arch.hidden, (arch.vocab * arch.hidden if not arch.tied_embeddings else 0)
    if not vocab_head:
        out = arch.hidden  # token RM: h→1 head
    if pp == 1:
        return layers + emb + out + arch.hidden
    return layers + max(emb, out + arch.hidden)


def activation_bytes_per_token_layer(arch: ModelArch) -> float:
    """Saved activations per token per layer without recompute (bf16, flash attention, no dropout).

    Korthikanti et al. 2022 (arXiv 2205.05198) count 34·h bytes for a GPT layer; for a Qwen/Llama layer
    the saved tensors are: two RMSNorm inputs (2·2h), QKV input (2h), Q, K, V (2·(n_q·d + 2·n_kv·d)),
    attention output (2·n_q·d), MLP input (2h), gate and up outputs (2·2F), SwiGLU output (2F).
    """
    h, qd, kvd, f = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.ffn
    return 2 * (2 * h + h + (qd + 2 * kvd) + qd + h + 2 * f + f)


def memory_table(w: Workload) -> dict:
    """Per-GPU bytes of each component and the totals of each phase (see docs/planning.md §2)."""
    a, A = w.arch, w.assumptions
    w.check()
    shard = w.tp  # weights/grads of a stage are split over TP
    p_pol = stage_params(a, w.pp) / shard
    p_rm = stage_params(a, w.pp, vocab_head=w.rm_has_vocab_head) / shard
    opt_div = w.dp if w.distributed_optimizer else 1
    comp: dict[str, float] = {}
    host: dict[str, float] = {}
    for tag, p, on in (("policy", p_pol, True), ("token_rm", p_rm, w.trained_models >= 2)):
        if not on:
            continue
        comp[f"{tag} weights"] = p * w.dtype_bytes + (p if w.fp8 else 0.0)  # + FP8 weight copies
        comp[f"{tag} grads"] = p * A.grad_bytes
        opt = p * 12.0 / opt_div  # fp32 master + Adam m, v (12 bytes/param), sharded over DP
        if w.optimizer_offload:
            host[f"{tag} optimizer"] = opt
            comp[f"{tag} optimizer"] = 0.0
        else:
            comp[f"{tag} optimizer"] = opt
    # Activations of one micro-batch per in-flight stage: with 1F1B the first stage holds pp micro-batches
    # of L/pp layers, i.e. about L layers' worth; sequence parallelism splits them over TP.
    per_layer = activation_bytes_per_token_layer(a) / w.tp
    layers_held = a.layers if not w.recompute else 0
    act = w.micro_batch_tokens * per_layer * layers_held
    if w.recompute:  # layer inputs of every layer + one layer being recomputed
        act = w.micro_batch_tokens * (2 * a.hidden / w.tp * a.layers + per_layer)
    logits = w.micro_batch_tokens * a.vocab / w.tp * 4 * 2  # fp32 logits + their grad (last stage)
    comp["activations"] = act
    comp["logits (fp32)"] = logits
    ref = stage_params(a, w.pp) / shard * 2.0
    if w.reference_on_host:
        host["reference weights"] = ref
    eng_w = a.params() * w.rollout_weight_bytes / w.rollout_tp
    pool = w.mem_fraction * w.gpu.hbm_gib * GIB
    comp["engine weights"] = eng_w
    comp["engine KV cache"] = max(pool - eng_w, 0.0)
    comp["overhead"] = A.overhead_gib * GIB
    state = sum(v for k, v in comp.items() if k.startswith(("policy", "token_rm")))
    # With policy.offload_train_state the policy's weights leave only after the weight sync, which
    # resumes the engine's KV cache at its end (runtime.Run.to_rollout): they count in that phase.
    # TE's FP8 weight copies (1 B/param, the "+1" above) are module workspaces, not parameters:
    # mcore/offload.py does not move them, so they stay on the GPU through rollout.
    fp8_copies = (p_pol + (p_rm if w.trained_models >= 2 else 0.0)) if w.fp8 else 0.0
    in_sync = p_pol * w.dtype_bytes + fp8_copies if w.offload_train_state else 0.0
    phases = {
        "rollout (train state resident)": state + eng_w + comp["engine KV cache"] + comp["overhead"],
        "rollout (train state offloaded)": in_sync + eng_w + comp["engine KV cache"] + comp["overhead"],
        "train (engine released)": state + act + logits + comp["overhead"],
        "reference forward": state + (ref if w.reference_on_host else 0.0) + logits / 2 + comp["overhead"],
    }
    if not w.reference_on_host:
        comp["reference weights"] = ref
        phases = {k: v + ref for k, v in phases.items()}
    hbm = w.gpu.hbm_gib * GIB
    offload_needed = w.offload_train_state or phases["rollout (train state resident)"] > 0.95 * hbm
    # What our offload (mcore/offload.py) copies to the host and back: the state less the gradient
    # buffers (freed without a copy: every update zeroes them first) and TE's FP8 copies (not moved).
    # Without policy.offload_train_state (a peer's system in published.py, or a plan that says an
    # offload is needed) the whole state is counted, as before.
    grads = sum(v for k, v in comp.items() if k.endswith(" grads"))
    copied = state - grads - fp8_copies if w.offload_train_state else state
    if offload_needed:
        host["train state (offloaded in rollout)"] = copied
    return {"components": comp, "host": host, "phases": phases, "hbm": hbm, "train_state": state,
            "offload_bytes": copied,
            "kv_tokens": comp["engine KV cache"] * w.rollout_tp / a.kv_bytes_per_token(2.0),
            "offload_needed": offload_needed}


# ---------------------------------------------------------------- time


def rollout_seconds(w: Workload, kv_tokens: float) -> dict:
    """Decode-bound generation time of one engine (all engines run in parallel on equal shares).

    Engines run on the first pipeline stage only (runtime.py's default: one per model-parallel replica,
    on the TP group of stage 0), so with PP > 1 the other stages' GPUs wait during rollout, unless
    `engines_on_first_stage` is off (rollout.engines_on_every_stage)."""
    a, g, A = w.arch, w.gpu, w.assumptions
    engines = w.engines
    per_engine = math.ceil(w.samples / engines)
    seq = w.prompt_tokens + w.mean_response_tokens
    conc = max(1.0, min(per_engine, kv_tokens / seq))  # sequences decoding together (KV-bound)
    ctx = w.prompt_tokens + w.mean_response_tokens / 2  # mean context during decoding
    kv_b = a.kv_bytes_per_token(2.0)
    peak = peak_flops(g, w.rollout_weight_bytes < 2)

    def step_s(c: float, context: float) -> float:
        read = (a.params() * w.rollout_weight_bytes + c * context * kv_b) / w.rollout_tp
        flops = c * forward_flops_per_token(a, context) / w.rollout_tp
        comm = 2 * a.layers * A.allreduce_latency_s if w.rollout_tp > 1 else 0.0
        roofline = max(read / (g.hbm_bw * A.decode_bw_eff), flops / (peak * A.decode_compute_eff))
        return roofline + comm + A.decode_step_overhead_s

    full_steps = per_engine * w.mean_response_tokens / conc
    tail = max(w.max_response_tokens - full_steps, 0.0)  # the longest sample finishes alone
    decode = full_steps * step_s(conc, ctx) + tail * step_s(1, w.prompt_tokens + w.max_response_tokens)
    prefill = per_engine * w.prompt_tokens * forward_flops_per_token(a, w.prompt_tokens) / (
        w.rollout_tp * peak * A.decode_compute_eff)
    return {"seconds": decode + prefill, "concurrency": conc, "step_ms": 1e3 * step_s(conc, ctx),
            "decode_steps": full_steps + tail, "tokens": w.samples * seq}


def train_seconds(w: Workload) -> dict:
    """All training-side model passes of the step: backward models, forward-only passes, bubble."""
    a, g, A = w.arch, w.gpu, w.assumptions
    seq = w.prompt_tokens + w.mean_response_tokens
    tokens = w.train_sequences * seq
    fwd = forward_flops_per_token(a, seq)
    attn = 4.0 * a.layers * a.heads * a.head_dim * seq
    model_t, hw_t = train_flops_per_token(a, seq, w.recompute)
    hw = tokens * (w.trained_models * hw_t + w.fwd_only_passes * fwd)
    model = tokens * (w.trained_models * model_t + w.fwd_only_passes * fwd)
    gemm_rate = peak_flops(g, w.fp8) * (A.train_eff_fp8 if w.fp8 else A.train_eff_bf16)
    attn_rate = g.bf16_flops * A.train_eff_bf16  # attention stays in BF16 under TE FP8 recipes
    share = attn / fwd
    compute = hw * ((1 - share) / gemm_rate + share / attn_rate) / w.n_gpus
    micro = max(1, math.ceil(tokens / w.dp / w.micro_batch_tokens / w.optimizer_steps))
    bubble = (w.pp - 1) / (micro + w.pp - 1)  # 1F1B pipeline bubble (Narayanan et al. 2021 §2.2)
    seconds = compute / (1 - bubble)
    return {"seconds": seconds, "tokens": tokens, "model_flops": model, "hw_flops": hw, "bubble": bubble,
            "mfu": model / seconds / (w.n_gpus * peak_flops(g, False))}


def sync_seconds(w: Workload) -> dict:
    """Weight sync: gather the training shards (TP×PP) into full tensors, then the engine loads its
    slice; plus a fixed cost per bucket."""
    a, g, A = w.arch, w.gpu, w.assumptions
    full = a.params() * 2.0  # sent as bf16 (FP8 engines quantise on the receiving side)
    group = w.tp * w.pp
    link = g.nvlink_bw if group <= g.gpus_per_node else g.net_bw
    gather = full * (1 - 1 / group) / (link * A.link_eff)
    load = a.params() * w.rollout_weight_bytes / w.rollout_tp / (A.engine_load_gbps * 1e9)
    buckets = math.ceil(full / (w.sync_bucket_mb * 2**20))
    seconds = gather + load + buckets * A.bucket_latency_s
    return {"seconds": seconds, "bytes": full, "gbps": full / seconds / 1e9}


def step_estimate(w: Workload) -> dict:
    """Seconds per stage of one RL step and the derived throughput figures."""
    mem = memory_table(w)
    A, g = w.assumptions, w.gpu
    roll = rollout_seconds(w, mem["kv_tokens"])
    train = train_seconds(w)
    sync = sync_seconds(w)
    pcie = g.pcie_bw * A.link_eff
    stages = {"rollout": roll["seconds"], "train": train["seconds"], "weight_sync": sync["seconds"]}
    if w.reference_on_host:  # copy the reference shard in for its forward (and drop it after)
        stages["reference_swap"] = mem["host"]["reference weights"] / pcie
    if mem["offload_needed"]:  # train state out before rollout, back in before training
        stages["offload_onload"] = 2 * mem["offload_bytes"] / pcie
    step = sum(stages.values())
    return {"stages": stages, "step_s": step, "memory": mem, "rollout": roll, "train": train, "sync": sync,
            "tokens_per_s_per_gpu": roll["tokens"] / step / w.n_gpus}
