"""Weight sync, trainer -> rollout engine (docs/design.md decision 5; the iterator + transport
split of slime's slime/backends/megatron_utils/update_weight/ and NeMo-RL's nemo_rl/weight_sync/).

`sync_weights(source, transport, fp8=...)` streams HF-named tensors from `source` (a plain
`dict.items()`, or the checkpoint layer's gather that yields ready buckets: PP broadcast -> TP
all-gather -> HF names), optionally block-quantises Linear weights to FP8, and hands each bucket to
a transport (in-process for the CPU engine, CUDA IPC for a co-located SGLang engine). Only one
bucket is alive at a time, so peak extra memory is about one bucket (twice that while it is
flattened), not the model.
"""

from __future__ import annotations

import time
from typing import Iterable

from megatron_oreal.sync.buckets import FlatBucket, flatten, nbytes_of, rebucket, unflatten
from megatron_oreal.sync.fp8 import dequantize_block_fp8, quantize_block_fp8, quantize_named
from megatron_oreal.sync.metrics import SyncMetrics, WeightDigests
from megatron_oreal.sync.transport import InProcessTransport, SGLangIPCTransport, Transport

DEFAULT_BUCKET_BYTES = 512 << 20  # rollout.sync_bucket_mb's default; slime's 512 MB buckets (§2.1)


def sync_weights(
    source: Iterable,
    transport: Transport,
    *,
    fp8: bool = False,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    check: bool = False,
) -> SyncMetrics:
    """Send every tensor of `source` through `transport`; return what it cost.

    `check=True` (config `rollout.check_weights_after_first_sync`, meant for the first sync only)
    reads the engine's weights back afterwards and records mismatching names in
    `metrics.mismatches`; it raises if any differ, because training on with a silently wrong
    sampler would waste the run.
    """
    metrics = SyncMetrics(checked=check)
    digests = WeightDigests() if check else None
    start = time.perf_counter()
    transport.begin(check=check)
    buckets = iter(rebucket(source, bucket_bytes))
    while True:
        t0 = time.perf_counter()
        bucket = next(buckets, None)
        metrics.source_seconds += time.perf_counter() - t0
        if bucket is None:
            break
        if any(t is None for _, t in bucket):
            # Not a destination of the gather (checkpoint/gather.py fills one rank per replica): the
            # transport still takes part in its per-bucket collectives, with nothing of its own.
            transport.send(bucket)
            continue
        metrics.source_bytes += nbytes_of(bucket)
        if fp8:
            t0 = time.perf_counter()
            bucket = quantize_named(bucket)
            metrics.quantize_seconds += time.perf_counter() - t0
        if digests is not None:
            digests.add(bucket)
        t0 = time.perf_counter()
        metrics.buckets += transport.send(bucket)
        metrics.send_seconds += time.perf_counter() - t0
        metrics.bytes += nbytes_of(bucket)
        metrics.tensors += len(bucket)
        del bucket  # drop our reference before pulling the next bucket from the source
    transport.end()
    metrics.seconds = time.perf_counter() - start
    if digests is not None:
        metrics.mismatches = transport.verify(digests)
        if metrics.mismatches:
            shown = ", ".join(metrics.mismatches[:5])
            raise RuntimeError(
                f"weight check after sync: {len(metrics.mismatches)} tensor(s) differ in the engine: {shown}"
            )
    return metrics


__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "FlatBucket",
    "InProcessTransport",
    "SGLangIPCTransport",
    "SyncMetrics",
    "Transport",
    "WeightDigests",
    "dequantize_block_fp8",
    "flatten",
    "quantize_block_fp8",
    "quantize_named",
    "rebucket",
    "sync_weights",
    "unflatten",
]
