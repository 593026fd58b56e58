"""Megatron distributed checkpoints (dist_checkpointing, torch_dist format): layout-independent.

A checkpoint saved at one TP/PP loads at any other (each ShardedTensor records its global shape
and offsets; the vocabulary padding is layout-independent for tp <= 8, see mcore/hf_config.py).
Saves are collective and atomic: every rank writes into `<dir>.tmp`, rank 0 renames it at the end.
Scripts that save must sit behind `if __name__ == "__main__":` (the torch_dist writer starts an
mp.Manager that re-imports the main module; megatron_core_on_cpu.md §1), and psutil must be
installed (its absence makes the writer processes die and the save hang).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import torch.distributed as dist

META = "oreal_meta.json"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_sharded(sharded_state_dict: dict, ckpt_dir: str, *, meta: dict | None = None) -> None:
    """Collective atomic save of a (nested) sharded state dict; `meta` goes to oreal_meta.json."""
    from megatron.core import dist_checkpointing

    ckpt_dir = os.path.abspath(ckpt_dir)
    tmp = ckpt_dir + ".tmp"
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    try:
        dist_checkpointing.save(sharded_state_dict, tmp)
    except BaseException:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if rank0:
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta or {}, f, indent=2, sort_keys=True)
        old = ckpt_dir + ".old"
        if os.path.exists(ckpt_dir):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(ckpt_dir, old)
        os.replace(tmp, ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def load_sharded(sharded_state_dict: dict, ckpt_dir: str) -> dict:
    from megatron.core import dist_checkpointing

    if not os.path.isfile(os.path.join(ckpt_dir, "metadata.json")):
        raise FileNotFoundError(f"{ckpt_dir!r} is not a Megatron distributed checkpoint (no metadata.json)")
    return dist_checkpointing.load(sharded_state_dict, ckpt_dir)


def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, META)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def save_model_dist(model, ckpt_dir: str, *, hf_config: dict | None = None, log=None) -> None:
    """Save one model's weights (collective). hf_config is recorded so export needs no other input."""
    from megatron_oreal.mcore.model import unwrap

    t0 = time.time()
    m = unwrap(model)
    save_sharded({"model": m.sharded_state_dict()}, ckpt_dir,
                 meta={"hf_config": hf_config, "token_rm": bool(getattr(m, "is_token_rm", False))})
    if log:
        log(f"saved Megatron checkpoint {ckpt_dir} in {time.time() - t0:.1f}s")


def load_model_dist(model, ckpt_dir: str, *, log=None) -> None:
    """Load weights saved by save_model_dist at any TP/PP into `model` (collective)."""
    from megatron_oreal.mcore.model import unwrap

    t0 = time.time()
    m = unwrap(model)
    state = load_sharded({"model": m.sharded_state_dict()}, ckpt_dir)["model"]
    missing, unexpected = m.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt_dir}: missing {missing}, unexpected {list(unexpected)}")
    if log:
        log(f"loaded Megatron checkpoint {ckpt_dir} in {time.time() - t0:.1f}s")
