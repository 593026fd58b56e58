"""GPU recipes (examples/*.yaml), the FP8 config mapping, and the train/rollout log-prob mismatch.

The recipes cannot run here (no GPU), so they are checked the way a user first meets them: they load
with no unknown key, carry docs/algorithm.md §4.3's hyper-parameters exactly, and fit an H100-80GB per the
planner (observability/plan.py). The FP8 mapping is checked against megatron-core's own
TransformerConfig validation (no TE needed). The log-prob check runs the real chain on the CPU: a
tiny HF checkpoint -> Megatron policy -> (weights changed) -> weight sync -> CPU engine samples at
T=1 with log-probs -> Megatron's log-probs of the same tokens, in a world of one.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from helpers.layout import single_rank_layout

from megatron_oreal.config import load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# recipe -> (GPUs it is written for, planner architecture, OREAL tp_size, system prompt)
RECIPES = {
    "qwen2.5-7b.yaml": (32, "qwen2.5-7b", 4, "oreal"),
    "deepseek-r1-distill-qwen-7b.yaml": (32, "deepseek-r1-distill-qwen-7b", 4, "none"),
    "qwen2.5-32b.yaml": (64, "qwen2.5-32b", 8, "oreal"),
    "qwen2.5-32b-fp8.yaml": (128, "qwen2.5-32b", 8, "oreal"),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_has_oreal_hyperparameters(name):
    cfg = load_config(EXAMPLES / name)  # unknown keys / bad values raise ConfigError
    gpus, _, tp, system = RECIPES[name]
    s, a = cfg.rollout.sampling, cfg.algo
    # docs/algorithm.md §4.3 (identical for 7B, 32B and DSR1)
    assert cfg.steps == 90 and cfg.seed == 0
    assert (cfg.data.prompts_per_step, s.n) == (64, 16)
    assert (s.temperature, s.top_p, s.top_k, s.max_new_tokens, s.max_total_length) == (1.0, 0.9, 0, 14000, 16384)
    assert s.stop_token_ids == []  # the tokenizer's eos: <|im_end|> (Qwen/OREAL-SFT), <｜end▁of▁sentence｜> (DSR1)
    assert (a.advantage, a.selection, a.positive_loss, a.pos_mult_adv) == ("rloo", "one_pair", "bc", True)
    assert (a.positive_loss_factor, a.negative_loss_factor, a.kl_coef, a.kl_type) == (1.0, 0.5, 0.01, "k3")
    assert (a.token_weighting, a.correct_threshold, a.incorrect_threshold) == ("threshold", 0.5, 0.5)
    assert a.actor_freeze_steps == 10 and cfg.token_rm.enabled
    for optim, lr, min_lr in ((cfg.policy.optim, 5e-7, 1e-7), (cfg.token_rm.optim, 2e-6, 4e-7)):
        assert (optim.lr, optim.min_lr, optim.warmup_steps) == (lr, min_lr, 10)
        assert (optim.weight_decay, optim.clip_grad, optim.adam_beta1, optim.adam_beta2, optim.adam_eps) == (
            0.01, 1.0, 0.9, 0.999, 1e-8)
    assert cfg.data.system_prompt == system and cfg.data.prompt_format == "chat" and cfg.data.difficulty_balance
    assert cfg.parallel.tensor == tp and cfg.policy.dtype == "bf16"
    # GPU choices: SGLang co-located, one engine per replica's stage TP GPUs (runtime.py
    # Comm.is_engine_rank), so the engine's TP must be the training TP and fit in one 8-GPU node.
    assert cfg.rollout.engine == "sglang" and cfg.rollout.tensor_parallel_size == tp <= 8
    assert cfg.parallel.distributed_optimizer and cfg.policy.recompute and cfg.rollout.log_logprob_mismatch
    assert gpus % (cfg.parallel.tensor * cfg.parallel.pipeline) == 0
    assert cfg.policy.hf_path.startswith("/path/to/") and cfg.data.train_file.startswith("/path/to/")
    fp8 = name.endswith("-fp8.yaml")
    assert (cfg.policy.fp8, cfg.rollout.fp8) == (("blockwise", True) if fp8 else ("", False))
    assert cfg.eval.every == 10 and cfg.eval.keep_best and cfg.checkpoint.every == 10


def test_system_prompts_resolve():
    from megatron_oreal.data.templates import OREAL_SYSTEM_PROMPT, resolve_system_prompt

    assert resolve_system_prompt(load_config(EXAMPLES / "qwen2.5-7b.yaml").data.system_prompt) == OREAL_SYSTEM_PROMPT
    assert resolve_system_prompt(load_config(EXAMPLES / "deepseek-r1-distill-qwen-7b.yaml").data.system_prompt) == ""


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_fits_h100_per_planner(name, capsys):
    from megatron_oreal.observability import plan
    from megatron_oreal.observability.estimate import GIB, step_estimate
    from megatron_oreal.observability.flops import arch_by_name

    gpus, model, _, _ = RECIPES[name]
    cfg = load_config(EXAMPLES / name)
    est = step_estimate(plan.workload_from_config(cfg, arch_by_name(model), "h100-80g", gpus))
    mem = est["memory"]
    comps = mem["components"]
    for key in ("policy weights", "policy grads", "policy optimizer", "token_rm weights", "engine weights",
                "engine KV cache"):
        assert comps[key] > 0, key
    assert comps["engine KV cache"] > 10 * GIB  # room for long (16k-token) rollouts
    for phase, b in mem["phases"].items():
        if phase == "rollout (train state resident)" and cfg.policy.offload_train_state:
            continue  # what the offload avoids
        assert b <= 0.95 * mem["hbm"], f"{name}: {phase} needs {b / GIB:.1f} GiB"
    offload = cfg.policy.offload_train_state
    assert mem["offload_needed"] == offload and ("offload_onload" in est["stages"]) == offload
    assert plan.main([str(EXAMPLES / name), "--gpus", str(gpus), "--model", model]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU" in out and "set policy.offload_train_state" not in out
    # only the "what if it stayed resident" line may say NO, and only when the recipe offloads
    no = [line for line in out.splitlines() if line.rstrip().endswith("NO")]
    assert no == ([line for line in no if line.startswith("rollout (train state resident)")] if offload else [])


def test_32b_recipes_offload_at_pp1_and_beat_pp2_per_planner():
    """Why the 32B recipes run TP 8 / PP 1 with policy.offload_train_state (their comments, docs/gpu.md
    §3): without offload the train state does not fit beside the engine at PP 1, and with it every GPU
    rolls out, which the planner says is faster than PP 2 with engines on the first stage only."""
    from megatron_oreal.observability import plan
    from megatron_oreal.observability.estimate import memory_table, step_estimate
    from megatron_oreal.observability.flops import arch_by_name

    for name, gpus in (("qwen2.5-32b.yaml", 64), ("qwen2.5-32b-fp8.yaml", 128)):
        arch = arch_by_name("qwen2.5-32b")
        cfg = load_config(EXAMPLES / name)
        assert (cfg.parallel.pipeline, cfg.policy.offload_train_state) == (1, True), name
        resident = load_config(EXAMPLES / name, ["policy.offload_train_state=false"])
        assert memory_table(plan.workload_from_config(resident, arch, "h100-80g", gpus))["offload_needed"], name
        old = load_config(EXAMPLES / name, ["policy.offload_train_state=false", "parallel.pipeline=2",
                                            "rollout.mem_fraction_static=0.4"])
        new_est = step_estimate(plan.workload_from_config(cfg, arch, "h100-80g", gpus))
        old_est = step_estimate(plan.workload_from_config(old, arch, "h100-80g", gpus))
        assert new_est["tokens_per_s_per_gpu"] > old_est["tokens_per_s_per_gpu"], name
    cfg = load_config(EXAMPLES / "qwen2.5-7b.yaml", ["rollout.mem_fraction_static=0.6"])
    assert memory_table(plan.workload_from_config(cfg, arch_by_name("qwen2.5-7b"), "h100-80g", 32))["offload_needed"]


# ---------------------------------------------------------------------------------------- FP8


@pytest.mark.parametrize("mode,fmt", [("blockwise", "e4m3"), ("tensorwise", "hybrid")])
def test_fp8_fields_pass_megatron_validation(mode, fmt):
    from megatron.core.transformer import TransformerConfig

    from megatron_oreal.mcore.hf_config import fp8_config_fields

    fields = fp8_config_fields(mode)
    assert fields == {"fp8": fmt, "fp8_recipe": mode, "fp8_param": False, "fp8_dot_product_attention": False,
                      "fp8_multi_head_attention": False, "first_last_layers_bf16": False}
    # megatron-core's __post_init__ validates the combination (e.g. it refuses delayed + bf16 first/last).
    tc = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, bf16=True,
                           params_dtype=torch.bfloat16, **fields)
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_param) == (fmt, mode, False)


def test_fp8_fields_errors():
    from megatron_oreal.mcore.hf_config import fp8_config_fields

    assert fp8_config_fields("") == {}
    with pytest.raises(ValueError, match="fp8 must be '', 'blockwise' or 'tensorwise', got 'delayed'"):
        fp8_config_fields("delayed")
    with pytest.raises(ValueError, match="fp8 training needs dtype=bf16"):
        fp8_config_fields("blockwise", "fp32")


# ------------------------------------------------------------------------------- log-prob mismatch


def test_logprob_mismatch_hand_computed():
    from megatron_oreal.mcore.train_step import logprob_mismatch

    sums, mx = logprob_mismatch(torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.1, -2.0, -0.2]))
    # Δ = train − rollout = [0.1, 0, −0.3]; k3 = e^Δ − Δ − 1
    assert float(sums["sum/lp_abs_diff"]) == pytest.approx(0.4, abs=1e-6)
    assert mx == pytest.approx(0.3, abs=1e-6)
    assert float(sums["sum/lp_k3"]) == pytest.approx((math.exp(0.1) - 1.1) + (math.exp(-0.3) - 0.7), abs=1e-6)
    assert float(sums["tokens/lp_compared"]) == 3.0


def test_sampler_logprobs_travel_to_train_sequences():
    from megatron_oreal.algo.selection import build_train_batch
    from megatron_oreal.rollout.engine import GenOutput, to_groups
    from megatron_oreal.types import Prompt

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    prompts = [Prompt("p0", "q", "1", input_ids=[1, 2])]
    outs = [[GenOutput([5, 6], "stop", [-0.5, -0.25]), GenOutput([7], "length", [-2.0])]]
    groups = to_groups(prompts, outs, Tok())
    assert [s.rollout_logprobs for s in groups[0].samples] == [[-0.5, -0.25], [-2.0]]
    groups[0].samples[0].reward, groups[0].samples[1].reward = 1.0, -1.0
    batch = build_train_batch(groups)
    assert {tuple(s.response_ids): s.rollout_logprobs for s in batch.sequences} == {(5, 6): [-0.5, -0.25], (7,): [-2.0]}
    assert to_groups(prompts, [[GenOutput([5], "stop")]], Tok())[0].samples[0].rollout_logprobs is None
    with pytest.raises(RuntimeError, match="prompt p0: 1 log-probs for 2 tokens"):
        to_groups(prompts, [[GenOutput([5, 6], "stop", [-1.0])]], Tok())


@pytest.fixture(scope="module")
def layout():
    with single_rank_layout(seed=11) as lay:
        yield lay


def test_cpu_engine_logprobs_match_megatron_after_sync(tmp_path, layout):
    """Sampler (CPU engine, T=1, no top-p/k) log-probs vs Megatron's of the same tokens, after a
    weight sync of changed weights: agreement to ~1e-5 checks sync + engine + Megatron forward at
    once; the un-synced engine (the HF file's weights) must disagree, or the check proves nothing."""
    from helpers.tiny_hf import make_tiny_qwen2
    from transformers import AutoModelForCausalLM

    from megatron_oreal.algo.selection import build_train_batch
    from megatron_oreal.checkpoint.gather import iter_hf_tensors
    from megatron_oreal.checkpoint.hf_io import load_hf_weights
    from megatron_oreal.config import AlgoConfig, OptimConfig
    from megatron_oreal.mcore.hf_config import load_hf_config
    from megatron_oreal.mcore.model import build_policy
    from megatron_oreal.mcore.train_step import OrealTrainer, compute_logprobs
    from megatron_oreal.rollout.cpu_engine import CPUEngine
    from megatron_oreal.rollout.engine import SamplingParams, to_groups
    from megatron_oreal.sync import InProcessTransport, sync_weights
    from megatron_oreal.types import Prompt

    torch.set_num_threads(1)
    make_tiny_qwen2(tmp_path, seed=5)
    policy = build_policy(load_hf_config(tmp_path), layout)
    load_hf_weights(policy, tmp_path, layout)
    with torch.no_grad():  # the trained weights differ from the engine's start-up checkpoint
        g = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    engine = CPUEngine(str(tmp_path))
    stale = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    flat = ((n, t) for bucket in iter_hf_tensors(policy, layout) for n, t in bucket)
    sync_weights(flat, InProcessTransport(engine))

    gen = torch.Generator().manual_seed(2)
    prompts = [Prompt(f"p{i}", "", "", input_ids=torch.randint(0, 250, (5 + 3 * i,), generator=gen).tolist())
               for i in range(3)]
    sp = SamplingParams(n=4, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=3, return_logprobs=True)
    groups = to_groups(prompts, engine.generate([p.input_ids for p in prompts], sp), tokenizer=_NoTok())
    for g_ in groups:  # mixed rewards so one_pair keeps a pair per prompt
        for j, s in enumerate(g_.samples):
            s.reward = 1.0 if j % 2 == 0 else -1.0
    batch = build_train_batch(groups)
    assert batch.num_sequences == 6 and all(len(s.rollout_logprobs) == 12 for s in batch.sequences)

    megatron = compute_logprobs(policy, batch, layout)
    sampler = [torch.tensor(s.rollout_logprobs) for s in batch.sequences]
    diff = max(float((m - r).abs().max()) for m, r in zip(megatron, sampler))
    assert diff < 1e-4, diff
    assert min(float(m.min()) for m in megatron) < -1.0  # not a degenerate near-one-hot distribution

    # Without the sync the engine would hold the HF file's weights: those log-probs are far off.
    s0 = batch.sequences[0]
    ids = torch.tensor([s0.prompt_ids + s0.response_ids])
    with torch.no_grad():
        logits = stale(ids).logits[0, len(s0.prompt_ids) - 1:-1]
    unsynced = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(s0.response_ids)[:, None]).squeeze(1)
    assert float((unsynced - megatron[0]).abs().max()) > 1e-2

    # The trainer hook: the policy pass (frozen step: forward only) reports the same agreement.
    trainer = OrealTrainer(policy, None, None, layout, AlgoConfig(token_weighting="none", kl_coef=0.0),
                           OptimConfig(), None, total_steps=20)
    m = trainer.update(batch, step=0)
    assert m["rollout/logprob_abs_diff_mean"] < 1e-5 and m["rollout/logprob_diff_max"] < 1e-4
    assert 0.0 <= m["rollout/logprob_k3_kl"] < 1e-8
    shifted = build_train_batch(groups)
    for s in shifted.sequences:
        s.rollout_logprobs = [x - 0.1 for x in s.rollout_logprobs]
    m = trainer.update(shifted, step=0)
    assert m["rollout/logprob_abs_diff_mean"] == pytest.approx(0.1, abs=1e-4)
    assert m["rollout/logprob_k3_kl"] == pytest.approx(math.exp(0.1) - 1.1, abs=1e-4)


class _NoTok:
    def decode(self, ids, skip_special_tokens=True):
        return ""
