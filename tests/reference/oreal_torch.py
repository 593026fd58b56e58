"""Plain single-process PyTorch OREAL step on `transformers` models: the oracle for the Megatron path.

Written straight from docs/algorithm.md §8 (the Megatron-oriented pseudocode of [train_oreal.py:L633-866]), one sequence at a
time, unpacked, with the full-vocabulary log-softmax, and without importing megatron_oreal.algo: the
parity test then checks the sharded implementation against an independent one.

    ref = oreal_reference_step(policy_dir, ref_dir, batch, algo, rm_head)
    ref["policy_grads"][hf_name], ref["rm_grads"][hf_name], ref["rm_head_grad"], ref["metrics"]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def load_hf(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.train()


def load_hf_rm(path: str, head: torch.Tensor):
    """Backbone of `path` with lm_head replaced by Linear(hidden, 1, bias=False) holding `head` [1, H]."""
    model = load_hf(path)
    model.lm_head = torch.nn.Linear(model.config.hidden_size, 1, bias=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(head)
    return model


def response_outputs(model, prompt_ids, response_ids) -> torch.Tensor:
    """Outputs at positions P-1 .. P+R-2 (the ones predicting the R response tokens): [R, V or 1]."""
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    out = model(input_ids=ids).logits[0]
    p, r = len(prompt_ids), len(response_ids)
    return out[p - 1 : p + r - 1]


def response_logprobs(model, prompt_ids, response_ids) -> torch.Tensor:
    logits = response_outputs(model, prompt_ids, response_ids).float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response_ids)[:, None])[:, 0]


def oreal_reference_step(policy_dir: str, ref_dir: str | None, batch, algo, rm_head: torch.Tensor | None) -> dict:
    """Gradients of one OREAL step (no optimizer update) for the policy and the token RM."""
    policy = load_hf(policy_dir)
    reference = load_hf(ref_dir or policy_dir).eval()
    rm = load_hf_rm(policy_dir, rm_head) if rm_head is not None else None
    seqs = batch.sequences
    n_pos = float(sum(len(s.response_ids) for s in seqs if s.is_positive))
    n_neg = float(sum(len(s.response_ids) for s in seqs if not s.is_positive))
    n_all, m = n_pos + n_neg, float(len(seqs))
    loss_actor, loss_rm = torch.zeros(()), torch.zeros(())
    pos_total = neg_total = kl_total = 0.0
    nz_pos = nz_neg = 0
    for s in seqs:
        lp = response_logprobs(policy, s.prompt_ids, s.response_ids)
        with torch.no_grad():
            rl = response_logprobs(reference, s.prompt_ids, s.response_ids)
        r = len(s.response_ids)
        if rm is not None:
            w = response_outputs(rm, s.prompt_ids, s.response_ids)[:, 0]
            y = torch.tensor(1.0 if s.is_positive else 0.0)  # int(max(r, 0))
            loss_rm = loss_rm + F.binary_cross_entropy_with_logits(w.float().mean(), y) / max(m, 1.0)
            q = torch.sigmoid(torch.cumsum(w.detach().double(), 0) / torch.arange(1, r + 1)).float()
            tp, tn = algo.correct_threshold, algo.incorrect_threshold
            w_p = ((q - tp) / (1 - tp)).clamp(0, 1)
            w_n = (((1 - q) - tn) / (1 - tn)).clamp(0, 1)
        else:
            w_p = w_n = torch.ones(r)
        a = s.advantage
        if s.is_positive:
            scale = a if algo.pos_mult_adv else 1.0
            term = algo.positive_loss_factor * scale * (w_p * -lp).sum() / max(n_pos, 1.0)
            pos_total += float(term.detach())
            nz_pos += int((w_p > 0).sum())
        else:
            ratio = torch.exp(lp - lp.detach())
            term = -algo.negative_loss_factor * (ratio * (a * w_n)).sum() / max(n_neg, 1.0)
            neg_total += float(term.detach())
            nz_neg += int((w_n > 0).sum())
        d = rl - lp
        kl = algo.kl_coef * (torch.exp(d) - d - 1).sum() / max(n_all, 1.0)
        kl_total += float(kl.detach())
        loss_actor = loss_actor + term + kl
    loss_actor.backward()
    out = {
        "policy_grads": {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                         for n, p in policy.named_parameters()},
        "metrics": {"loss/positive": pos_total, "loss/negative": neg_total, "loss/kl": kl_total,
                    "rm/loss": float(loss_rm.detach()),
                    "tokens/w_pos_nonzero_frac": nz_pos / max(n_pos, 1.0),
                    "tokens/w_neg_nonzero_frac": nz_neg / max(n_neg, 1.0)},
    }
    if rm is not None:
        loss_rm.backward()
        out["rm_grads"] = {n: p.grad.detach().clone() for n, p in rm.named_parameters() if n != "lm_head.weight"}
        out["rm_head_grad"] = rm.lm_head.weight.grad.detach().clone()
    return out
