"""`python -m megatron_oreal sft CONFIG [section.key=value ...]`: supervised fine-tuning on the same stack.

OREAL starts from an SFT model (docs/algorithm.md §0); this command trains one on {"prompt", "response"} JSONL
pairs with the Megatron policy, packed sequences, the NLL of the response tokens (mean over all
response tokens of the step), AdamW with the policy's optimizer section and its warm-up + cosine
schedule, and exports the result to RUN_DIR/hf. Works under torchrun at any TP/PP/DP.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from megatron_oreal.config import ConfigError, RunConfig, load_config
from megatron_oreal.data.prompts import DataError
from megatron_oreal.data.templates import TemplateError, load_tokenizer
from megatron_oreal.types import TrainBatch, TrainSequence


class SFTDataError(ValueError):
    pass


def load_pairs(path: str, tokenizer, prompt_key: str, response_key: str, system_prompt: str,
               add_eos: bool) -> list[TrainSequence]:
    """Tokenised (prompt, response) pairs; a bad line raises naming the file and line."""
    from megatron_oreal.data.prompts import read_jsonl
    from megatron_oreal.data.templates import apply_template

    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    out = []
    for lineno, row in read_jsonl(path):
        for key in (prompt_key, response_key):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise SFTDataError(f"{path}:{lineno}: missing or empty {key!r} (have: {sorted(row)})")
        prompt_ids = apply_template(tokenizer, row[prompt_key], system_prompt)
        response_ids = tokenizer.encode(row[response_key], add_special_tokens=False) + eos
        out.append(TrainSequence(list(prompt_ids), response_ids, advantage=1.0, is_positive=True))
    return out


def batches(data: list[TrainSequence], batch_size: int, seed: int, start_step: int = 0):
    """Endless shuffled batches; batch k is the same whatever step the run (re)started at."""
    per_epoch = max(len(data) // batch_size, 1)
    step = start_step
    while True:
        epoch, k = divmod(step, per_epoch)
        order = list(range(len(data)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        idx = order[k * batch_size:(k + 1) * batch_size] or order[:batch_size]
        yield step, TrainBatch([data[i] for i in idx], step=step)
        step += 1


def run_sft(cfg: RunConfig) -> dict:
    from megatron_oreal.checkpoint.gather import export_hf
    from megatron_oreal.checkpoint.hf_io import load_hf_weights
    from megatron_oreal.mcore import optim, parallel
    from megatron_oreal.mcore.model import build_policy
    from megatron_oreal.mcore.train_step import sft_update
    from megatron_oreal.runtime import log, read_hf_config

    s = cfg.sft
    hf_config = read_hf_config(cfg.policy.hf_path)
    tokenizer = load_tokenizer(cfg.policy.hf_path)
    # The data first: a bad pair file fails before any process group or model exists.
    data = load_pairs(s.train_file, tokenizer, s.prompt_key, s.response_key, cfg.data.system_prompt, s.add_eos)
    layout = parallel.init_parallel(cfg.parallel.tensor, cfg.parallel.pipeline, seed=cfg.seed,
                                                        timeout_minutes=cfg.parallel.timeout_minutes)
    try:
        model = build_policy(hf_config, layout, dtype=cfg.policy.dtype)
        load_hf_weights(model, cfg.policy.hf_path, layout)
        ddp = optim.wrap_ddp(model, distributed_optimizer=cfg.parallel.distributed_optimizer)
        opt = optim.build_optimizer(ddp, cfg.policy.optim, distributed_optimizer=cfg.parallel.distributed_optimizer)
        log(f"sft: {len(data)} pairs, {s.steps} steps of {s.batch_size}, lr {cfg.policy.optim.lr}", layout.rank)
        t0, losses, tokens = time.time(), [], 0.0
        for step, batch in batches(data, s.batch_size, cfg.seed):
            if step >= s.steps:
                break
            m = sft_update(ddp, opt, batch, layout, lr=optim.lr_for_step(cfg.policy.optim, step, s.steps),
                           micro_batch_tokens=cfg.policy.micro_batch_tokens)
            losses.append(m["loss/nll"])
            tokens += m["tokens"]
            if (step + 1) % max(s.log_every, 1) == 0 or step + 1 == s.steps:
                el = time.time() - t0
                recent = losses[-s.log_every:]
                log(f"sft step {step + 1}/{s.steps} | nll {sum(recent) / len(recent):.4f} | "
                    f"{tokens / el:.0f} response tok/s | {el:.0f}s", layout.rank)
        out = Path(cfg.run_dir) / "hf"
        export_hf(ddp, layout, str(out), hf_config, hf_dir=cfg.policy.hf_path, log=lambda m: log(m, layout.rank))
        return {"steps": s.steps, "final_nll": sum(losses[-10:]) / max(len(losses[-10:]), 1),
                "wall_seconds": time.time() - t0, "hf": str(out)}
    finally:
        parallel.destroy_parallel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_oreal sft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config (the sft, policy, parallel and data.system_prompt sections)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, command="sft")
        summary = run_sft(cfg)
    except (ConfigError, SFTDataError, DataError, TemplateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
