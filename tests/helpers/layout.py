"""A world-of-one Megatron parallel state for in-process tests (gloo, TP=1, PP=1), torn down after."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def single_rank_layout(seed: int):
    from megatron_oreal.mcore.parallel import destroy_parallel, init_parallel

    layout = init_parallel(1, 1, seed=seed)
    try:
        yield layout
    finally:
        destroy_parallel()
