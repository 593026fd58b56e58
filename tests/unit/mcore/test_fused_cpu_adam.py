"""optim.optimizer_step runs torch's AdamW fused on CPU parameters, with the update the per-tensor
AdamW gives (the reference here: torch.optim.AdamW with its defaults on copies of the same tensors)."""

from __future__ import annotations

import torch

from helpers.layout import single_rank_layout
from helpers.tiny_hf import make_tiny_qwen2


def test_fused_step_matches_per_tensor_adamw(tmp_path):
    from megatron_oreal.checkpoint.hf_io import load_hf_weights
    from megatron_oreal.config import OptimConfig
    from megatron_oreal.mcore import optim
    from megatron_oreal.mcore.hf_config import load_hf_config
    from megatron_oreal.mcore.model import build_policy

    make_tiny_qwen2(tmp_path, seed=3)
    with single_rank_layout(seed=2) as layout:
        model = build_policy(load_hf_config(tmp_path), layout)
        load_hf_weights(model, tmp_path, layout)
        ddp = optim.wrap_ddp(model)
        cfg = OptimConfig(lr=1e-2, min_lr=1e-2, weight_decay=0.1, clip_grad=0.0)
        opt = optim.build_optimizer(ddp, cfg)
        params = [p for p in ddp.parameters()]
        ref_params = [p.detach().clone().requires_grad_(True) for p in params]
        before = [p.detach().clone() for p in params]
        ref_opt = torch.optim.AdamW(ref_params, lr=1e-2, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                    eps=cfg.adam_eps, weight_decay=0.1)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            optim.zero_grads(ddp, opt)
            ref_opt.zero_grad()
            for p, r in zip(params, ref_params):
                grad = torch.randn(p.shape, generator=g)
                p.main_grad.copy_(grad)
                r.grad = grad.clone()
            updated, _ = optim.optimizer_step(opt)
            ref_opt.step()
            assert updated
        groups = [gr for o in getattr(opt, "chained_optimizers", [opt]) for gr in o.optimizer.param_groups]
        assert groups and all(gr["fused"] for gr in groups)
        assert max((p.detach() - b).abs().max().item() for p, b in zip(params, before)) > 1e-3
        for p, r in zip(params, ref_params):
            assert torch.allclose(p.detach(), r.detach(), rtol=0, atol=1e-6), tuple(p.shape)
