"""torchrun worker: a disk that fills up on one rank in the middle of a distributed checkpoint write.

    python -m torch.distributed.run --nproc_per_node 2 ckpt_fail_worker.py <hf_dir> <run_dir>

TP=2: each rank writes its own shard files. Step 1 saves normally; for step 2, rank 1's file writes
(inside Megatron's forked writer processes) raise ENOSPC. Megatron gathers the write results, so
every rank must leave the save together with the same CheckpointError instead of one rank exiting
while the other waits in a collective. Prints one CHECK line per rank.
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import torch.distributed as dist

from helpers.say import say


def main(hf_dir: str, run_dir: str) -> int:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_oreal.checkpoint.hf_io import load_hf_weights
    from megatron_oreal.checkpoint.resume import CheckpointError, RunCheckpointer
    from megatron_oreal.config import OptimConfig
    from megatron_oreal.mcore.model import build_policy
    from megatron_oreal.mcore.optim import build_optimizer, wrap_ddp
    from megatron_oreal.mcore.parallel import init_parallel
    from megatron_oreal.mcore.run_state import model_and_optimizer_writer

    hf_cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    layout = init_parallel(2, 1, seed=1234, timeout_minutes=2)  # a hang fails the test in minutes, not 30
    policy = build_policy(hf_cfg, layout)
    load_hf_weights(policy, hf_dir, layout)
    ddp = wrap_ddp(policy)
    optimizer = build_optimizer(ddp, OptimConfig(lr=1e-4))
    ck = RunCheckpointer(Path(run_dir), keep=3, rank=layout.rank, barrier=dist.barrier)
    writers = {"policy": model_and_optimizer_writer(ddp, optimizer)}
    ck.save(1, writers, {"note": "ok"})

    if layout.rank == 1:  # forked writer processes inherit the patched module
        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        filesystem_async._write_item = full_disk
    try:
        ck.save(2, writers, {"note": "never published"})
        outcome = "saved"
    except CheckpointError as exc:
        outcome = f"CheckpointError {exc}".replace("\n", " ")[:600]
    dist.barrier()  # both ranks got here: nobody hangs in a collective
    say(f"CHECK rank{layout.rank} latest={ck.latest_name()} {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
