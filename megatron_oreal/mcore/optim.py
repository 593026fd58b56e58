"""Megatron DDP + optimizer for one model, and the per-step LR from algo/schedule.py.

One `MegatronOptimizer` per model (policy, token RM), AdamW (Megatron's "adam" is decoupled weight
decay: apex/TE FusedAdam in AdamW mode, or torch.optim.AdamW without them), weight decay 0.01,
grad-clip 1.0, betas/eps from OptimConfig (docs/algorithm.md §4.3). Megatron leaves biases and norm weights
out of weight decay (its default `no_weight_decay_cond`); the reference decays every parameter, a
difference of 0.01 * lr * w per step on those few tensors.

The LR is a pure function of the step (algo.schedule.lr_at), written into every param group before
each step, so "the schedule advances during frozen steps" holds by construction and a resumed run
needs no scheduler state.
"""

from __future__ import annotations

import math

import torch

from megatron_oreal.algo.schedule import lr_at
from megatron_oreal.config import OptimConfig


def wrap_ddp(model, *, distributed_optimizer: bool = False):
    """Wrap a GPTModel for training: Float16Module for bf16, then Megatron DDP (gradient buffers).

    DDP averages gradients over DP (scaling 1/dp); the loss functions compensate (train_step.py).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    config = model.config
    if config.bf16 or config.fp16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,  # accumulate micro-batch grads in fp32 (bf16 sums drift)
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def build_optimizer(ddp_model, cfg: OptimConfig, *, distributed_optimizer: bool = False):
    """get_megatron_optimizer over one DDP-wrapped model, and the schedule hooks on its config."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = ddp_model.config
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=bool(config.bf16),
        params_dtype=config.params_dtype,
        use_distributed_optimizer=distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_cfg, [ddp_model])
    # The pipeline schedule reads these from the model config (megatron/training/training.py does the same).
    config.no_sync_func = ddp_model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return optimizer


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def lr_for_step(cfg: OptimConfig, step: int, total_steps: int) -> float:
    return lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, total_steps)


def optimizer_step(optimizer) -> tuple[bool, float]:
    """Clip and update; returns (updated, grad norm before clipping).

    Megatron's `step()` skips only on an fp16 loss-scaler overflow; with fp32/bf16 a NaN/inf gradient
    would be clipped (scaled by NaN) and poison the weights and Adam's moments. So this is `step()`
    (ChainedOptimizer.step, optimizer.py:1308 in Megatron-Core 0.16.1) with one check between the
    norm and the update: a non-finite norm skips the update. The norm is all-reduced over the
    model-parallel group and the DP replicas hold the same gradients, so every rank decides alike.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():  # fp16 loss-scaler overflow: Megatron's own skip
        return False, float("nan")
    grad_norm = float(optimizer.get_grad_norm())
    if not math.isfinite(grad_norm):
        return False, grad_norm
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = opt.get_parameters()
        if params and opt.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(params, opt.config.clip_grad, grad_norm,
                                         opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    _fuse_cpu_adam(optimizer)
    return bool(optimizer.step_with_ready_grads()), grad_norm


def _fuse_cpu_adam(optimizer) -> None:
    """Run torch's AdamW fused on CPU parameters (the CPU path without TE/apex optimizers).

    Megatron builds `torch.optim.AdamW` with its defaults, which on CPU tensors is the per-tensor
    Python loop: 3.5 ms a step for the tiny model's 51 tensors against 0.4 ms fused (the same update;
    torch >= 2.4 has the fused kernel on CPU). Set before every step rather than once at build
    because loading an optimizer checkpoint restores the param_groups' flags as they were saved.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            if not group.get("fused") and all(p.device.type == "cpu" for p in group["params"]):
                group["foreach"], group["fused"] = False, True


def zero_grads(ddp_model, optimizer) -> None:
    ddp_model.zero_grad_buffer()
    optimizer.zero_grad()


def grads_are_finite(ddp_model) -> bool:
    return all(torch.isfinite(p.main_grad).all() for p in ddp_model.parameters() if hasattr(p, "main_grad"))
