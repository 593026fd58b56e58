"""torchrun worker (2 ranks): a TP=2 Megatron policy synced into a running SGLang server (rank 0 attaches).

argv: URL OUT_DIR. Writes OUT_DIR/result.json (prompts, greedy generations after the sync, sync seconds,
tensor count) and OUT_DIR/export (the HF export the test compares with through transformers).
"""

import json
import os
import sys
import time
from pathlib import Path


def main():
    import torch

    from megatron_oreal.checkpoint.gather import export_hf, iter_hf_tensors
    from megatron_oreal.mcore import parallel
    from megatron_oreal.rollout.sglang_engine import SGLangEngine

    from helpers.sglang_cpu import TINY, greedy, make_prompts, policy_after_one_step, rollout_cfg, tokens

    url, out = sys.argv[1], sys.argv[2]
    hf_config = json.loads((TINY / "config.json").read_text())
    layout = parallel.init_parallel(2, 1, seed=0)
    ddp = policy_after_one_step(layout, hf_config, seed=1)
    source = iter_hf_tensors(ddp, layout, bucket_bytes=1 << 16)
    result = {}
    if layout.rank == 0:
        eng = SGLangEngine(str(TINY), None, rollout_cfg(), url=url)
        t0 = time.perf_counter()
        metrics = []

        def flat():
            for b in source:
                metrics.extend(b)
                yield from b

        eng.update_weights(flat())
        result["sync_s"] = time.perf_counter() - t0
        result["tensors"] = len(metrics)
        result["prompts"] = make_prompts(6, seed=9)
        result["generations"] = tokens(eng.generate(result["prompts"], greedy()))
    else:
        for _ in source:  # the gather's collectives; the tensors land on rank 0
            pass
    export_hf(ddp, layout, os.path.join(out, "export"), hf_config, log=None)
    torch.distributed.barrier()
    if layout.rank == 0:
        Path(out, "result.json").write_text(json.dumps(result))
    parallel.destroy_parallel()


if __name__ == "__main__":
    main()
