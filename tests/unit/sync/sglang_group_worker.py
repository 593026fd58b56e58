"""Worker for test_sglang_group.py: a 2-rank SGLang engine group (gloo) against the fake server.

torchrun --nproc_per_node 2 sglang_group_worker.py PORT OUT_DIR
Each rank writes OUT_DIR/rank{r}.json with what it saw; the test checks both.
"""

import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

FAKE_SERVER = os.path.join(os.path.dirname(__file__), "..", "rollout", "test_sglang_payload.py")


def main(port: int, out_dir: str) -> None:
    from megatron_oreal.rollout.engine import SamplingParams
    from megatron_oreal.rollout.sglang_engine import SGLangEngine, SGLangError, make_engine_group

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.multiprocessing.set_sharing_strategy("file_system")  # CPU tensors to the fake server
    group, leader = make_engine_group(2)
    log = os.path.join(out_dir, "requests.jsonl")
    cmd = [sys.executable, os.path.abspath(FAKE_SERVER), "serve", str(port), log, out_dir, "decode"]
    cfg = SimpleNamespace(tensor_parallel_size=2, fp8=False, max_restarts=1, sync_bucket_mb=64,
                          check_weights_after_first_sync=True, mem_fraction_static=0.5)
    eng = SGLangEngine(out_dir, None, cfg, group=group, leader_rank=leader, port=port, command=cmd, launch_timeout_s=60)
    seen = {"is_leader": eng.is_leader, "leader": leader, "health": eng.health()}

    # each rank generates for its own prompts (rank r: r + 1 prompts); seeds follow per-rank positions
    out = eng.generate([[10 + rank, 1]] * (rank + 1), SamplingParams(n=2, max_new_tokens=3, seed=5))
    seen["gen"] = [[o.token_ids for o in outs] for outs in out]

    # slime mode: every rank holds (its own) full tensors; SGLang rank i must read rank i's buffer
    eng.release_memory()
    eng.update_weights([("model.layers.0.mlp.up_proj.weight", torch.full((4, 4), float(rank + 1), dtype=torch.bfloat16))])
    # gather mode: only the leader holds tensors (checkpoint/gather.py); it serves both SGLang ranks
    eng.update_weights([[("model.norm.weight", torch.arange(8.0) if eng.is_leader else None)]])

    # an error on the leader surfaces on every rank (nobody is left waiting in a collective)
    try:
        eng.generate([[888_888]], SamplingParams(max_new_tokens=2))
        seen["abort"] = "no error"
    except SGLangError as exc:
        seen["abort"] = str(exc)
    seen["health_after"] = eng.health()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    dist.barrier()
    eng.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
    main(int(sys.argv[1]), sys.argv[2])
