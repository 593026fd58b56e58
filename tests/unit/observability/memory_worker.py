"""torchrun worker for test_memory_measured.py: the planner's memory terms vs the real Megatron objects.

DP=2, bf16, distributed optimizer (the recipe setting): builds the policy and the token RM with the
project's builders, takes one optimizer step (Adam state is created lazily) and prints, from rank 0,
one JSON line of measured byte counts summed/maxed over the ranks.
"""

import json
import os

import torch
import torch.distributed as dist

HF = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 1024,
      "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256}


def _optimizer_bytes(opt) -> tuple[int, int]:
    """(Adam m+v bytes, fp32 master-weight bytes) held by this rank."""
    state = master = 0
    for o in getattr(opt, "chained_optimizers", [opt]):
        for s in o.optimizer.state.values():
            state += sum(v.numel() * v.element_size() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
        for name in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            for group in getattr(o, name, None) or []:
                master += sum(p.numel() * p.element_size() for p in group)
    return state, master


def main() -> None:
    from megatron_oreal.config import OptimConfig
    from megatron_oreal.mcore import parallel
    from megatron_oreal.mcore.model import build_policy, build_token_rm
    from megatron_oreal.mcore.optim import build_optimizer, wrap_ddp

    layout = parallel.init_parallel(1, 1)
    assert layout.dp == 2, layout
    policy = build_policy(HF, layout, dtype="bf16")
    params = sum(p.numel() for p in policy.parameters())
    ddp = wrap_ddp(policy, distributed_optimizer=True)
    grad_bytes = sum(b.grad_data.numel() * b.grad_data.element_size() for b in ddp.buffers)
    opt = build_optimizer(ddp, OptimConfig(), distributed_optimizer=True)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    tok = torch.randint(0, 1024, (1, 8), generator=torch.Generator().manual_seed(dist.get_rank()))
    ddp(tok, torch.arange(8)[None], None, labels=tok).float().mean().backward()
    ddp.finish_grad_sync()
    opt.step()
    state, master = _optimizer_bytes(opt)
    rm_params = sum(p.numel() for p in build_token_rm(HF, layout, dtype="bf16").parameters())
    t = torch.tensor([state + master, state + master], dtype=torch.float64)
    dist.all_reduce(t[:1], op=dist.ReduceOp.SUM)
    dist.all_reduce(t[1:], op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print(json.dumps({"params": params, "rm_params": rm_params, "grad_buffer_bytes": grad_bytes,
                          "optimizer_bytes_sum": t[0].item(), "optimizer_bytes_max_rank": t[1].item(),
                          "hf": HF}))
    parallel.destroy_parallel()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
