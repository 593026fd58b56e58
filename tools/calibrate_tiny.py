"""Calibrate the built-in tiny task: SFT from an imperfect teacher, then OREAL RL, in plain PyTorch.

This is an experiment tool, not part of the library (it does not use Megatron): it measures whether
the task design lets RL raise greedy pass@1 in a few minutes on 2 CPU cores, and it writes the
pre-trained starting model that examples/tiny ships. Design and measured numbers: examples/tiny/README.md.

    python tools/calibrate_tiny.py sft  --digits 1 --steps 800 --seed 0 --threads 1 --out runs/tiny_sft
    python tools/calibrate_tiny.py rl   --digits 1 --init runs/tiny_sft --steps 60 --seed 5 --threads 2 \
        --lr 1e-4 --token-rm --freeze 10 --rm-lr 4e-4 --oreal-schedule
    python tools/calibrate_tiny.py eval --digits 1 --init runs/tiny_sft [--pass-k 8]
    python tools/calibrate_tiny.py data --digits 1 --out DIR   # prompts_train/heldout.jsonl, sft.jsonl

The credit-assignment task (data/credit.py, examples/credit/README.md) uses the same tool with
`--task credit`; its starting model is the tiny model fine-tuned on the credit teacher:

    python tools/calibrate_tiny.py sft --task credit --from-model examples/tiny/model --steps 400 --lr 1e-3 \
        --eval-every 100 --eval-n 500 --threads 1 --seed 0 --out runs/credit_sft

Every number printed comes from the run that prints it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from megatron_oreal.data import arith, credit  # noqa: E402
from megatron_oreal.data.char_tokenizer import build_tokenizer  # noqa: E402

EVAL_SEED = 0  # the held-out eval set is fixed: the first N held-out problems of seed 0
MAX_NEW = 28  # longest reference response is 23 chars + EOS (nops=2, digits=2)
SPEC = arith.ArithSpec()  # set from --task/--digits/--muldigits/--nops in main()
TASK = arith  # the task module (data/arith.py or data/credit.py: the same interface)


# ---------------------------------------------------------------- model + data


def new_model(vocab_size: int, eos: int, pad: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=10000.0, tie_word_embeddings=False, eos_token_id=eos, pad_token_id=pad,
        bos_token_id=None, attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(cfg).float()


def load_model(path: str):
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    return model, AutoTokenizer.from_pretrained(path)


def prompt_ids(tok, question: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)


def pad_right(seqs: list[list[int]], pad: int) -> torch.Tensor:
    L = max(map(len, seqs))
    return torch.tensor([s + [pad] * (L - len(s)) for s in seqs])


def response_logps(model, prompts: list[list[int]], responses: list[list[int]], pad: int, hidden=False):
    """Per-token log-probs of each response, [B, R_max] with a mask; right padding needs no attention
    mask (causal attention never looks right). hidden=True returns the final hidden states instead."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    ids = pad_right(seqs, pad)
    B, L = ids.shape
    R = max(map(len, responses))
    # label positions: response token j of sequence i sits at len(p_i)+j, predicted from position-1
    pos = torch.tensor([[len(p) - 1 + j for j in range(R)] for p in prompts]).clamp(max=L - 2)
    mask = torch.tensor([[j < len(r) for j in range(R)] for r in responses])
    if hidden:
        h = model.model(input_ids=ids).last_hidden_state  # [B, L, H]
        return h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1])), mask
    logits = model(input_ids=ids).logits.float()  # [B, L, V]
    lp = torch.log_softmax(logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])), -1)
    labels = ids.gather(1, (pos + 1).clamp(max=L - 1))
    return lp.gather(-1, labels[..., None]).squeeze(-1) * mask, mask


@torch.no_grad()
def generate(model, tok, questions: list[str], greedy: bool):
    """Left-padded KV-cache decoding; returns response token lists (EOS included when produced)."""
    ps = [prompt_ids(tok, q) for q in questions]
    L = max(map(len, ps))
    ids = torch.tensor([[tok.pad_token_id] * (L - len(p)) + p for p in ps])
    am = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in ps])
    kw = {} if greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=MAX_NEW, do_sample=not greedy,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
    res = []
    for row in out[:, L:].tolist():
        r = []
        for t in row:
            r.append(t)
            if t == tok.eos_token_id:
                break
        res.append(r)
    return res


def reward(tok, response: list[int], question: str) -> float:
    """+1 iff the response stopped (EOS) and its last \\boxed{} equals the gold answer exactly."""
    if not response or response[-1] != tok.eos_token_id:
        return -1.0
    return 1.0 if TASK.boxed_answer(tok.decode(response[:-1])) == TASK.gold_answer(question) else -1.0


def evaluate(model, tok, problems: list[str], bs: int = 500) -> dict:
    """Greedy pass@1 overall and on the teacher's weak sub-type (negative intermediate)."""
    model.eval()
    ok = neg_ok = neg_n = dropped = 0
    for i in range(0, len(problems), bs):
        qs = problems[i:i + bs]
        for q, r in zip(qs, generate(model, tok, qs, greedy=True)):
            c = reward(tok, r, q) > 0
            ok += c
            if TASK.has_negative_step(q):
                neg_n += 1
                neg_ok += c
                dropped += TASK.boxed_answer(tok.decode(r)) == signdrop_answer(q)
    n = len(problems)
    return {"pass1": ok / n, "neg_pass1": neg_ok / max(neg_n, 1), "pos_pass1": (ok - neg_ok) / max(n - neg_n, 1),
            "neg_signdrop": dropped / max(neg_n, 1), "n": n, "n_neg": neg_n}


def fmt_eval(e: dict) -> str:
    return (f"pass@1 {100 * e['pass1']:.1f}% (non-neg {100 * e['pos_pass1']:.1f}%, neg {100 * e['neg_pass1']:.1f}%, "
            f"neg sign-dropped {100 * e['neg_signdrop']:.1f}%; n={e['n']}, n_neg={e['n_neg']})")


def signdrop_answer(q: str) -> str:
    """The answer the teacher's systematic error gives on a sub-type problem."""
    if TASK is arith:
        return arith.solve_states(q, drop_sign=True)[-1]
    return TASK.signdrop_answer(q)


def heldout(n: int) -> list[str]:
    return TASK.make_problems(n, EVAL_SEED, "heldout", SPEC)


def train_stream(seed: int):
    """Endless train-split problems (may repeat; the held-out hash class never appears)."""
    rng = random.Random(f"stream:{seed}")
    while True:
        p = TASK.random_problem(rng, SPEC)
        if not TASK.is_held_out(p):
            yield p


# ---------------------------------------------------------------- SFT


def cmd_sft(a) -> None:
    torch.set_num_threads(a.threads)
    tok = build_tokenizer()
    if a.from_model:  # continue from a trained model (the credit task starts from the tiny model)
        model = load_model(a.from_model)[0]
        torch.manual_seed(a.seed)
    else:
        model = new_model(len(tok), tok.eos_token_id, tok.pad_token_id, a.seed)
    print(f"model params: {sum(p.numel() for p in model.parameters()):,}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 1.0) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(max(s - warm, 0) / max(a.steps - warm, 1), 1.0)))))
    stream, trng = train_stream(a.seed), random.Random(f"teacher:{a.seed}")
    evalset = heldout(a.eval_n)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        model.train()
        qs = [next(stream) for _ in range(a.batch)]
        ps = [prompt_ids(tok, q) for q in qs]
        rs = [tok(TASK.teacher_solution(q, trng, a.sign_error_rate)[0])["input_ids"] + [tok.eos_token_id]
              for q in qs]
        lp, mask = response_logps(model, ps, rs, tok.pad_token_id)
        loss = -lp.sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True); sched.step()
        if step % a.eval_every == 0 or step == a.steps:
            e = evaluate(model, tok, evalset)
            print(f"sft step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s {fmt_eval(e)}", flush=True)
            out = Path(a.out) if step == a.steps else Path(f"{a.out}_step{step}")
            model.save_pretrained(str(out))
            tok.save_pretrained(str(out))
            (out / "calibration.json").write_text(json.dumps({
                "sft_steps": step, "sft_schedule_steps": a.steps, "sft_lr": a.lr, "batch": a.batch,
                "seed": a.seed, "task": a.task, "from_model": a.from_model, "sign_error_rate": a.sign_error_rate, "spec": SPEC.__dict__,
                "heldout_eval": e}, indent=1))


def cmd_eval(a) -> None:
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.init)
    e = evaluate(model, tok, heldout(a.eval_n))
    print(fmt_eval(e))
    if a.pass_k:
        torch.manual_seed(a.seed)
        qs = heldout(a.eval_n)[:256]
        hits = torch.zeros(len(qs))
        neg = torch.tensor([TASK.has_negative_step(q) for q in qs])
        for _ in range(a.pass_k):
            rs = generate(model, tok, qs, greedy=False)
            hits += torch.tensor([reward(tok, r, q) > 0 for q, r in zip(qs, rs)]).float()
        print(f"sampled pass@1 {100 * hits.mean() / a.pass_k:.1f}%  neg sampled pass@1 "
              f"{100 * hits[neg].mean() / a.pass_k:.1f}%  pass@{a.pass_k} {100 * (hits > 0).float().mean():.1f}%")


def cmd_data(a) -> None:
    out = Path(a.out)
    rng = random.Random(f"teacher:{a.seed}")
    train = TASK.make_problems(a.n_train, a.seed, "train", SPEC)
    print("prompts_train", TASK.write_prompts_jsonl(out / "prompts_train.jsonl", train))
    print("prompts_heldout", TASK.write_prompts_jsonl(out / "prompts_heldout.jsonl", heldout(a.eval_n)))
    sft = [(q, TASK.teacher_solution(q, rng, a.sign_error_rate)[0]) for q in train]
    print("sft", TASK.write_sft_jsonl(out / "sft.jsonl", sft))


# ---------------------------------------------------------------- RL (docs/algorithm.md §2, §3, §8)


def lr_factor(s: int, warmup: int, total: int, min_ratio: float) -> float:
    """docs/algorithm.md §4.3: linear warm-up for `warmup` steps, then cosine to min_ratio at `total`."""
    if s < warmup:
        return (s + 1) / warmup
    t = min((s - warmup) / max(total - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def select_pairs(R: torch.Tensor, rng: random.Random) -> list[int]:
    """docs/algorithm.md §4.2 step 5: per mixed prompt, one random correct and one random incorrect sample."""
    keep = []
    P, K = R.shape
    for j in range(P):
        pos = [j * K + k for k in range(K) if R[j, k] > 0]
        neg = [j * K + k for k in range(K) if R[j, k] <= 0]
        if pos and neg:
            keep += [rng.choice(pos), rng.choice(neg)]
    return keep


def oreal_losses(lp, ref_lp, mask, adv, is_pos, w=None, eta=0.5, beta=0.01):
    """docs/algorithm.md §2.3-2.6 with global per-set token denominators; w = RM logits [M, R] or None (ω=1)."""
    m = mask.float()
    if w is None:
        wp = wn = torch.ones_like(m)
    else:  # §3: q_t = σ(prefix mean of w), threshold rescale with τ=0.5
        q = torch.sigmoid(torch.cumsum(w * m, 1) / torch.arange(1, w.shape[1] + 1)).detach()
        wp, wn = (2 * q - 1).clamp(0, 1), (1 - 2 * q).clamp(0, 1)
    n_pos, n_neg = m[is_pos].sum().clamp(min=1), m[~is_pos].sum().clamp(min=1)
    a = adv[:, None]
    pos = (a * wp * -lp * m)[is_pos].sum() / n_pos
    ratio = torch.exp(lp - lp.detach())  # = 1, gradient ∇logπ ([docs/algorithm.md, train_oreal.py:L814-824])
    neg = -eta * (ratio * a * wn * m)[~is_pos].sum() / n_neg
    d = ref_lp - lp
    kl = beta * ((torch.exp(d) - d - 1) * m).sum() / m.sum()
    return pos, neg, kl


def cmd_rl(a) -> None:
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(f"select:{a.seed}")
    policy, tok = load_model(a.init)
    ref, _ = load_model(a.init)
    ref.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=a.lr, weight_decay=0.01)
    rm = head = opt_rm = None
    if a.token_rm:  # docs/algorithm.md §3: full backbone copy + zero-initialised H->1 head
        rm, _ = load_model(a.init)
        head = torch.nn.Linear(rm.config.hidden_size, 1, bias=False)
        torch.nn.init.zeros_(head.weight)
        opt_rm = torch.optim.AdamW(list(rm.model.parameters()) + list(head.parameters()), lr=a.rm_lr,
                                   weight_decay=0.01)
    if a.oreal_schedule:  # docs/algorithm.md §4.3: the actor's schedule runs through the frozen steps
        sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, a.warmup, a.steps, a.min_lr_ratio))
    else:  # the actor's warm-up starts at its first update, so a fresh AdamW never starts at full lr
        sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(max(s - a.freeze, 0), a.warmup,
                                                                         a.steps - a.freeze, a.min_lr_ratio))
    sch_rm = opt_rm and torch.optim.lr_scheduler.LambdaLR(
        opt_rm, lambda s: lr_factor(s, a.warmup, a.steps, a.min_lr_ratio))
    stream = train_stream(a.seed + 1000)  # RL draws its own train-split problems
    evalset = heldout(a.eval_n)
    e = evaluate(policy, tok, evalset)
    print(f"rl step 0 {fmt_eval(e)}", flush=True)
    curve = [(0, e)]
    t_start, hist = time.time(), []
    for step in range(1, a.steps + 1):
        t0 = time.time()
        qs = [next(stream) for _ in range(a.prompts)]
        policy.eval()
        rs = generate(policy, tok, [q for q in qs for _ in range(a.k)], greedy=False)
        R = torch.tensor([reward(tok, r, qs[i // a.k]) for i, r in enumerate(rs)]).view(a.prompts, a.k)
        A = (R - (R.sum(1, keepdim=True) - R) / (a.k - 1)).flatten()  # RLOO, docs/algorithm.md §2.2
        keep = select_pairs(R, rng)
        t_gen = time.time() - t0
        info = {"reward": (R > 0).float().mean().item(), "mixed": len(keep) // 2,
                "unfinished": sum(r[-1] != tok.eos_token_id for r in rs) / len(rs)}
        if keep:
            policy.train()
            ps = [prompt_ids(tok, qs[i // a.k]) for i in keep]
            ys = [rs[i] for i in keep]
            adv, is_pos = A[keep], R.flatten()[keep] > 0
            lp, mask = response_logps(policy, ps, ys, tok.pad_token_id)
            with torch.no_grad():
                ref_lp, _ = response_logps(ref, ps, ys, tok.pad_token_id)
            w = None
            if rm is not None:
                h, _ = response_logps(rm, ps, ys, tok.pad_token_id, hidden=True)
                w = head(h).squeeze(-1)  # [M, R] RM logit at the position predicting each token
                z = (w * mask).sum(1) / mask.sum(1)
                rm_loss = F.binary_cross_entropy_with_logits(z, is_pos.float())  # docs/algorithm.md §3, Eq 12
                info["rm_loss"] = rm_loss.item()
                info["rm_acc"] = ((z > 0) == is_pos).float().mean().item()
            pos, neg, kl = oreal_losses(lp, ref_lp, mask, adv, is_pos, w, a.eta, a.beta)
            if step > a.freeze:
                (pos + neg + kl).backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            if rm is not None:  # weights above were computed before this update (docs/algorithm.md §3)
                rm_loss.backward()
                torch.nn.utils.clip_grad_norm_(list(rm.model.parameters()) + [head.weight], 1.0)
                opt_rm.step()
                opt_rm.zero_grad(set_to_none=True)
            d = (ref_lp - lp.detach()) * mask
            info.update(pos=pos.item(), neg=neg.item(), kl=((torch.exp(d) - d - 1) * mask).sum().item() / mask.sum().item())
        sch.step()
        if sch_rm:
            sch_rm.step()
        info.update(t_gen=t_gen, t_step=time.time() - t0)
        hist.append(info)
        if step % a.log_every == 0:
            last = hist[-a.log_every:]
            avg = {k: sum(h.get(k, 0) for h in last) / len(last) for k in info}
            print(f"rl step {step} " + " ".join(f"{k} {v:.3f}" for k, v in avg.items()) + f" lr {sch.get_last_lr()[0]:.2e}",
                  flush=True)
        if step % a.eval_every == 0 or step == a.steps:
            e = evaluate(policy, tok, evalset)
            curve.append((step, e))
            print(f"rl step {step} {time.time() - t_start:.0f}s {fmt_eval(e)}", flush=True)
    ts = [h["t_step"] for h in hist]
    print(f"RESULT seed {a.seed} start {100 * curve[0][1]['pass1']:.1f} end {100 * curve[-1][1]['pass1']:.1f} "
          f"best {100 * max(c[1]['pass1'] for c in curve):.1f} gain {100 * (curve[-1][1]['pass1'] - curve[0][1]['pass1']):+.1f} "
          f"mean step {sum(ts) / len(ts):.2f}s (gen {sum(h['t_gen'] for h in hist) / len(hist):.2f}s) "
          f"wall {time.time() - t_start:.0f}s", flush=True)
    if a.save:
        policy.save_pretrained(a.save)
        tok.save_pretrained(a.save)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("sft", "rl", "eval", "data"):
        p = sub.add_parser(name)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--eval-n", type=int, default=1000)
        p.add_argument("--out", default="runs/tiny_sft")
        p.add_argument("--init", default="runs/tiny_sft")
        p.add_argument("--sign-error-rate", type=float, default=0.6)
        p.add_argument("--digits", type=int, default=2)
        p.add_argument("--muldigits", type=int, default=1)
        p.add_argument("--nops", type=int, default=2)
        p.add_argument("--task", choices=("arith", "credit"), default="arith",
                       help="credit: the credit-assignment task (data/credit.py; --digits/--nops unused)")
    s = sub.choices["sft"]
    s.add_argument("--steps", type=int, default=3000)
    s.add_argument("--lr", type=float, default=2e-3)
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--eval-every", type=int, default=500)
    s.add_argument("--from-model", default="", help="start from this HF model instead of a random one")
    sub.choices["eval"].add_argument("--pass-k", type=int, default=0)
    sub.choices["data"].add_argument("--n-train", type=int, default=20000)
    r = sub.choices["rl"]
    r.add_argument("--steps", type=int, default=300)
    r.add_argument("--prompts", type=int, default=32)
    r.add_argument("--k", type=int, default=8)
    r.add_argument("--lr", type=float, default=1e-4)
    r.add_argument("--min-lr-ratio", type=float, default=0.2)
    r.add_argument("--warmup", type=int, default=10)
    r.add_argument("--freeze", type=int, default=0, help="actor-freeze steps (only the RM trains)")
    r.add_argument("--eta", type=float, default=0.5)
    r.add_argument("--beta", type=float, default=0.01)
    r.add_argument("--oreal-schedule", action="store_true", help="actor warm-up counted from step 0")
    r.add_argument("--token-rm", action="store_true")
    r.add_argument("--rm-lr", type=float, default=1e-4)
    r.add_argument("--eval-every", type=int, default=25)
    r.add_argument("--log-every", type=int, default=5)
    r.add_argument("--save", default="")
    a = ap.parse_args(argv)
    global SPEC, TASK, MAX_NEW
    if a.task == "credit":  # longest credit solution: 50 characters + EOS
        SPEC, TASK, MAX_NEW = credit.CreditSpec(), credit, 56
    else:
        SPEC = arith.ArithSpec(digits=a.digits, muldigits=a.muldigits, nops=a.nops)
    {"sft": cmd_sft, "rl": cmd_rl, "eval": cmd_eval, "data": cmd_data}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
