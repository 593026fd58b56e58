"""torchrun worker for tests/parallel/test_mcore_parallel.py (one launch checks many things).

    ref     (1 proc):  TP=1 loss + HF-layout gradients (tied and untied), TP=1 token-RM scores + ckpt,
                       a TP=1 checkpoint after one SGD step and its HF export.
    layouts (4 procs): TP2xPP2, TP2 (DP2), PP2 (DP2): same loss and gathered gradients as TP=1
                       (relative 1e-5); TP=1 checkpoint loads at TP2xPP2 (bit-exact export);
                       TP2xPP2 checkpoint + export written; the TP=1 token-RM checkpoint loads at
                       TP=2 and gives the TP=1 scores on every TP rank.
    reload  (1 proc):  the TP2xPP2 checkpoint loads at TP=1 with a bit-identical export.
Prints `CHECK <name> <value>` lines on rank 0; any mismatch raises (non-zero exit).
"""

from __future__ import annotations

import os
import sys
from functools import partial

import torch
import torch.distributed as dist

from helpers.say import say

B, S, MB = 4, 16, 2  # global batch, sequence, micro-batch size (2 micro-batches)


def _data(vocab):
    ids = torch.randint(0, vocab, (B, S + 1), generator=torch.Generator().manual_seed(1234))
    return [(ids[i : i + MB, :S], ids[i : i + MB, 1:]) for i in range(0, B, MB)]


def loss_and_grads(model, layout, vocab):
    """Megatron schedule (1F1B with PP) over 2 micro-batches; returns (mean CE, {hf_name: grad})."""
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_oreal.checkpoint.gather import iter_hf_tensors
    from megatron_oreal.mcore.model import mask_padded_vocab
    from megatron_oreal.mcore.parallel import embedding_group

    def loss_func(labels, out):
        ce = tensor_parallel.vocab_parallel_cross_entropy(mask_padded_vocab(out, vocab).float(), labels)
        loss = ce.mean()
        return loss, {"loss": loss.detach().clone()}

    def step(it, m):
        tokens, labels = next(it)
        pos = torch.arange(S).unsqueeze(0).expand(MB, S)
        return m(tokens, pos, None), partial(loss_func, labels)

    model.zero_grad(set_to_none=True)
    out = get_forward_backward_func()(forward_step_func=step, data_iterator=iter(_data(vocab)), model=[model],
                                      num_microbatches=B // MB, seq_length=S, micro_batch_size=MB)
    grp = embedding_group()
    if model.share_embeddings_and_output_weights and layout.pp > 1 and grp is not None:
        # What Megatron's finalize_model_grads does for tied embeddings split across PP stages.
        w = model.embedding.word_embeddings.weight if layout.is_first_stage else model.output_layer.weight
        dist.all_reduce(w.grad, group=grp)
    loss = torch.tensor(float("-inf"))
    if layout.is_last_stage:
        loss = torch.stack([o["loss"] for o in out]).mean()
    dist.all_reduce(loss, op=dist.ReduceOp.MAX)
    grads = {}
    for bucket in iter_hf_tensors(model, layout, bucket_bytes=64 << 10, replicas="first", source=lambda p: p.grad):
        grads.update(bucket)
    return loss.item(), grads


def build(hf_dir, layout, *, rm=False):
    from megatron_oreal.checkpoint.hf_io import load_hf_weights
    from megatron_oreal.mcore.hf_config import load_hf_config
    from megatron_oreal.mcore.model import build_policy, build_token_rm

    model = (build_token_rm if rm else build_policy)(load_hf_config(hf_dir), layout)
    load_hf_weights(model, hf_dir, layout)
    return model


def rm_scores(hf_dir, layout, ckpt=None, save=None):
    """Token-RM scores with a fixed non-zero head; `ckpt`: load the RM from a dist checkpoint instead."""
    from megatron_oreal.checkpoint.dist import load_model_dist, save_model_dist
    from megatron_oreal.mcore.model import forward_logits

    rm = build(hf_dir, layout, rm=True)
    with torch.no_grad():
        if ckpt:
            load_model_dist(rm, ckpt)
        else:
            rm.output_layer.weight.copy_(torch.randn(rm.output_layer.weight.shape,
                                                     generator=torch.Generator().manual_seed(9)))
    if save:
        save_model_dist(rm, save)
    with torch.no_grad():
        return forward_logits(rm, _data(250)[0][0])


def sgd_step(model, lr=0.5):
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)


def read_hf(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, f)))
    return out


def check_equal_hf(a, b, what):
    x, y = read_hf(a), read_hf(b)
    assert sorted(x) == sorted(y), f"{what}: names differ"
    bad = [k for k in x if not torch.equal(x[k], y[k])]
    assert not bad, f"{what}: tensors differ: {bad}"
    say(f"CHECK {what} bit-identical {len(x)} tensors")


def check_gather_all_replicas(model, layout, hf_dir):
    """replicas="all": the first rank of every DP replica gets the full HF tensors (= the source)."""
    from megatron_oreal.checkpoint.gather import iter_hf_tensors

    src = read_hf(hf_dir)
    got, nb = {}, 0
    for bucket in iter_hf_tensors(model, layout, bucket_bytes=100_000, replicas="all"):
        nb += 1
        got.update(bucket)
    assert sorted(got) == sorted(src), "gathered names differ from the HF checkpoint"
    if layout.tp_rank == 0 and layout.pp_rank == 0:
        bad = [k for k in src if not torch.equal(got[k], src[k])]
        assert not bad, f"rank {layout.rank}: gathered tensors differ: {bad}"
        say(f"CHECK gather_all rank{layout.rank} dp{layout.dp_rank} {len(got)} tensors {nb} buckets")
    else:
        assert all(v is None for v in got.values()), "non-destination ranks must get (name, None)"


def compare(name, loss, grads, ref):
    rloss, rgrads = ref
    rel = abs(loss - rloss) / abs(rloss)
    assert rel <= 1e-5, f"{name}: loss {loss} vs TP=1 {rloss} (rel {rel:.2e})"
    assert sorted(grads) == sorted(rgrads), f"{name}: gradient names differ"
    worst = max((g - rgrads[k]).abs().max().item() / rgrads[k].abs().max().clamp_min(1e-30).item()
                for k, g in grads.items())
    assert worst <= 1e-5, f"{name}: gradient rel diff {worst:.2e}"
    say(f"CHECK {name} loss={loss:.6f} ref={rloss:.6f} rel={rel:.1e} grad_rel={worst:.1e} n={len(grads)}")


def main(mode, work):
    from megatron_oreal.checkpoint.dist import load_model_dist, save_model_dist
    from megatron_oreal.checkpoint.gather import export_hf
    from megatron_oreal.mcore.hf_config import load_hf_config
    from megatron_oreal.mcore.parallel import destroy_parallel, init_parallel

    hf = {t: os.path.join(work, f"hf_tie{int(t)}") for t in (False, True)}
    if mode == "ref":
        layout = init_parallel(1, 1)
        ref = {}
        for tie in (False, True):
            model = build(hf[tie], layout)
            ref[tie] = loss_and_grads(model, layout, 250)
            if not tie:
                sgd_step(model)
                save_model_dist(model, os.path.join(work, "ckpt_tp1"))
                export_hf(model, layout, os.path.join(work, "hf_from_tp1"), load_hf_config(hf[tie]), log=None)
        ref["rm"] = rm_scores(hf[True], layout, save=os.path.join(work, "ckpt_rm_tp1"))
        torch.save(ref, os.path.join(work, "ref.pt"))
        say(f"CHECK ref losses {ref[False][0]:.6f} {ref[True][0]:.6f}")
        destroy_parallel()
    elif mode == "layouts":
        ref = torch.load(os.path.join(work, "ref.pt"))
        for tp, pp in ((2, 2), (2, 1), (1, 2)):
            layout = init_parallel(tp, pp)
            for tie in (False, True):
                model = build(hf[tie], layout)
                loss, grads = loss_and_grads(model, layout, 250)
                if layout.rank == 0:
                    compare(f"tp{tp}pp{pp}_tie{int(tie)}", loss, grads, ref[tie])
                if (tp, pp) == (2, 2) and not tie:
                    sgd_step(model)
                    save_model_dist(model, os.path.join(work, "ckpt_tp2pp2"))
                    export_hf(model, layout, os.path.join(work, "hf_from_tp2pp2"), load_hf_config(hf[tie]), log=None)
                    fresh = build(hf[tie], layout)
                    load_model_dist(fresh, os.path.join(work, "ckpt_tp1"))
                    export_hf(fresh, layout, os.path.join(work, "hf_tp1_at_tp2pp2"), load_hf_config(hf[tie]), log=None)
                    if layout.rank == 0:
                        check_equal_hf(os.path.join(work, "hf_from_tp1"), os.path.join(work, "hf_tp1_at_tp2pp2"),
                                       "ckpt_tp1_loaded_at_tp2pp2")
            if (tp, pp) == (2, 1):
                check_gather_all_replicas(build(hf[False], layout), layout, hf[False])
                scores = rm_scores(hf[True], layout, ckpt=os.path.join(work, "ckpt_rm_tp1"))
                diff = (scores - ref["rm"]).abs().max().item() / ref["rm"].abs().max().item()
                assert scores.shape == (MB, S, 1) and diff <= 1e-5, f"token RM at TP=2: rel diff {diff}"
                say(f"CHECK rm_tp2 rank{layout.rank} diff={diff:.1e}")
            destroy_parallel(keep_process_group=True)
        dist.destroy_process_group()
    elif mode == "reload":
        layout = init_parallel(1, 1)
        model = build(hf[False], layout)
        load_model_dist(model, os.path.join(work, "ckpt_tp2pp2"))
        export_hf(model, layout, os.path.join(work, "hf_tp2pp2_at_tp1"), load_hf_config(hf[False]), log=None)
        check_equal_hf(os.path.join(work, "hf_from_tp2pp2"), os.path.join(work, "hf_tp2pp2_at_tp1"),
                       "ckpt_tp2pp2_loaded_at_tp1")
        destroy_parallel()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":  # dist_checkpointing's writer re-imports __main__ (mp.Manager)
    main(sys.argv[1], sys.argv[2])
