"""`python -m megatron_oreal convert {hf-to-mcore,mcore-to-hf}`: HF <-> Megatron distributed checkpoints.

    python -m megatron_oreal convert hf-to-mcore --hf DIR --out DIR [--tp N --pp N] [--dtype fp32|bf16]
    python -m megatron_oreal convert mcore-to-hf --ckpt DIR --out DIR --hf-config DIR [--tp N --pp N]

Runs plainly (a world of one) or under torchrun (world = tp x pp x dp; each rank reads only its
shard): `torchrun --nproc_per_node 4 -m megatron_oreal convert hf-to-mcore ... --tp 2 --pp 2`.
Use `-m`, not the path of megatron_oreal/__main__.py: the checkpoint writer's spawned processes
re-run a main script given by path. Every destination is written to a temporary folder and
renamed at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_oreal convert", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors folder -> Megatron torch_dist checkpoint")
    a.add_argument("--hf", required=True, help="HF checkpoint folder (config.json + safetensors)")
    a.add_argument("--out", required=True, help="destination checkpoint folder")
    b = sub.add_parser("mcore-to-hf", help="Megatron torch_dist checkpoint -> HF folder")
    b.add_argument("--ckpt", required=True, help="Megatron checkpoint folder (from hf-to-mcore or training)")
    b.add_argument("--out", required=True, help="destination HF folder")
    b.add_argument("--hf-config", required=True,
                   help="HF folder with the config.json (and tokenizer files, copied when present)")
    b.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size limit (GB)")
    for s in (a, b):
        s.add_argument("--tp", type=int, default=1, help="tensor parallel size used for the conversion")
        s.add_argument("--pp", type=int, default=1, help="pipeline parallel size used for the conversion")
        s.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                       help="Megatron parameter dtype (fp32 keeps bf16/fp32 HF weights exact)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_oreal.checkpoint.dist import load_model_dist, save_model_dist
    from megatron_oreal.checkpoint.gather import export_hf
    from megatron_oreal.checkpoint.hf_io import load_hf_weights
    from megatron_oreal.mcore.hf_config import check_layout, load_hf_config
    from megatron_oreal.mcore.model import build_policy
    from megatron_oreal.mcore.parallel import destroy_parallel, init_parallel

    t0 = time.time()
    hf_dir = args.hf if args.direction == "hf-to-mcore" else args.hf_config
    hf_config = load_hf_config(hf_dir)
    try:
        check_layout(hf_config, args.tp, args.pp, where=f"{hf_dir}/config.json")
    except ValueError as exc:  # before any process group: one line from rank 0, no worker traceback
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        return 2
    layout = init_parallel(args.tp, args.pp)
    say = print if layout.rank == 0 else None

    def log(msg):
        if say:
            say(f"[convert {time.time() - t0:6.1f}s] {msg}", flush=True)

    try:
        log(f"{args.direction}: tp={layout.tp} pp={layout.pp} dp={layout.dp} "
            f"({hf_config['architectures'][0]}, {hf_config['num_hidden_layers']} layers)")
        model = build_policy(hf_config, layout, dtype=args.dtype)
        log("model built")
        if args.direction == "hf-to-mcore":
            load_hf_weights(model, args.hf, layout, log=log if layout.rank == 0 else None)
            save_model_dist(model, args.out, hf_config=hf_config, log=log)
        else:
            damage = _damage(args.ckpt, layout)
            if damage:
                print(f"error: {damage}", file=sys.stderr)
                return 1
            load_model_dist(model, args.ckpt, log=log)
            export_hf(model, layout, args.out, hf_config, hf_dir=args.hf_config,
                      max_shard_bytes=int(args.max_shard_gb * (1 << 30)), log=log if layout.rank == 0 else None)
        log(f"done: {args.out}")
    finally:
        destroy_parallel()
    return 0


def _damage(ckpt: str, layout) -> str | None:
    """A run checkpoint's component (RUN_DIR/checkpoints/step_N/policy) is checked against the
    checkpoint's MANIFEST.json before anything is exported from it: never export damaged weights."""
    from pathlib import Path

    from megatron_oreal.checkpoint.integrity import MANIFEST, verify
    from megatron_oreal.checkpoint.resume import all_gather_object

    for root in (Path(ckpt), Path(ckpt).parent):
        if (root / MANIFEST).exists():
            problems = verify(root, rank=layout.rank, world=layout.world_size, all_gather=all_gather_object)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                return f"{root}: damaged checkpoint, not exported: {root / problems[0]}{more}"
            return None
    return None


if __name__ == "__main__":
    sys.exit(main())
