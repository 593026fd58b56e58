"""A real SGLang 0.5.21 server on CPU (one per module) against transformers and our Megatron policy:
greedy /generate parity, weight sync through the real session endpoints at TP=1 and TP=2, a failed sync
that closes the session, pause/abort mid-generation, flush, release/resume. Prints the must-show figures
(start-up, tokens/s vs the CPU engine, sync seconds): they are measurements, not assertions."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from helpers.sglang_cpu import TINY, greedy, make_prompts, policy_after_one_step, tokens
from helpers.torchrun import run_torchrun

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(1800)]  # a server start takes minutes on a loaded machine
from helpers.sglang_cpu import EOS


def hf_greedy(hf_dir, prompts, max_new: int = 24) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, ending with EOS when it stops there."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    out = []
    for p in prompts:
        with torch.no_grad():
            ids = model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False, eos_token_id=EOS,
                                 pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


def test_generate_equals_transformers_greedy(sglang_engine):
    from megatron_oreal.rollout.cpu_engine import CPUEngine

    eng = sglang_engine.engine
    prompts = make_prompts(8)
    got = tokens(eng.generate(prompts, greedy()))
    assert got == hf_greedy(TINY, prompts)
    assert any(len(t) > 3 for t in got)
    # Must-show: tiny-model tokens/s, SGLang server vs our CPU engine, same prompts, same run.
    many = make_prompts(64, seed=1)
    t0 = time.perf_counter()
    sg = tokens(eng.generate(many, greedy(48)))
    t_sg = time.perf_counter() - t0
    cpu = CPUEngine(str(TINY))
    t0 = time.perf_counter()
    ce = tokens(cpu.generate(many, greedy(48)))
    t_cpu = time.perf_counter() - t0
    n_sg, n_cpu = sum(map(len, sg)), sum(map(len, ce))
    print(f"\n[sglang] tokens/s on 64 prompts: SGLang {n_sg / t_sg:.0f} ({n_sg} tok, {t_sg:.2f} s), "
          f"CPU engine {n_cpu / t_cpu:.0f} ({n_cpu} tok, {t_cpu:.2f} s), ratio {(n_sg / t_sg) / (n_cpu / t_cpu):.2f}; "
          f"server start {sglang_engine.start_s:.0f} s", flush=True)
    assert sg == ce  # both greedy on the same fp32 weights


def test_sync_tp1_then_failed_sync_then_sync(sglang_engine, tmp_path):
    """Megatron TP=1 -> the real server through /begin_weight_update../end_weight_update; generations
    equal transformers on the export. A sync whose source fails half-way closes the session (the next
    begin is accepted) and refuses to generate until the next sync, which works."""
    from megatron_oreal.checkpoint.gather import export_hf, iter_hf_tensors
    from megatron_oreal.rollout.sglang_engine import EngineRestarted

    from helpers.layout import single_rank_layout

    eng = sglang_engine.engine
    hf_config = json.loads((TINY / "config.json").read_text())
    prompts = make_prompts(6, seed=3)
    before = tokens(eng.generate(prompts, greedy()))
    with single_rank_layout(seed=0) as layout:
        ddp = policy_after_one_step(layout, hf_config)
        export_hf(ddp, layout, str(tmp_path / "a"), hf_config, log=None)

        def source():
            return ((n, t) for b in iter_hf_tensors(ddp, layout, bucket_bytes=1 << 16) for n, t in b)

        t0 = time.perf_counter()
        eng.update_weights(source())
        t_sync = time.perf_counter() - t0
        after = tokens(eng.generate(prompts, greedy()))
        assert after == hf_greedy(tmp_path / "a", prompts)
        assert after != before  # the sync changed what the server samples
        print(f"\n[sglang] sync TP=1 (tiny policy, 64 KiB buckets): {t_sync:.2f} s", flush=True)

        def failing():
            for k, item in enumerate(source()):
                if k == 5:
                    raise OSError("source died half-way")
                yield item

        with pytest.raises(OSError, match="half-way"):
            eng.update_weights(failing())
        assert not eng.session_open
        with pytest.raises(EngineRestarted):
            eng.generate(prompts, greedy())
        eng.client.begin_weight_update()  # the server's session was closed: a new one opens
        eng.client.end_weight_update()
        eng.update_weights(source())
        assert tokens(eng.generate(prompts, greedy())) == after


def test_sync_tp2_policy(sglang_engine, tmp_path):
    """Megatron TP=2 (two torchrun processes): rank 0 attaches an engine to the module's server, the
    gather delivers it full tensors; generations equal transformers on the TP=2 export."""
    run_torchrun(Path(__file__).with_name("sync_tp2_worker.py"), 2, [sglang_engine.url, tmp_path], timeout=600,
                 env={"MEGATRON_OREAL_SGLANG_PYTHON": os.environ.get("MEGATRON_OREAL_SGLANG_PYTHON", "")})
    r = json.loads((tmp_path / "result.json").read_text())
    print(f"\n[sglang] sync TP=2 (tiny policy, 64 KiB buckets): {r['sync_s']:.2f} s", flush=True)
    assert r["tensors"] == 3 + 12 * 4  # embed, norm, lm_head + 12 per layer
    assert r["generations"] == hf_greedy(tmp_path / "export", r["prompts"])


def test_pause_abort_flush_release_resume(sglang_engine):
    eng = sglang_engine.engine
    c = eng.client
    prompts = make_prompts(4, seed=5)
    ref = tokens(eng.generate(prompts, greedy()))
    from megatron_oreal.rollout.engine import SamplingParams
    from megatron_oreal.rollout.sglang_engine import build_generate_request

    # Many long requests, then pause(abort) while they run: the running ones come back "abort".
    body, _ = build_generate_request(make_prompts(48, seed=6), SamplingParams(n=1, temperature=1.0, top_p=1.0,
                                     max_new_tokens=110, stop_token_ids=(), max_total_length=128))
    for sp in body["sampling_params"]:
        sp["ignore_eos"] = True
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("reply", c.generate(body)))
    th.start()
    time.sleep(1.0)
    c.pause_generation()
    th.join(300)
    kinds = [item["meta_info"]["finish_reason"]["type"] for item in box["reply"]]
    assert "abort" in kinds, kinds  # caught mid-generation
    c.flush_cache()  # nothing runs any more: 200
    c.continue_generation()
    assert eng.health()
    eng.release_memory()
    assert eng.released == {"weights", "kv_cache", "cuda_graph"}
    assert eng.health()  # liveness only: a /health probe would try to generate
    eng.resume_memory()
    assert not eng.released and eng.health()
    assert tokens(eng.generate(prompts, greedy())) == ref  # CPU: release freed nothing, weights intact
