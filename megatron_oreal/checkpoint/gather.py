"""Streaming gather of a TP/PP-sharded model into full HF tensors, bucket by bucket.

Used by HF export now and by weight sync (sync/) later. Called collectively by every rank:

    for bucket in iter_hf_tensors(model, layout, bucket_bytes=512 << 20):
        ...   # bucket: list[(hf_name, tensor)]; tensors are None except on destination ranks

Every rank yields the same buckets with the same names in the same order (the plan is computed
from config.json alone), so callers may run their own collectives per bucket. Per tensor: the owning
PP stage all-gathers its TP shards (over the TP group), converts them to HF layout (mapping.py:
QKV de-interleave, gate/up split, vocab padding stripped) and its TP-rank-0 sends the result to the
destination, the first rank (tp 0, pp 0) of the model-parallel group of each DP replica
(`replicas="all"`) or of DP replica 0 only (`replicas="first"`, e.g. export). Peak extra memory on
the destination is about one bucket.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_oreal.checkpoint.mapping import all_entries, hf_from_shards, hf_shape, uses_te_names

Bucket = list[tuple[str, "torch.Tensor | None"]]


def _plan(spec, pp, te_names, token_rm, elem_bytes, bucket_bytes):
    """[(stage, entry)] grouped into buckets of <= bucket_bytes of HF tensors (one oversized tensor
    is a bucket of its own). Identical on every rank."""
    buckets, cur, cur_bytes = [], [], 0
    for stage, entries in enumerate(all_entries(spec, pp, te_names=te_names, token_rm=token_rm)):
        for e in entries:
            if not e.export:
                continue
            nb = sum(torch.Size(hf_shape(spec, h)).numel() for h in e.hf) * elem_bytes
            if cur and cur_bytes + nb > bucket_bytes:
                buckets.append(cur)
                cur, cur_bytes = [], 0
            cur.append((stage, e))
            cur_bytes += nb
    if cur:
        buckets.append(cur)
    return buckets


def iter_hf_tensors(model, layout, *, bucket_bytes: int = 512 << 20, replicas: str = "all",
                    source: Callable[[torch.nn.Parameter], torch.Tensor] | None = None,
                    dtype: torch.dtype | None = None, every_tp_rank: bool = False,
                    every_stage: bool = False) -> Iterator[Bucket]:
    """Yield buckets of (hf_name, full tensor) on destination ranks ((name, None) elsewhere).

    Destinations: TP rank 0 of the first pipeline stage (of every replica, or of the first with
    replicas="first"); with every_tp_rank, every TP rank of the first stage (the TP all-gather already
    gives each its full tensors, and later stages send TP rank r's copy to TP rank r of stage 0), so
    each SGLang TP rank can read its payload from the trainer rank on its own GPU (runtime.sync_weights).
    every_stage: the destinations' counterparts on every pipeline stage too (each stage's tensors are
    broadcast over the pipeline group instead of sent to stage 0): engines on every stage
    (rollout.engines_on_every_stage) each hold the whole model.
    source: what to gather from each parameter (default its data; e.g. `lambda p: p.grad` gathers
    gradients in HF layout). dtype: cast the gathered tensors (default: keep the parameter dtype).
    """
    from megatron_oreal.mcore import parallel
    from megatron_oreal.mcore.model import unwrap

    if replicas not in ("all", "first"):
        raise ValueError(f"replicas must be 'all' or 'first', got {replicas!r}")
    m = unwrap(model)
    spec = m.arch
    params = dict(m.named_parameters())
    source = source or (lambda p: p.data)
    pdtype = next(iter(params.values())).dtype
    out_dtype = dtype or pdtype
    te_names = uses_te_names(m)
    token_rm = getattr(m, "is_token_rm", False)
    active = replicas == "all" or layout.dp_rank == 0
    tp_grp = parallel.tp_group()
    stage_ranks = parallel.pp_ranks()  # global ranks of my (tp_rank) pipeline, stage order
    gathers = layout.tp_rank == 0 or every_tp_rank  # builds full tensors from the TP shards
    is_dst = active and gathers and (layout.pp_rank == 0 or every_stage)
    pp_grp = parallel.pp_group() if every_stage and layout.pp > 1 else None
    dev = torch.device(layout.device)
    for plan in _plan(spec, layout.pp, te_names, token_rm, torch.empty(0, dtype=out_dtype).element_size(), bucket_bytes):
        bucket: Bucket = []
        for stage, e in plan:
            full: list[tuple[str, torch.Tensor]] | None = None
            if active and layout.pp_rank == stage:
                local = source(params[e.mcore])
                if local is None:
                    raise ValueError(f"iter_hf_tensors: source() returned None for parameter {e.mcore}")
                local = local.detach().to(out_dtype).contiguous()
                if layout.tp > 1:
                    shards = [torch.empty_like(local) for _ in range(layout.tp)]
                    dist.all_gather(shards, local, group=tp_grp)
                else:
                    shards = [local]
                if gathers:
                    full = hf_from_shards(e, spec, shards)
            if active and gathers and pp_grp is not None:
                # Stage `stage` -> every stage of the same pipeline (same TP rank), one broadcast each.
                if layout.pp_rank != stage:
                    full = [(h, torch.empty(hf_shape(spec, h), dtype=out_dtype, device=dev)) for h in e.hf]
                else:
                    full = [(h, t.contiguous()) for h, t in full]
                for _, t in full:
                    dist.broadcast(t, src=stage_ranks[stage], group=pp_grp)
            elif active and gathers and stage != 0:
                # Stage `stage` -> stage 0 of the same pipeline (the destination), point to point.
                if layout.pp_rank == stage:
                    for _, t in full:
                        dist.send(t.contiguous(), dst=stage_ranks[0])
                elif is_dst:
                    full = []
                    for h in e.hf:
                        t = torch.empty(hf_shape(spec, h), dtype=out_dtype, device=dev)
                        dist.recv(t, src=stage_ranks[stage])
                        full.append((h, t))
            if is_dst:
                bucket.extend(full)
            else:
                bucket.extend((h, None) for h in e.hf)
        yield bucket


def export_hf(model, layout, out_dir: str, hf_config: dict, *, hf_dir: str | None = None,
              max_shard_bytes: int = 5 << 30, dtype: torch.dtype | None = None, log=print) -> None:
    """Write the model as an HF folder that `AutoModelForCausalLM.from_pretrained` loads.

    Collective. Rank 0 writes into a temporary folder renamed at the end. dtype: default the
    config's `torch_dtype`/`dtype` (so a bf16 checkpoint exports as bf16), else the model's dtype.
    """
    from megatron_oreal.checkpoint.hf_io import ShardedWriter, atomic_dir, copy_hf_side_files

    dtype = dtype or _config_dtype(hf_config)
    t0, n = time.time(), 0
    if layout.rank == 0:
        with atomic_dir(out_dir) as tmp:
            writer = ShardedWriter(tmp, max_shard_bytes)
            for bucket in iter_hf_tensors(model, layout, bucket_bytes=max_shard_bytes, replicas="first", dtype=dtype):
                for name, t in bucket:
                    writer.add(name, t.cpu())
                    n += 1
            writer.close()
            copy_hf_side_files(hf_dir, tmp, hf_config)
            if log:
                log(f"exported {n} tensors ({writer.total / 1e6:.1f} MB, {len(writer.files)} shard(s)) "
                    f"to {out_dir} in {time.time() - t0:.1f}s")
    else:
        for _ in iter_hf_tensors(model, layout, bucket_bytes=max_shard_bytes, replicas="first", dtype=dtype):
            pass
    if dist.is_initialized():
        dist.barrier()


def _config_dtype(hf_config: dict) -> torch.dtype | None:
    name = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)
