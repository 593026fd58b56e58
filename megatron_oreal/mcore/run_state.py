"""Model + optimizer state of one trained model in a run checkpoint (a Megatron dist checkpoint).

Weights reshard freely across TP/PP. The optimizer state is saved through Megatron's sharded
optimizer state dict: with the non-distributed optimizer (our default) it reshards across TP/PP as
well (measured exact on the CPU with megatron-core 0.16.1: saved at TP1/PP1 and resumed at TP2xPP2,
the losses equal an uninterrupted run's); with the distributed optimizer it is saved
`dp_reshardable`, which resumes exactly at the same TP/PP (any DP), not across TP/PP
(Megatron-Core 0.16.1's `fully_reshardable` path fails without apex/TE).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from megatron_oreal.checkpoint.dist import load_sharded, save_sharded
from megatron_oreal.mcore.model import unwrap


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def _sharded(ddp_model, optimizer, *, is_loading: bool) -> dict:
    model_sd = unwrap(ddp_model).sharded_state_dict()
    kwargs = {"is_loading": is_loading}
    if _is_distributed(optimizer):
        kwargs["metadata"] = {"distrib_optim_sharding_type": "dp_reshardable"}
    return {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, **kwargs)}


def _ensure_adam_state(optimizer) -> None:
    """Megatron 0.16.1 cannot build a loading state dict for an optimizer that never stepped
    (`assert len(steps) == 1`, distrib_optimizer.py:642; empty torch Adam state elsewhere):
    give every parameter an all-zero Adam state first; loading overwrites it."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def model_and_optimizer_writer(ddp_model, optimizer) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        _ensure_adam_state(optimizer)
        save_sharded(_sharded(ddp_model, optimizer, is_loading=False), str(path))

    return write


def model_and_optimizer_reader(ddp_model, optimizer) -> Callable[[Path], None]:
    def read(path: Path) -> None:
        _ensure_adam_state(optimizer)
        loaded = load_sharded(_sharded(ddp_model, optimizer, is_loading=True), str(path))
        missing, unexpected = unwrap(ddp_model).load_state_dict(loaded["model"], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"model state: missing {missing}, unexpected {list(unexpected)}")
        if not _is_distributed(optimizer):
            _fill_zero_step(loaded["optimizer"])
        with torch.no_grad():  # fp32 params: in-place copies into leaf views (Megatron 0.16.1 workaround)
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_step(optimizer, loaded["optimizer"])

    return read


def _fill_zero_step(loaded) -> None:
    """Megatron 0.16.1 saves the shared Adam step as `common_step` only `if step:` (optimizer.py:1033),
    so an optimizer that never stepped (the actor while frozen) saves no step at all and torch's
    Adam then fails to load (KeyError 'step'). Its step is 0: put that back."""
    for sd in loaded if isinstance(loaded, list) else [loaded]:
        if "common_step" not in sd["state"]:
            for st in sd["state"].values():
                if isinstance(st, dict):
                    st.setdefault("step", torch.tensor(0.0))


def _restore_adam_step(optimizer, loaded: dict) -> None:
    """The distributed optimizer leaves Adam's `step` at the pre-filled 0 after loading (the moments
    load); Adam's bias correction depends on it, so copy the saved step count back."""
    if not _is_distributed(optimizer):
        return
    try:
        step = loaded["optimizer"]["param_groups"][0]["step"]
    except (KeyError, IndexError, TypeError):
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for st in opt.optimizer.state.values():
            st["step"] = torch.tensor(float(step))
