"""SGLang itself at TP=2 on CPU (its own module: one more server start). 0.5.21 needs
SGLANG_CPU_OMP_THREADS_BIND for more ranks than NUMA nodes; the engine sets it (cpu_threads_bind). A
leader-only engine (group None, tensor_parallel_size=2) sends each SGLang TP rank its own payload."""

import pytest

from helpers.sglang_cpu import TINY, greedy, make_prompts, rollout_cfg, tokens

pytestmark = [pytest.mark.sglang, pytest.mark.slow, pytest.mark.timeout(1800)]


def test_tp2_server_generates_and_syncs_like_transformers(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_oreal.rollout.sglang_engine import SGLangEngine
    from test_server import hf_greedy

    eng = SGLangEngine(str(TINY), None, rollout_cfg(tensor_parallel_size=2), log_path=str(tmp_path / "server.log"))
    try:
        prompts = make_prompts(6, seed=3)
        assert tokens(eng.generate(prompts, greedy())) == hf_greedy(TINY, prompts)
        new = {k: (v * 1.5 if "mlp" in k else v) for k, v in load_file(str(TINY / "model.safetensors")).items()}
        eng.update_weights(list(new.items()))  # two payloads per bucket, one per SGLang TP rank
        model = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float32)
        model.load_state_dict(new)
        model.save_pretrained(tmp_path / "hf2")
        assert tokens(eng.generate(prompts, greedy())) == hf_greedy(tmp_path / "hf2", prompts)
    finally:
        eng.close()
