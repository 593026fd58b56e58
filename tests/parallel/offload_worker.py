"""torchrun worker for tests/parallel/test_offload.py: TP2 x PP2 on 4 gloo processes, one launch.

    offload   two OREAL steps of a trainer whose train state goes to the host and back around a
              simulated rollout (mcore/offload.py, the sets runtime.Run.to_rollout/to_training move)
              against the same trainer without offload, bit for bit; a checkpoint written while
              offloaded (inside `resident()`) resumes a third trainer that ends bit-identical too.
    per_rank  the SGLang weight sync with per-rank payloads: every TP rank of the first stage sends
              its own full tensors, and the engine's leader receives payload i from TP rank i.
    groups    the gloo twins of the world / model-parallel / TP groups.

Prints `CHECK <name> <values...>` lines from rank 0; any exception exits non-zero.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys

import torch
import torch.distributed as dist

from helpers.say import say


def _check(layout, *parts):
    if layout.rank == 0:
        say("CHECK", *parts)


def _hf_state(ddp, layout) -> dict:
    """The full HF tensors on rank 0 (the weight sync's source), cloned."""
    from megatron_oreal.checkpoint.gather import iter_hf_tensors

    out = {}
    for bucket in iter_hf_tensors(ddp, layout, bucket_bytes=1 << 16, replicas="first"):
        out.update({n: t.clone() for n, t in bucket if t is not None})
    return out


def _all_equal(layout, a: dict, b: dict) -> bool:
    ok = torch.tensor([int(set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a))])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _same_metrics(a: dict, b: dict) -> bool:
    """Every metric equal (NaN == NaN), wall-clock ones aside."""
    keys = [k for k in a if "time" not in k and "second" not in k and "per_s" not in k]
    return set(a) == set(b) and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in keys)


def _optimizer_state(trainer) -> list[torch.Tensor]:
    from megatron_oreal.mcore.offload import optimizer_tensors

    return [t.clone() for opt in (trainer.policy_opt, trainer.rm_opt) for t in optimizer_tensors(opt)]


def _resident_bytes(trainer) -> int:
    """Bytes still held by anything the offload should have moved (checked independently of its walk:
    Megatron's DDP buffers themselves, every parameter and main_grad, the optimizers' state)."""
    from megatron_oreal.mcore.offload import optimizer_tensors

    total = 0
    for ddp in (trainer.policy, trainer.token_rm):
        for buf in ddp.buffers:
            total += buf.grad_data.untyped_storage().nbytes()
            if getattr(buf, "param_data", None) is not None:
                total += buf.param_data.untyped_storage().nbytes()
        for p in ddp.parameters():
            total += p.untyped_storage().nbytes() + p.main_grad.untyped_storage().nbytes()
    for opt in (trainer.policy_opt, trainer.rm_opt):
        total += sum(t.untyped_storage().nbytes() for t in optimizer_tensors(opt))
    return total


def offload(workdir: str) -> None:
    from megatron_oreal.checkpoint.hf_io import load_hf_weights
    from megatron_oreal.mcore import parallel
    from megatron_oreal.mcore.model import ReferenceWeights, build_policy, build_token_rm
    from megatron_oreal.mcore.offload import train_state_offload
    from megatron_oreal.mcore.run_state import model_and_optimizer_reader, model_and_optimizer_writer
    from megatron_oreal.mcore.train_step import OrealTrainer

    blob = torch.load(os.path.join(workdir, "case.pt"), weights_only=False)
    hf_cfg, batch, algo, optim_cfg = blob["hf_cfg"], blob["batch"], blob["algo"], blob["optim"]
    policy_dir = os.path.join(workdir, "policy")
    layout = parallel.init_parallel(2, 2, seed=1234)

    def trainer():
        # bf16 + the distributed optimizer: FP32 master shards, params as views into `param_data`.
        policy = build_policy(hf_cfg, layout, dtype="bf16")
        load_hf_weights(policy, policy_dir, layout)
        reference = ReferenceWeights(policy)
        rm = build_token_rm(hf_cfg, layout, dtype="bf16")
        load_hf_weights(rm, policy_dir, layout)
        if layout.is_last_stage:
            with torch.no_grad():
                rm.output_layer.weight.copy_(blob["rm_head"].to(rm.output_layer.weight.dtype))
        return OrealTrainer(policy, rm, reference, layout, algo, optim_cfg, optim_cfg, total_steps=10,
                            micro_batch_tokens=40, distributed_optimizer=True)

    plain, moved = trainer(), trainer()
    off = train_state_offload(moved, enabled=True, device=layout.device)
    ckpt = os.path.join(workdir, "ckpt")
    same_sync, same_metrics, left, nbytes = [], [], [], []
    for step in range(2):
        # the rollout phase, as Run.to_rollout: grads freed, optimizer/RM out, the sync reads the policy, policy out
        off.offload("grads", "rest")
        synced = _hf_state(moved.policy, layout)
        nbytes.append(off.offload("policy_params"))
        left.append(_resident_bytes(moved))
        same_sync.append(_all_equal(layout, synced, _hf_state(plain.policy, layout)))
        off.reload()  # Run.to_training
        m_plain, m_moved = plain.update(batch, step), moved.update(batch, step)
        same_metrics.append(_same_metrics(m_plain, m_moved))
        if step == 0:  # a checkpoint taken in the rollout phase (Adam state exists now), as Run.save does
            off.offload()
            with off.resident():
                for name, (ddp, opt) in {"policy": (moved.policy, moved.policy_opt),
                                         "token_rm": (moved.token_rm, moved.rm_opt)}.items():
                    model_and_optimizer_writer(ddp, opt)(os.path.join(ckpt, name))
            off.reload()
    _check(layout, "offloaded_bytes", *nbytes)
    _check(layout, "resident_bytes_while_offloaded", *left)
    _check(layout, "sync_source_equal", *same_sync)
    _check(layout, "metrics_equal", *same_metrics)
    _check(layout, "weights_equal", _all_equal(layout, _hf_state(plain.policy, layout), _hf_state(moved.policy, layout)))
    rm_equal = _all_equal(layout, _hf_state(plain.token_rm, layout), _hf_state(moved.token_rm, layout))
    a, b = _optimizer_state(plain), _optimizer_state(moved)
    opt_equal = len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    _check(layout, "rm_and_optimizer_equal", rm_equal, _all_equal(layout, {"x": torch.tensor(opt_equal)},
                                                                   {"x": torch.tensor(True)}))

    # resume: a fresh trainer reads the step-1 checkpoint and runs step 2 with offload
    resumed = trainer()
    for name, (ddp, opt) in {"policy": (resumed.policy, resumed.policy_opt),
                             "token_rm": (resumed.token_rm, resumed.rm_opt)}.items():
        model_and_optimizer_reader(ddp, opt)(os.path.join(ckpt, name))
    off2 = train_state_offload(resumed, enabled=True, device=layout.device)
    off2.offload("grads", "rest")
    _hf_state(resumed.policy, layout)
    off2.offload("policy_params")
    off2.reload()
    resumed.update(batch, 1)
    _check(layout, "resumed_weights_equal",
           _all_equal(layout, _hf_state(plain.policy, layout), _hf_state(resumed.policy, layout)),
           _all_equal(layout, _hf_state(plain.token_rm, layout), _hf_state(resumed.token_rm, layout)))

    per_rank(layout, plain)
    groups(layout)
    parallel.destroy_parallel()


class _RecordingEngine:
    """The leader's side of an SGLang engine with TP=2: records which trainer rank each payload came from."""

    def __init__(self, tp_size):
        self.tp_size = tp_size
        self.loaded: dict[int, dict] = {}
        self.events = []

    def begin_weight_sync(self, check=False):
        self.events.append("begin")

    def update_weights_from_tensor(self, payloads):
        from megatron_oreal.sync.buckets import unflatten

        for sglang_rank, raw in enumerate(payloads):
            obj = pickle.loads(raw)
            got = self.loaded.setdefault(sglang_rank, {"from": set(), "tensors": {}})
            got["from"].add(obj["sender"])
            buf = torch.frombuffer(bytearray(obj["buffer"]), dtype=torch.uint8)
            got["tensors"].update({n: t.clone() for n, t in unflatten(buf, obj["metadata"])})

    def end_weight_sync(self):
        self.events.append("end")


def per_rank(layout, trainer) -> None:
    from megatron_oreal.checkpoint.gather import iter_hf_tensors
    from megatron_oreal.mcore import parallel
    from megatron_oreal.sync import SGLangIPCTransport, sync_weights

    def tag(payload):  # what rank built this payload (the real serializer sends a CUDA-IPC handle)
        return pickle.dumps({"sender": dist.get_rank(), "buffer": payload["flattened_tensor"].numpy().tobytes(),
                             "metadata": payload["metadata"]})

    tp_ranks = dist.get_process_group_ranks(parallel.tp_group())
    leader = min(dist.get_process_group_ranks(parallel.model_parallel_group()))
    engine = _RecordingEngine(layout.tp) if layout.rank == leader else None
    source = iter_hf_tensors(trainer.policy, layout, bucket_bytes=1 << 16, every_tp_rank=True)
    if layout.pp_rank == 0:
        transport = SGLangIPCTransport(engine, group=parallel.tp_group(gloo=True), leader_rank=leader, serializer=tag)
        sync_weights(((n, t) for b in source for n, t in b), transport, bucket_bytes=1 << 16)
    else:
        for _ in source:
            pass
    want = _hf_state(trainer.policy, layout)
    if engine is not None:
        senders = [sorted(engine.loaded[i]["from"]) for i in range(layout.tp)]
        full = all(set(engine.loaded[i]["tensors"]) == set(want) and
                   all(torch.equal(engine.loaded[i]["tensors"][k], want[k]) for k in want) for i in range(layout.tp))
        _check(layout, "per_rank_senders", senders == [[r] for r in tp_ranks], senders)
        _check(layout, "per_rank_tensors_full", full, len(want), engine.events.count("begin"))

    # engines on every stage: every rank of both stages receives every stage's full tensors
    got = {}
    for bucket in iter_hf_tensors(trainer.policy, layout, bucket_bytes=1 << 16, every_tp_rank=True, every_stage=True):
        got.update({n: t.clone() for n, t in bucket if t is not None})
    digest = sorted((n, hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest())
                    for n, t in got.items())
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, digest)
    mine_ok = layout.rank != 0 or (set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want))
    _check(layout, "every_stage_tensors", mine_ok and all(d == every[0] for d in every), len(every[0]))


def groups(layout) -> None:
    from megatron_oreal.mcore import parallel
    from megatron_oreal.stages import Comm, engine_share, share_groups

    # two engines per replica (one per stage): each takes its chunk, every rank gets them back in order
    comm = Comm(is_engine_rank=layout.tp_rank == 0, mp_group=parallel.model_parallel_group(gloo=True),
                engines=layout.pp, engine_index=layout.pp_rank)
    prompts = [f"p{i}" for i in range(5)]
    mine = [f"{p}@stage{layout.pp_rank}" for p in engine_share(prompts, comm)] if comm.is_engine_rank else None
    shared = share_groups(mine, comm)
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, shared)
    _check(layout, "engine_share", all(s == every[0] for s in every), *every[0])

    ok = []
    for gloo, megatron in ((parallel.model_parallel_group(gloo=True), parallel.model_parallel_group()),
                           (parallel.tp_group(gloo=True), parallel.tp_group())):
        ok.append(dist.get_backend(gloo) == "gloo" and
                  dist.get_process_group_ranks(gloo) == dist.get_process_group_ranks(megatron))
    world = parallel.world_group(gloo=True)
    ok.append(dist.get_backend(world) == "gloo" and dist.get_world_size(world) == dist.get_world_size())
    _check(layout, "gloo_groups", *ok)


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(here))  # tests/ (helpers)
    offload(sys.argv[1])
