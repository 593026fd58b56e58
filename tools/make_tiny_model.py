"""Make a tiny starting model with the project's own Megatron `sft` command (an alternative to
tools/calibrate_tiny.py, which made the shipped examples/tiny/model in plain PyTorch).

    python tools/make_tiny_model.py --out runs/tiny_made [--steps 800] [--seed 0]

Measured end to end on 2 idle CPU cores (seed 0, defaults): 939 s, final SFT NLL 0.023; greedy
pass@1 on examples/tiny/data/heldout.jsonl 71.8 % (the shipped model: 72.5 %), and the demo config
started from it (`policy.hf_path=runs/tiny_made/model`) went 71.8 % -> 89.0 % in 60 steps
(examples/tiny/README.md §0). It writes its own data/ (every problem of each split, held-out by the
same hash), so evaluate on either held-out file: neither stage sees a held-out problem.

1. prompts: the built-in arithmetic task (megatron_oreal/data/arith.py, 1-digit operands, 2 operators);
   data/train.jsonl holds train-split problems only, data/heldout.jsonl the first 1000 held-out
   problems (the split is a hash of the problem text, so neither stage ever sees a held-out problem);
2. SFT data from the imperfect teacher (drops the sign of negative intermediate results on 60 % of
   the problems that pass through one; examples/tiny/README.md says why);
3. a random 0.6 M-parameter Qwen2 with the character tokenizer, then `python -m megatron_oreal sft`
   on that data (the project's own Megatron stack) -> OUT/model.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_oreal.data import arith  # noqa: E402
from megatron_oreal.data.tiny_model import TinySize, make_random_tiny_model  # noqa: E402

SPEC = arith.ArithSpec(digits=1, muldigits=1, nops=2, ops="+-*")
HELDOUT = 1000
SIZE = TinySize(layers=4, hidden=128, heads=4, kv_heads=2, ffn=256, max_position=128, tie=False)


def write_prompts(out: Path) -> list[str]:
    # Every distinct train-split problem (the 1-digit space is small: ~7,500 of them), in a seeded order.
    train = _all_problems("train")
    held = _all_problems("heldout")[:HELDOUT]
    arith.write_prompts_jsonl(out / "data" / "train.jsonl", train)
    arith.write_prompts_jsonl(out / "data" / "heldout.jsonl", held)
    return train


def _all_problems(split: str) -> list[str]:
    rng = random.Random(f"tiny:{split}")
    items = set()
    for a in range(10):
        for b in range(10):
            for c in range(10):
                for o1 in SPEC.ops:
                    for o2 in SPEC.ops:
                        p = arith.render([a, b, c], [o1, o2])
                        if arith.is_held_out(p) == (split == "heldout"):
                            items.add(p)
    ordered = sorted(items)
    rng.shuffle(ordered)
    return ordered


def write_sft(path: Path, train: list[str], steps: int, batch: int, seed: int) -> dict:
    rng = random.Random(seed)
    wrong = 0
    pairs = []
    for _ in range(steps * batch):
        p = rng.choice(train)
        sol, ok = arith.teacher_solution(p, rng, sign_error_rate=0.6)
        wrong += not ok
        pairs.append((p, sol))
    arith.write_sft_jsonl(path, pairs)
    return {"pairs": len(pairs), "teacher_wrong": wrong}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/tiny_made",
                        help="writes OUT/model and OUT/data (never the shipped examples/tiny unless asked)")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    t0 = time.time()
    train = write_prompts(out)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stats = write_sft(tmp / "sft.jsonl", train, args.steps, args.batch, args.seed)
        print(f"{len(train)} train problems; SFT pairs {stats}", flush=True)
        make_random_tiny_model(tmp / "init", seed=args.seed, size=SIZE)
        cmd = [sys.executable, "-m", "megatron_oreal", "sft", str(REPO / "examples" / "tiny" / "sft.yaml"),
               f"policy.hf_path={tmp / 'init'}", f"sft.train_file={tmp / 'sft.jsonl'}", f"run_dir={tmp / 'sft'}",
               f"sft.steps={args.steps}", f"sft.batch_size={args.batch}", f"policy.optim.lr={args.lr}",
               f"policy.optim.min_lr={args.lr / 10}", f"seed={args.seed}"]
        subprocess.run(cmd, check=True)
        model = out / "model"
        shutil.rmtree(model, ignore_errors=True)
        shutil.copytree(tmp / "sft" / "hf", model)
    (model / "made_by.json").write_text(json.dumps(
        {"tool": "tools/make_tiny_model.py", "steps": args.steps, "batch": args.batch, "lr": args.lr,
         "seed": args.seed, "teacher_sign_error_rate": 0.6, **stats}, indent=2) + "\n")
    print(f"wrote {model} and {out / 'data'} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
