"""One OREAL training step on Megatron-Core: token-RM update, then policy update (docs/algorithm.md §4.2 step 7-8).

    trainer = OrealTrainer(policy, token_rm, ReferenceWeights(policy), layout, cfg.algo,
                           cfg.policy.optim, cfg.token_rm.optim, total_steps=cfg.steps)
    metrics = trainer.update(batch, step)

Per step (identical TrainBatch on every rank; each DP rank trains its balanced share, packing.py):
 1. global counts N⁺, N⁻, N, M: all-reduced over DP only (not TP/PP: those ranks hold the same data);
 2. token RM: forward + backward of the sequence BCE (Σ/M), one AdamW step. The token weights ω⁺/ω⁻
    for the policy come from the scores of this same forward, i.e. from the RM *before* its update
    ([P Alg 1] lines 10-12, docs/algorithm.md §3 "Update schedule");
 3. reference log-probs: the initial weights swapped into the policy, forward only (skipped if β = 0);
 4. policy: L⁺ + L⁻ + L^KL (algo/losses.py), one AdamW step; skipped (forward only, for the metrics)
    while step < actor_freeze_steps. Both LRs follow algo/schedule.py at every step regardless.

Gradient scale: each micro-batch loss is Σ_local/N_global; run_schedule multiplies it by
num_microbatches × dp to undo the schedule's 1/num_microbatches and DDP's 1/dp averaging, so the
reduced gradient is Σ_all ranks, all micro-batches / N_global: independent of how the batch is split.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from megatron_oreal.algo.losses import policy_loss, rm_loss
from megatron_oreal.algo.rollout_correction import tis_weights
from megatron_oreal.algo.token_weights import token_weights
from megatron_oreal.config import AlgoConfig, OptimConfig
from megatron_oreal.mcore import optim
from megatron_oreal.mcore.forward import (needs_dense_mask, response_logprobs, response_values, run_schedule,
                                          uses_packed_local)
from megatron_oreal.mcore.model import unwrap
from megatron_oreal.mcore.packing import MicroBatch, build_micro_batches, local_counts
from megatron_oreal.mcore.parallel import dp_group, pp_group, pp_ranks
from megatron_oreal.types import TrainBatch

Tensor = torch.Tensor

# Metric sums reduced over micro-batches and DP ranks (fixed keys so every rank reduces the same list).
POLICY_KEYS = ("loss/positive", "loss/negative", "loss/kl", "tokens/positive", "tokens/negative",
               "tokens/w_pos_nonzero", "tokens/w_neg_nonzero", "sum/neg_logp", "sum/advantage_tokens",
               "sum/kl", "sum/logp_minus_ref")
RM_KEYS = ("loss/token_rm", "sum/rm_correct", "sum/rm_logit")
# Train/rollout log-prob mismatch (rollout.log_logprob_mismatch; slime's
# `train_rollout_logprob_abs_diff`, NeMo-RL's `token_mult_prob_error`), over the tokens
# whose sequences carry the sampler's log-probs.
MISMATCH_KEYS = ("sum/lp_abs_diff", "sum/lp_k3", "tokens/lp_compared")
TIS_KEYS = ("sum/tis_ratio", "sum/tis_weight", "tokens/tis_clipped")  # algo.rollout_correction=tis


def _reduce_metrics(outputs: list[dict], keys: tuple[str, ...], layout) -> dict[str, float]:
    """Sum the last stage's per-micro-batch dicts over DP, then give every PP stage the result."""
    vec = torch.zeros(len(keys), dtype=torch.float64)
    if layout.is_last_stage:
        for out in outputs:
            for i, k in enumerate(keys):
                if k in out:
                    vec[i] += float(out[k])
    vec = vec.to(layout.device)  # NCCL groups reduce device tensors only
    if layout.dp > 1:
        dist.all_reduce(vec, group=dp_group())
    if layout.pp > 1:
        dist.broadcast(vec, src=pp_ranks()[-1], group=pp_group())
    return {k: float(v) for k, v in zip(keys, vec.tolist())}


def _all_reduce_counts(mbs: list[MicroBatch], layout) -> dict[str, float]:
    counts = local_counts(mbs)
    keys = ("n_pos", "n_neg", "n_all", "m")
    vec = torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64, device=layout.device)
    if layout.dp > 1:
        dist.all_reduce(vec, group=dp_group())  # DP only: TP/PP ranks of a replica hold the same sequences
    return dict(zip(keys, vec.cpu().tolist()))


class OrealTrainer:
    """Owns the DDP-wrapped policy and token RM and their optimizers; `update` is one RL step."""

    def __init__(
        self,
        policy,
        token_rm,
        reference,
        layout,
        algo_cfg: AlgoConfig,
        policy_optim_cfg: OptimConfig,
        rm_optim_cfg: OptimConfig | None,
        total_steps: int,
        *,
        micro_batch_tokens: int = 16384,
        distributed_optimizer: bool = False,
    ):
        self.layout, self.algo, self.total_steps = layout, algo_cfg, total_steps
        self.micro_batch_tokens = micro_batch_tokens
        self.policy_optim_cfg, self.rm_optim_cfg = policy_optim_cfg, rm_optim_cfg
        self.vocab_size = unwrap(policy).arch.vocab_size
        self.reference = reference
        self.last_token_weights: list = []  # (TrainSequence, ω per token) of the last update, for the HTML page
        self.policy = optim.wrap_ddp(policy, distributed_optimizer=distributed_optimizer)
        if reference is not None:
            reference.match_dtypes(self.policy)
        self.policy_opt = optim.build_optimizer(self.policy, policy_optim_cfg, distributed_optimizer=distributed_optimizer)
        self.use_rm = token_rm is not None and algo_cfg.token_weighting != "none"
        self.token_rm = self.rm_opt = None
        if self.use_rm:
            if rm_optim_cfg is None:
                raise ValueError("OrealTrainer: token_weighting needs rm_optim_cfg (token_rm.optim)")
            self.token_rm = optim.wrap_ddp(token_rm, distributed_optimizer=distributed_optimizer)
            self.rm_opt = optim.build_optimizer(self.token_rm, rm_optim_cfg, distributed_optimizer=distributed_optimizer)

    # ------------------------------------------------------------------ helpers
    def micro_batches(self, batch: TrainBatch) -> list[MicroBatch]:
        # FP8 GEMMs (Transformer Engine) need the token dimension in multiples of 16.
        pad = 16 if getattr(unwrap(self.policy).config, "fp8", None) else 1
        return build_micro_batches(batch, self.layout.dp_rank, self.layout.dp, self.micro_batch_tokens,
                                   with_mask=needs_dense_mask(self.policy), pad_to_multiple=pad,
                                   share_prompts=uses_packed_local(self.policy))

    def _rm_pass(self, mbs, counts, step):
        """Token-RM forward/backward + step; returns (ω⁺, ω⁻) per micro-batch (last stage) and metrics."""
        weights: dict[int, tuple[Tensor, Tensor]] = {}
        a = self.algo

        def post(idx, mb, output):
            scores = response_values(output.squeeze(-1), mb)  # [T]: w_t from the position predicting a_t
            weights[idx] = token_weights(scores.detach(), mb.resp_cu_seqlens, a.token_weighting,
                                         a.correct_threshold, a.incorrect_threshold, a.topk_ratio)
            return rm_loss(scores, mb.resp_cu_seqlens, mb.is_positive, counts["m"])

        optim.zero_grads(self.token_rm, self.rm_opt)
        lr = optim.lr_for_step(self.rm_optim_cfg, step, self.total_steps)
        optim.set_lr(self.rm_opt, lr)
        outputs = run_schedule(self.token_rm, mbs, post, forward_only=False, loss_scale=self.layout.dp)
        updated, grad_norm = optim.optimizer_step(self.rm_opt)
        metrics = _reduce_metrics(outputs, RM_KEYS, self.layout)
        m = max(counts["m"], 1.0)
        return weights, {"rm/skipped": float(not updated),
                         "rm/loss": metrics["loss/token_rm"], "rm/accuracy": metrics["sum/rm_correct"] / m,
                         "rm/mean_seq_logit": metrics["sum/rm_logit"] / m, "rm/grad_norm": grad_norm, "rm/lr": lr}

    def _ref_pass(self, mbs) -> dict[int, Tensor]:
        ref: dict[int, Tensor] = {}

        def post(idx, mb, output):
            ref[idx] = response_logprobs(output, mb, self.vocab_size).detach()
            return output.sum() * 0.0, {}

        with self.reference.swapped_in(self.policy):
            run_schedule(self.policy, mbs, post, forward_only=True)
        return ref

    # ------------------------------------------------------------------ the step
    def update(self, batch: TrainBatch, step: int) -> dict[str, Any]:
        mbs = self.micro_batches(batch)
        counts = _all_reduce_counts(mbs, self.layout)
        metrics: dict[str, Any] = {"step": step, "sequences": counts["m"], "tokens/response": counts["n_all"]}

        if self.use_rm:
            weights, rm_metrics = self._rm_pass(mbs, counts, step)
            metrics.update(rm_metrics)
        else:
            weights = {}
        self.last_token_weights = _per_sequence_weights(batch, mbs, weights)
        ref = self._ref_pass(mbs) if self.algo.kl_coef != 0.0 and self.reference is not None else {}

        train_actor = step >= self.algo.actor_freeze_steps
        compare = bool(batch.sequences) and all(s.rollout_logprobs is not None for s in batch.sequences)
        # load_config resolves "auto" from rollout.fp8; a bare AlgoConfig knows no engine: on-policy
        tis = self.algo.rollout_correction == "tis"
        if tis and batch.sequences and not compare:
            raise ValueError("algo.rollout_correction=tis needs the engine's log-probs on every sequence "
                             "(the engine returned none for some)")
        diff_max = [0.0]

        def post(idx, mb, output):
            logp = response_logprobs(output, mb, self.vocab_size)
            w_pos, w_neg = weights.get(idx) or (torch.ones_like(logp), torch.ones_like(logp))
            rollout_lp = _rollout_logprobs(batch, mb).to(logp.device) if compare else None
            is_weight, tis_sums = (tis_weights(logp.detach(), rollout_lp, self.algo.tis_clip, self.algo.tis_clip_low)
                                   if tis else (None, {}))
            loss, out = policy_loss(logp, ref.get(idx), mb.resp_cu_seqlens, mb.advantages, mb.is_positive,
                                    w_pos.to(logp.device), w_neg.to(logp.device),
                                    counts["n_pos"], counts["n_neg"], counts["n_all"], self.algo, is_weight)
            out.update(tis_sums)
            if compare:  # the very log-probs the loss uses vs the sampler's, same tokens
                sums, mx = logprob_mismatch(logp.detach(), rollout_lp)
                out.update(sums)
                diff_max[0] = max(diff_max[0], mx)
            return loss, out

        lr = optim.lr_for_step(self.policy_optim_cfg, step, self.total_steps)
        optim.set_lr(self.policy_opt, lr)
        optim.zero_grads(self.policy, self.policy_opt)
        outputs = run_schedule(self.policy, mbs, post, forward_only=not train_actor, loss_scale=self.layout.dp)
        updated, grad_norm = optim.optimizer_step(self.policy_opt) if train_actor else (False, 0.0)
        pm = _reduce_metrics(outputs, POLICY_KEYS + (MISMATCH_KEYS if compare else ()) + (TIS_KEYS if tis else ()),
                             self.layout)
        n_all, n_pos, n_neg = max(counts["n_all"], 1.0), max(counts["n_pos"], 1.0), max(counts["n_neg"], 1.0)
        metrics.update({
            "loss/positive": pm["loss/positive"],
            "loss/negative": pm["loss/negative"],
            "loss/kl": pm["loss/kl"],
            "loss/policy": pm["loss/positive"] + pm["loss/negative"] + pm["loss/kl"],
            "policy/grad_norm": grad_norm,
            "policy/lr": lr,
            "policy/frozen": not train_actor,
            "policy/skipped": float(train_actor and not updated),  # non-finite grad norm: no update
            "policy/entropy": pm["sum/neg_logp"] / n_all,  # −mean logp (avg_gen_entropy)
            "policy/kl": pm["sum/kl"] / n_all,
            "policy/ref_kl": pm["sum/logp_minus_ref"] / n_all,  # mean(logp − ref) (avg_ref_kl)
            "policy/avg_adv": pm["sum/advantage_tokens"] / n_all,
            "tokens/positive": counts["n_pos"],
            "tokens/negative": counts["n_neg"],
            "tokens/w_pos_nonzero_frac": pm["tokens/w_pos_nonzero"] / n_pos,
            "tokens/w_neg_nonzero_frac": pm["tokens/w_neg_nonzero"] / n_neg,
            "micro_batches": len(mbs),
        })
        if compare:
            n_lp = max(pm["tokens/lp_compared"], 1.0)
            metrics.update({"rollout/logprob_abs_diff_mean": pm["sum/lp_abs_diff"] / n_lp,
                            "rollout/logprob_diff_max": _reduce_max(diff_max[0], self.layout),
                            "rollout/logprob_k3_kl": pm["sum/lp_k3"] / n_lp})
        if tis:  # algo/rollout_correction.py: mean raw ratio, mean weight used, share of tokens truncated
            n_lp = max(pm["tokens/lp_compared"], 1.0)
            metrics.update({"rollout_corr/ratio_mean": pm["sum/tis_ratio"] / n_lp,
                            "rollout_corr/weight_mean": pm["sum/tis_weight"] / n_lp,
                            "rollout_corr/clipped_frac": pm["tokens/tis_clipped"] / n_lp})
        return metrics


def _rollout_logprobs(batch: TrainBatch, mb: MicroBatch) -> Tensor:
    """The sampler's log-probs of mb's response tokens, in the packed response layout (packing.py)."""
    lp = [x for i in mb.seq_indices for x in batch.sequences[i].rollout_logprobs]
    if len(lp) != mb.num_response_tokens:
        raise ValueError(f"rollout_logprobs: {len(lp)} values for {mb.num_response_tokens} response tokens "
                         f"(sequences {mb.seq_indices}); each needs one per response token")
    return torch.tensor(lp, dtype=torch.float32)


def logprob_mismatch(train_logp: Tensor, rollout_logp: Tensor) -> tuple[dict[str, Tensor], float]:
    """Sums over tokens of |Δ| and of the k3 estimate, and max |Δ|, with Δ = log π_train − log π_rollout.

    k3 = exp(Δ) − Δ − 1 ≥ 0 is the unbiased low-variance estimator of KL(π_rollout ‖ π_train) from
    samples of the rollout policy (Schulman's k3; the same form as OREAL's KL term, docs/algorithm.md §2.5),
    what slime/verl log as the train-inference mismatch (slime PR THUDM/slime#690;
    verl docs/algo/rollout_corr.md). Both inputs are [T] fp32.
    """
    delta = train_logp.float() - rollout_logp.to(train_logp.device).float()
    k3 = torch.expm1(delta) - delta
    mx = float(delta.abs().max()) if delta.numel() else 0.0
    return {"sum/lp_abs_diff": delta.abs().sum(), "sum/lp_k3": k3.sum(),
            "tokens/lp_compared": torch.tensor(float(delta.numel()))}, mx


def _reduce_max(value: float, layout) -> float:
    """Max over DP of a last-stage scalar, then given to every PP stage (as _reduce_metrics)."""
    vec = torch.tensor([value if layout.is_last_stage else 0.0], dtype=torch.float64, device=layout.device)
    if layout.dp > 1:
        dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=dp_group())
    if layout.pp > 1:
        dist.broadcast(vec, src=pp_ranks()[-1], group=pp_group())
    return float(vec.item())


def _per_sequence_weights(batch: TrainBatch, mbs: list[MicroBatch], weights: dict) -> list:
    """(TrainSequence, ω per response token) for this rank's sequences (last PP stage only): ω⁺ for
    positives, ω⁻ for negatives. For the token-weight HTML page; empty without a token RM."""
    out = []
    for idx, mb in enumerate(mbs):
        if idx not in weights:
            continue
        w_pos, w_neg = weights[idx]
        cu = mb.resp_cu_seqlens.tolist()
        for j, seq in enumerate(mb.seq_indices):
            s = batch.sequences[seq]
            w = (w_pos if s.is_positive else w_neg)[cu[j]:cu[j + 1]]
            out.append((s, w.detach().float().cpu().tolist()))
    return out


def compute_logprobs(model, batch: TrainBatch, layout, *, micro_batch_tokens: int = 16384) -> list[Tensor]:
    """Per-sequence response log-probs [R_i] (fp32, CPU) for every sequence of `batch`, on every rank.

    Forward only. `model` may be a bare GPTModel or DDP-wrapped. The vocabulary size comes from the
    model's `.arch`. Results are gathered from the last pipeline stage of every DP replica.
    """
    vocab = unwrap(model).arch.vocab_size
    mbs = build_micro_batches(batch, layout.dp_rank, layout.dp, micro_batch_tokens, with_mask=needs_dense_mask(model),
                              share_prompts=uses_packed_local(model))
    local: dict[int, Tensor] = {}

    def post(idx, mb, output):
        logp = response_logprobs(output, mb, vocab).detach().cpu()
        cu = mb.resp_cu_seqlens.tolist()
        for j, seq in enumerate(mb.seq_indices):
            local[seq] = logp[cu[j]:cu[j + 1]]
        return output.sum() * 0.0, {}

    with torch.no_grad():
        run_schedule(model, mbs, post, forward_only=True)
    share = local if (layout.is_last_stage and layout.tp_rank == 0) else {}
    gathered: list[dict] = [None] * dist.get_world_size() if dist.is_initialized() else [share]
    if dist.is_initialized():
        dist.all_gather_object(gathered, share)
    merged = {k: v for d in gathered for k, v in d.items()}
    missing = [i for i in range(batch.num_sequences) if i not in merged]
    if missing:
        raise RuntimeError(f"compute_logprobs: no log-probs came back for sequences {missing[:8]}")
    return [merged[i] for i in range(batch.num_sequences)]


def sft_update(ddp_model, optimizer, batch: TrainBatch, layout, *, lr: float | None = None,
               micro_batch_tokens: int = 16384) -> dict[str, float]:
    """One supervised step: NLL of the response tokens, mean over all response tokens of the batch.

    `ddp_model`/`optimizer` come from optim.wrap_ddp / optim.build_optimizer. Same normalisation trick
    as the RL step, so the gradient does not depend on the DP / micro-batch split.
    """
    vocab = unwrap(ddp_model).arch.vocab_size
    mbs = build_micro_batches(batch, layout.dp_rank, layout.dp, micro_batch_tokens,
                              with_mask=needs_dense_mask(ddp_model), share_prompts=uses_packed_local(ddp_model))
    n_all = max(_all_reduce_counts(mbs, layout)["n_all"], 1.0)

    def post(idx, mb, output):
        nll = -response_logprobs(output, mb, vocab).sum()
        return nll / n_all, {"loss/nll": nll.detach() / n_all, "tokens": torch.tensor(float(mb.num_response_tokens))}

    if lr is not None:
        optim.set_lr(optimizer, lr)
    optim.zero_grads(ddp_model, optimizer)
    outputs = run_schedule(ddp_model, mbs, post, forward_only=False, loss_scale=layout.dp)
    _, grad_norm = optim.optimizer_step(optimizer)
    m = _reduce_metrics(outputs, ("loss/nll", "tokens"), layout)
    return {"loss/nll": m["loss/nll"], "tokens": m["tokens"], "grad_norm": grad_norm}
