"""Planner: hand-computed memory terms, OREAL workload from a config, CLI, and published figures."""

from dataclasses import replace

import pytest

from megatron_oreal.config import load_config
from megatron_oreal.observability import plan
from megatron_oreal.observability.estimate import (Workload, activation_bytes_per_token_layer, memory_table,
                                                   step_estimate, train_seconds)
from megatron_oreal.observability.flops import arch_by_name, gpu_by_name
from megatron_oreal.observability.published import TOLERANCE, published_comparisons, within_tolerance

Q7 = arch_by_name("qwen2.5-7b")


def test_memory_terms_hand_computed():
    w = Workload(Q7, gpu_by_name("h100-80g"), 8, tp=4, pp=1, micro_batch_tokens=1000, trained_models=1)
    c = memory_table(w)["components"]
    p = 7_615_616_512
    assert c["policy weights"] == p / 4 * 2
    assert c["policy grads"] == p / 4 * 4
    assert c["policy optimizer"] == p / 4 * 12 / 2  # distributed optimizer over DP=2
    assert "token_rm weights" not in c
    # 2·(2h + h + (n_q·d + 2·n_kv·d) + n_q·d + h + 3F) = 2·79360 for Qwen2.5-7B
    assert activation_bytes_per_token_layer(Q7) == 158_720
    assert c["activations"] == 1000 * 158_720 / 4 * 28
    assert c["logits (fp32)"] == 1000 * 152064 / 4 * 8
    assert arch_by_name("qwen2.5-32b").kv_bytes_per_token() == 2 * 64 * 8 * 128 * 2
    assert c["engine KV cache"] == 0.6 * 79.6 * 2**30 - p * 2  # rollout TP1 holds the whole model


def test_memory_switches():
    base = Workload(Q7, gpu_by_name("h100-80g"), 8, tp=4, micro_batch_tokens=8192)
    m = memory_table(base)
    assert m["components"]["token_rm weights"] < m["components"]["policy weights"]  # h->1 head, no vocab
    assert m["host"]["reference weights"] == m["components"]["policy weights"]
    rc = memory_table(replace(base, recompute=True))["components"]["activations"]
    assert rc < m["components"]["activations"] / 5
    off = memory_table(replace(base, optimizer_offload=True))
    assert off["components"]["policy optimizer"] == 0 and off["host"]["policy optimizer"] > 0
    nodist = memory_table(replace(base, distributed_optimizer=False))["components"]["policy optimizer"]
    assert nodist == 2 * m["components"]["policy optimizer"]
    with pytest.raises(ValueError, match="not divisible"):
        memory_table(replace(base, n_gpus=6))


def test_train_state_offload_phases_hand_computed():
    """policy.offload_train_state: the rollout phase holds the engine, the overhead and, until the weight
    sync has resumed the KV cache, the policy's bf16 weights plus (FP8) TE's weight copies, which are not
    parameters and never move; the host holds the rest; the copies both ways are charged every step."""
    a = arch_by_name("qwen2.5-32b")
    base = Workload(a, gpu_by_name("h100-80g"), 128, tp=8, rollout_tp=8, micro_batch_tokens=16384)
    off = replace(base, offload_train_state=True)
    m, mo = memory_table(base), memory_table(off)
    c = mo["components"]
    engine = c["engine weights"] + c["engine KV cache"] + c["overhead"]
    p_pol = c["policy grads"] / 4  # params per GPU (fp32 grads: 4 B each)
    assert mo["phases"]["rollout (train state offloaded)"] == pytest.approx(engine + p_pol * 2)
    assert m["phases"]["rollout (train state offloaded)"] == pytest.approx(engine)  # the old "what if"
    assert mo["offload_needed"] and "offload_onload" in step_estimate(off)["stages"]
    grads = c["policy grads"] + c["token_rm grads"]  # freed, not copied
    assert mo["host"]["train state (offloaded in rollout)"] == pytest.approx(mo["train_state"] - grads)
    pcie = off.gpu.pcie_bw * off.assumptions.link_eff
    assert step_estimate(off)["stages"]["offload_onload"] == pytest.approx(2 * (mo["train_state"] - grads) / pcie)
    f8 = memory_table(replace(off, fp8=True))
    p_rm = f8["components"]["token_rm grads"] / 4
    copies = p_pol + p_rm  # 1 B/param for each trained model
    assert f8["phases"]["rollout (train state offloaded)"] == pytest.approx(engine + p_pol * 2 + copies)
    assert f8["host"]["train state (offloaded in rollout)"] == pytest.approx(f8["train_state"] - copies - grads)


def test_engines_on_every_stage_and_from_config():
    a, g = arch_by_name("qwen2.5-32b"), gpu_by_name("h100-80g")
    w = Workload(a, g, 128, tp=8, pp=2, rollout_tp=8)
    assert (w.engines, replace(w, engines_on_first_stage=False).engines) == (8, 16)
    cfg = load_config(None, ["parallel.tensor=8", "parallel.pipeline=2", "rollout.tensor_parallel_size=8",
                             "rollout.engines_on_every_stage=true", "policy.offload_train_state=true"])
    w = plan.workload_from_config(cfg, a, "h100-80g", 128)
    assert w.engines == 16 and w.offload_train_state and not w.engines_on_first_stage


def test_time_model_directions():
    w = Workload(arch_by_name("qwen2.5-32b"), gpu_by_name("h100-80g"), 64, tp=8, micro_batch_tokens=16384,
                 rollout_tp=8, samples=1024, mean_response_tokens=4000, max_response_tokens=8000,
                 train_sequences=96)
    e = step_estimate(w)
    assert e["step_s"] == pytest.approx(sum(e["stages"].values()))
    assert train_seconds(replace(w, fp8=True))["seconds"] < e["train"]["seconds"]
    assert train_seconds(replace(w, recompute=True))["seconds"] > e["train"]["seconds"]
    assert step_estimate(replace(w, n_gpus=128))["stages"]["rollout"] < e["stages"]["rollout"]
    assert step_estimate(replace(w, rollout_weight_bytes=1.0))["stages"]["rollout"] < e["stages"]["rollout"]
    assert 0.2 < e["train"]["mfu"] < 0.45


def test_pipeline_stages_beyond_the_first_host_no_engine():
    """Engines sit on each replica's stage-0 TP group: 128 GPUs at TP8 PP2 run 128 / (8 x 2) = 8 engines,
    each with twice the samples of the PP1 layout's 16, so rollout is slower and throughput lower."""
    a, g = arch_by_name("qwen2.5-32b"), gpu_by_name("h100-80g")
    pp1 = Workload(a, g, 128, tp=8, pp=1, rollout_tp=8, samples=1024, mean_response_tokens=4000,
                   max_response_tokens=8000, train_sequences=96, micro_batch_tokens=16384)
    pp2 = replace(pp1, pp=2)
    assert (pp1.engines, pp2.engines) == (16, 8)
    r1, r2 = (step_estimate(w)["rollout"] for w in (pp1, pp2))
    assert r2["concurrency"] == pytest.approx(2 * r1["concurrency"])  # KV pools hold all 128 per engine
    assert r2["seconds"] > r1["seconds"]


def test_oreal_workload_from_config():
    cfg = load_config(None, ["parallel.tensor=4", "policy.recompute=true"])
    w = plan.workload_from_config(cfg, Q7, "h100-80g", 32)
    assert w.samples == 64 * 16 and w.train_sequences == 2 * 64 * 0.75  # one correct + one incorrect
    assert w.trained_models == 2 and w.fwd_only_passes == 2.0  # reference + RM scoring
    assert w.max_response_tokens == 14000 and w.mean_response_tokens == 7000
    cfg = load_config(None, ["token_rm.enabled=false", "algo.token_weighting=none", "algo.selection=all"])
    w = plan.workload_from_config(cfg, Q7, "h100-80g", 8)
    assert w.trained_models == 1 and w.train_sequences == 1024 and w.fwd_only_passes == 1.0


def test_plan_cli(tmp_path, capsys):
    yaml = tmp_path / "run.yaml"
    yaml.write_text("parallel: {tensor: 8, distributed_optimizer: true}\npolicy: {fp8: blockwise, recompute: true}\n"
                    "rollout: {tensor_parallel_size: 8, fp8: true}\n")
    assert plan.main([str(yaml), "--gpus", "128", "--model", "qwen2.5-32b"]) == 0
    out = capsys.readouterr().out
    assert "128 x h100-80g" in out and "TP8 PP1 DP16 FP8" in out and "engine KV cache" in out
    assert "offload_onload" in out  # 32B: two models' train state + engine do not fit together
    cfg_json = tmp_path / "m" / "config.json"
    cfg_json.parent.mkdir()
    cfg_json.write_text('{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,'
                        ' "intermediate_size": 128, "vocab_size": 1000}')
    assert plan.main([str(yaml), "--gpus", "8", "--model-config", str(cfg_json)]) == 0
    assert "model m:" in capsys.readouterr().out
    assert plan.main([str(yaml), "--gpus", "8", "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert plan.main([str(yaml), "--gpus", "12", "--model", "qwen2.5-7b"]) == 2
    assert "not divisible" in capsys.readouterr().err


def test_estimates_within_stated_factor_of_published_figures():
    rows = published_comparisons()
    assert {r.metric for r in rows} == {"training days", "step seconds", "tokens/s/GPU"}
    for r in rows:
        assert 1 / TOLERANCE <= r.ratio <= TOLERANCE, f"{r.name} {r.metric}: {r.estimate:.1f} vs {r.published}"
    assert within_tolerance(rows)
