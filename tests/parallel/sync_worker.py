"""torchrun worker: weight sync from a TP=2 x PP=2 Megatron policy into the CPU engine (rank 0).

argv: HF_DIR OUT_DIR. Writes OUT_DIR/result.json on rank 0 with what the test asserts.
"""

import json
import os
import sys


def main():
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_oreal.checkpoint.gather import export_hf, iter_hf_tensors
    from megatron_oreal.checkpoint.hf_io import load_hf_weights
    from megatron_oreal.config import OptimConfig
    from megatron_oreal.mcore import optim, parallel
    from megatron_oreal.mcore.model import build_policy
    from megatron_oreal.mcore.train_step import sft_update
    from megatron_oreal.rollout.cpu_engine import CPUEngine
    from megatron_oreal.rollout.engine import SamplingParams
    from megatron_oreal.sync import InProcessTransport, sync_weights
    from megatron_oreal.types import TrainBatch, TrainSequence

    hf_dir, out = sys.argv[1], sys.argv[2]
    hf_config = json.load(open(os.path.join(hf_dir, "config.json")))
    layout = parallel.init_parallel(2, 2, seed=0)
    policy = build_policy(hf_config, layout)
    load_hf_weights(policy, hf_dir, layout)
    ddp = optim.wrap_ddp(policy)
    opt = optim.build_optimizer(ddp, OptimConfig(lr=3e-2, min_lr=3e-2, warmup_steps=0))
    engine = CPUEngine(hf_dir) if layout.rank == 0 else None
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (5, 9, 3)]
    batch = TrainBatch([TrainSequence(p, torch.randint(3, 250, (6,), generator=g).tolist(), 1.0, True) for p in prompts])
    greedy = SamplingParams.greedy_eval(max_new_tokens=8, stop_token_ids=[])
    result = {}

    def sync():
        source = iter_hf_tensors(ddp, layout, bucket_bytes=1 << 16)  # many small buckets
        if engine is None:
            for _ in source:
                pass
            return None
        return sync_weights(((n, t) for b in source for n, t in b), InProcessTransport(engine), bucket_bytes=1 << 16)

    for phase in ("a", "b"):
        sft_update(ddp, opt, batch, layout)  # the policy moves away from the HF files
        metrics = sync()
        export_hf(ddp, layout, os.path.join(out, phase), hf_config, log=None)
        torch.distributed.barrier()
        if engine is None:
            continue
        exported = {}
        for f in os.listdir(os.path.join(out, phase)):
            if f.endswith(".safetensors"):
                exported.update(load_file(os.path.join(out, phase, f)))
        mine = engine.model.state_dict()
        result[f"{phase}_names_equal"] = sorted(exported) == sorted(k for k in mine if k in exported)
        result[f"{phase}_bit_equal"] = all(torch.equal(mine[k], v) for k, v in exported.items())
        result[f"{phase}_sync_tensors"] = metrics.tensors
        result[f"{phase}_sync_buckets"] = metrics.buckets
        ref = AutoModelForCausalLM.from_pretrained(os.path.join(out, phase)).eval()
        ours = [o[0].token_ids for o in engine.generate(prompts, greedy)]
        theirs = []
        for p in prompts:
            with torch.no_grad():
                ids = ref.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                                   pad_token_id=0, eos_token_id=None)
            theirs.append(ids[0, len(p):].tolist())
        result[f"{phase}_generations"] = ours
        result[f"{phase}_hf_generations"] = theirs
    if engine is not None:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)
    parallel.destroy_parallel()


if __name__ == "__main__":
    main()
