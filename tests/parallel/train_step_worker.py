"""torchrun worker for tests/parallel/test_train_step.py (one launch checks many things).

    python -m torch.distributed.run --nproc_per_node 4 train_step_worker.py invariance <workdir>
    python -m torch.distributed.run --nproc_per_node 2 train_step_worker.py behaviour <workdir>

Each check prints one `CHECK <name> <value>` line (from rank 0, or the rank that holds the value) in
one write; the pytest side asserts on them.
The HF checkpoints and the reference gradients are written by the pytest process beforehand.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.distributed as dist

from helpers.say import say


# (tp, pp, micro-batch token budget) on 4 ranks: the PP layouts run several variable-length
# micro-batches through 1F1B; TP2xDP2 packs each rank's share into one row; DP4 gives every
# sequence its own micro-batch.
LAYOUTS = [(2, 2, 30), (2, 1, 4096), (1, 2, 20), (1, 1, 24)]


def _say(layout, *parts) -> None:
    if layout.rank == 0:
        say("CHECK", *parts)


def _setup(tp, pp, hf_cfg, policy_dir, rm_head=None, ref_dir=None, dtype="fp32"):
    from megatron_oreal.checkpoint.hf_io import load_hf_weights
    from megatron_oreal.mcore.model import ReferenceWeights, build_policy, build_token_rm
    from megatron_oreal.mcore.parallel import init_parallel

    layout = init_parallel(tp, pp, seed=1234)
    policy = build_policy(hf_cfg, layout, dtype=dtype)
    # The reference is a snapshot of the initial weights: of `ref_dir` when given (so the KL
    # gradient is non-trivial), else of the policy checkpoint itself (OREAL's frozen initial model).
    load_hf_weights(policy, ref_dir or policy_dir, layout)
    reference = ReferenceWeights(policy)
    if ref_dir is not None:
        load_hf_weights(policy, policy_dir, layout)
    rm = None
    if rm_head is not None:
        rm = build_token_rm(hf_cfg, layout, dtype=dtype)
        load_hf_weights(rm, policy_dir, layout)
        if layout.is_last_stage:
            with torch.no_grad():
                rm.output_layer.weight.copy_(rm_head.to(rm.output_layer.weight.dtype))
    return layout, policy, rm, reference


def _teardown():
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()  # keep the process group: the next layout reuses it


def _hf_grads(model, layout):
    from megatron_oreal.checkpoint.gather import iter_hf_tensors

    out = {}
    for bucket in iter_hf_tensors(model, layout, replicas="first", source=lambda p: p.main_grad,
                                  dtype=torch.float32):
        for name, t in bucket:
            if t is not None:
                out[name] = t.cpu()
    return out


def _max_rel(got: dict, want: dict) -> float:
    if set(got) != set(want):
        raise AssertionError(f"gradient names differ: {sorted(set(got) ^ set(want))[:6]}")
    worst = 0.0
    for k in want:
        scale = want[k].abs().max().item()
        if scale == 0:
            raise AssertionError(f"reference gradient {k} is all zero: the test would be trivial")
        worst = max(worst, (got[k] - want[k]).abs().max().item() / scale)
    return worst


def invariance(workdir: str) -> None:
    """Gradients after one OREAL step at several layouts / micro-batch budgets == the HF oracle."""
    from megatron_oreal.mcore.train_step import OrealTrainer
    from megatron_oreal.mcore.model import unwrap

    blob = torch.load(os.path.join(workdir, "case.pt"), weights_only=False)
    batch, algo, hf_cfg, oracle = blob["batch"], blob["algo"], blob["hf_cfg"], blob["oracle"]
    optim_cfg = blob["optim"]
    world = int(os.environ["WORLD_SIZE"])
    layouts = LAYOUTS if world == 4 else [(1, 1, 4096)]
    for tp, pp, budget in layouts:
        layout, policy, rm, reference = _setup(tp, pp, hf_cfg, os.path.join(workdir, "policy"), blob["rm_head"],
                                               os.path.join(workdir, "ref"))
        trainer = OrealTrainer(policy, rm, reference, layout, algo, optim_cfg, optim_cfg, total_steps=100,
                               micro_batch_tokens=budget)
        metrics = trainer.update(batch, step=algo.actor_freeze_steps)
        tag = f"tp{tp}pp{pp}dp{layout.dp}mb{budget}"
        g_pol = _hf_grads(trainer.policy, layout)
        g_rm = _hf_grads(trainer.token_rm, layout)
        head = unwrap(trainer.token_rm).output_layer.weight.main_grad.detach().clone() if layout.is_last_stage else None
        n_mb = torch.tensor([float(metrics["micro_batches"])])
        dist.all_reduce(n_mb)
        if layout.rank == 0:
            _say(layout, "policy_rel", tag, _max_rel(g_pol, oracle["policy_grads"]))
            _say(layout, "rm_rel", tag, _max_rel(g_rm, oracle["rm_grads"]))
            for key in ("loss/positive", "loss/negative", "loss/kl", "rm/loss", "tokens/w_pos_nonzero_frac",
                        "tokens/w_neg_nonzero_frac"):
                want = oracle["metrics"][key]
                _say(layout, "metric", tag, key, abs(metrics[key] - want) / max(abs(want), 1e-12))
            _say(layout, "microbatches", tag, int(n_mb.item()))
        if layout.is_last_stage and layout.dp_rank == 0 and layout.tp_rank == 0:
            want = oracle["rm_head_grad"]
            rel = ((head - want).abs().max() / want.abs().max()).item()
            say("CHECK", "rm_head_rel", tag, rel)
        del trainer, policy, rm, reference
        dist.barrier()
        _teardown()


def behaviour(workdir: str) -> None:
    """Zero RM head => zero policy grad; packed == unpacked log-probs == HF; learning direction; SFT."""
    from megatron_oreal.config import AlgoConfig, OptimConfig
    from megatron_oreal.mcore import optim
    from megatron_oreal.mcore.train_step import OrealTrainer, compute_logprobs, sft_update
    from megatron_oreal.types import TrainBatch

    blob = torch.load(os.path.join(workdir, "case.pt"), weights_only=False)
    batch, hf_cfg, hf_logp = blob["batch"], blob["hf_cfg"], blob["hf_logprobs"]
    policy_dir = os.path.join(workdir, "policy")
    tp = int(os.environ["WORLD_SIZE"])  # TP=2 on 2 ranks: exercises the vocab-parallel CE

    # 1) step 0, zero-init head, reference == policy: every policy gradient is exactly 0 (docs/algorithm.md §8.1 item 4)
    layout, policy, rm, reference = _setup(tp, 1, hf_cfg, policy_dir, rm_head=torch.zeros(1, hf_cfg["hidden_size"]))
    algo = AlgoConfig(actor_freeze_steps=0)
    trainer = OrealTrainer(policy, rm, reference, layout, algo, OptimConfig(lr=1e-3, warmup_steps=0),
                           OptimConfig(lr=1e-3, warmup_steps=0), total_steps=50, micro_batch_tokens=48)
    m = trainer.update(batch, step=0)
    worst = max(p.main_grad.abs().max().item() for p in trainer.policy.parameters())
    rm_norm = m["rm/grad_norm"]
    _say(layout, "zero_head_policy_grad", worst)
    _say(layout, "zero_head_grad_norm", m["policy/grad_norm"])
    _say(layout, "zero_head_rm_grad_norm", rm_norm)
    _say(layout, "zero_head_w_frac", m["tokens/w_pos_nonzero_frac"] + m["tokens/w_neg_nonzero_frac"])
    _say(layout, "zero_head_kl", m["policy/kl"])

    # 2) packed (one row) == unpacked (one sequence per micro-batch) == HF, per token
    base = compute_logprobs(trainer.policy, batch, layout, micro_batch_tokens=1)
    packed = compute_logprobs(trainer.policy, batch, layout, micro_batch_tokens=100000)
    _say(layout, "packed_vs_unpacked", max((a - b).abs().max().item() for a, b in zip(packed, base)))
    del trainer
    _teardown()

    # HF comparison on a fresh (un-updated) policy
    layout, policy, _, _ = _setup(tp, 1, hf_cfg, policy_dir)
    fresh = compute_logprobs(policy, batch, layout, micro_batch_tokens=64)
    _say(layout, "vs_hf", max((a - b).abs().max().item() for a, b in zip(fresh, hf_logp)))
    _say(layout, "lengths_match", all(a.numel() == len(s.response_ids) for a, s in zip(fresh, batch.sequences)))
    del policy
    _teardown()

    # 3) learning direction: all-correct batch raises its log-prob, all-wrong lowers it (full OREAL, RM on)
    for label, positive in (("correct", True), ("wrong", False)):
        seqs = [dataclasses.replace(s, is_positive=positive, advantage=1.0 if positive else -1.0)
                for s in batch.sequences]
        fixed = TrainBatch(sequences=seqs)
        layout, policy, rm, reference = _setup(tp, 1, hf_cfg, policy_dir, rm_head=torch.zeros(1, hf_cfg["hidden_size"]))
        trainer = OrealTrainer(policy, rm, reference, layout, AlgoConfig(actor_freeze_steps=0, kl_coef=0.0),
                               OptimConfig(lr=3e-3, warmup_steps=0), OptimConfig(lr=3e-2, warmup_steps=0),
                               total_steps=1000, micro_batch_tokens=64)
        before = torch.cat(compute_logprobs(trainer.policy, fixed, layout)).mean().item()
        first = None
        for step in range(6):
            met = trainer.update(fixed, step)
            first = met["policy/grad_norm"] if first is None else first
        after = torch.cat(compute_logprobs(trainer.policy, fixed, layout)).mean().item()
        _say(layout, f"learn_{label}", before, after, first, met["rm/mean_seq_logit"])
        del trainer
        _teardown()

    # 4) no token RM (the ablation presets): ω ≡ 1, REINFORCE form, the policy still moves
    from megatron_oreal.algo.ladder import ABLATIONS

    layout, policy, _, reference = _setup(tp, 1, hf_cfg, policy_dir)
    trainer = OrealTrainer(policy, None, reference, layout, AlgoConfig(**ABLATIONS["reinforce"]),
                           OptimConfig(lr=1e-3, warmup_steps=0), None, total_steps=10, micro_batch_tokens=64)
    m = trainer.update(batch, step=0)
    _say(layout, "reinforce", m["policy/grad_norm"], m["tokens/w_pos_nonzero_frac"], m["tokens/w_neg_nonzero_frac"],
         m["loss/positive"] + m["loss/negative"], "rm/loss" in m)
    del trainer
    _teardown()

    # 5) bf16 + distributed optimizer sharded over DP=2: the RM learns, the (frozen, then trained) policy
    #    steps stay finite
    layout, policy, rm, reference = _setup(1, 1, hf_cfg, policy_dir, rm_head=torch.zeros(1, hf_cfg["hidden_size"]),
                                           dtype="bf16")
    trainer = OrealTrainer(policy, rm, reference, layout, AlgoConfig(actor_freeze_steps=1),
                           OptimConfig(lr=1e-3, warmup_steps=0), OptimConfig(lr=1e-2, warmup_steps=0),
                           total_steps=10, micro_batch_tokens=64, distributed_optimizer=True)
    ms = [trainer.update(batch, step) for step in range(3)]
    finite = all(torch.isfinite(torch.tensor(float(v))).item() for m in ms for v in m.values()
                 if isinstance(v, (int, float)))
    _say(layout, "bf16_distopt", finite, ms[0]["rm/loss"], ms[-1]["rm/loss"], ms[0]["policy/grad_norm"],
         ms[-1]["policy/grad_norm"])
    del trainer
    _teardown()

    # 6) sft_update lowers the NLL of its batch
    layout, policy, _, _ = _setup(tp, 1, hf_cfg, policy_dir)
    ddp = optim.wrap_ddp(policy)
    opt = optim.build_optimizer(ddp, OptimConfig(lr=3e-3, warmup_steps=0))
    losses = [sft_update(ddp, opt, batch, layout, micro_batch_tokens=64)["loss/nll"] for _ in range(4)]
    _say(layout, "sft_losses", *losses)
    _teardown()


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(here))  # tests/ (helpers, reference)
    mode, workdir = sys.argv[1], sys.argv[2]
    {"invariance": invariance, "behaviour": behaviour}[mode](workdir)
    from megatron_oreal.mcore.parallel import destroy_parallel

    destroy_parallel()
