"""Shared by the `sglang` tier (tests/sglang_server) and its torchrun workers: the CPU server's settings, the
rollout config that points SGLangEngine at the CPU SGLang env, prompts, and a tiny policy moved by one step."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny" / "model"
# The tiny model's context is 128 tokens; a small pool keeps the server's memory and start-up small.
CPU_SERVER_ARGS = ["--context-length", "128", "--max-total-tokens", "4096"]


def sglang_python() -> str:
    py = os.environ.get("MEGATRON_OREAL_SGLANG_PYTHON", "")
    if not py:
        pytest.fail("MEGATRON_OREAL_SGLANG_PYTHON is not set: run `make test-sglang`, which builds the CPU SGLang "
                    "environment (tools/sglang_cpu/build_env.py) and points this at its python", pytrace=False)
    if not os.access(py, os.X_OK):
        pytest.fail(f"MEGATRON_OREAL_SGLANG_PYTHON={py} is not an executable file", pytrace=False)
    return py


def rollout_cfg(**kw) -> SimpleNamespace:
    base = dict(tensor_parallel_size=1, fp8=False, max_restarts=0, sync_bucket_mb=1,
                check_weights_after_first_sync=False, mem_fraction_static=0.5, sglang_python=sglang_python(),
                sglang_device="cpu", sglang_server_args=list(CPU_SERVER_ARGS), sglang_deterministic=False,
                sglang_launch_timeout_s=1500.0)
    base.update(kw)
    return SimpleNamespace(**base)


EOS = 2  # examples/tiny/model/config.json


def make_prompts(k: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (int(n),), generator=g).tolist() for n in torch.randint(4, 12, (k,), generator=g)]


def greedy(max_new: int = 24):
    from megatron_oreal.rollout.engine import SamplingParams

    return SamplingParams.greedy_eval(max_new_tokens=max_new, stop_token_ids=[EOS], max_total_length=128)


def tokens(outs) -> list[list[int]]:
    return [o[0].token_ids for o in outs]


def policy_after_one_step(layout, hf_config, seed: int = 0):
    """The tiny policy loaded from examples/tiny/model, then moved by one SFT step (lr 3e-2)."""
    import torch

    from megatron_oreal.checkpoint.hf_io import load_hf_weights
    from megatron_oreal.config import OptimConfig
    from megatron_oreal.mcore import optim
    from megatron_oreal.mcore.model import build_policy
    from megatron_oreal.mcore.train_step import sft_update
    from megatron_oreal.types import TrainBatch, TrainSequence

    policy = build_policy(hf_config, layout)
    load_hf_weights(policy, str(TINY), layout)
    ddp = optim.wrap_ddp(policy)
    opt = optim.build_optimizer(ddp, OptimConfig(lr=3e-2, min_lr=3e-2, warmup_steps=0))
    g = torch.Generator().manual_seed(seed)
    batch = TrainBatch([TrainSequence(p, torch.randint(3, 100, (6,), generator=g).tolist(), 1.0, True)
                        for p in make_prompts(4, seed=seed + 7)])
    sft_update(ddp, opt, batch, layout)
    return ddp
