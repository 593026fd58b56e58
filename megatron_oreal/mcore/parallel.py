"""Process groups and the parallel layout: the one place that reads Megatron's global parallel state.

`init_parallel(tp, pp)` starts torch.distributed from the launcher's environment (torchrun, Slurm,
or a plain `python` world of one), builds Megatron's TP/PP/DP groups and seeds its RNG tracker.
Everything else receives a frozen `Layout` and the group accessors below, so no other package
imports `megatron.core.parallel_state` (docs/design.md, layout rule: "Only mcore/ reads Megatron's global
parallel state").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megatron_oreal.launch.env import dist_env
from megatron_oreal.mcore.cpu_shims import apply_cpu_shims


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    rank: int
    world_size: int
    device: str  # "cpu" or "cuda:<local_rank>"

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the rank that logs and writes files."""
        return self.rank == 0

    @property
    def model_parallel_rank(self) -> int:
        """Rank inside this DP replica's model-parallel (TP x PP) group."""
        return self.pp_rank * self.tp + self.tp_rank


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(tp: int = 1, pp: int = 1, *, seed: int = 1234, timeout_minutes: int = 30) -> Layout:
    """Initialise torch.distributed and Megatron's model-parallel state; return the Layout.

    Gloo without CUDA, NCCL with it. Idempotent for the same (tp, pp): a second call returns the
    current layout (a different one is an error: call destroy_parallel() first).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    apply_cpu_shims()
    if tp < 1 or pp < 1:
        raise ValueError(f"parallel sizes must be >= 1, got tensor={tp} pipeline={pp}")
    env = dist_env()
    if env.world_size % (tp * pp):
        raise ValueError(
            f"world size {env.world_size} is not divisible by tensor x pipeline = {tp} x {pp} = {tp * pp}"
        )
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(env.local_rank)
        # The rendezvous address goes in the init URL, not into os.environ: a single-process run picks a
        # free port, and leaving it in MASTER_PORT would hand it to every child this process starts
        # (a torchrun, the convert CLI) while this process's store may still hold it.
        addr = os.environ.get("MASTER_ADDR") or env.master_addr
        port = os.environ.get("MASTER_PORT") or env.master_port or (_free_port() if env.world_size == 1 else 29500)
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            init_method=f"tcp://{addr}:{port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    if ps.model_parallel_is_initialized():
        layout = current_layout()
        if (layout.tp, layout.pp) != (tp, pp):
            raise RuntimeError(
                f"parallel state already initialised with tensor={layout.tp} pipeline={layout.pp}; "
                f"asked for tensor={tp} pipeline={pp} (call destroy_parallel() first)"
            )
        return layout
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        distributed_timeout_minutes=timeout_minutes,
    )
    model_parallel_cuda_manual_seed(seed)
    _make_host_groups()
    return current_layout()


# Gloo (CPU) twins of the world and of the model-parallel groups, for the waits of the ranks that do
# not run an engine: during rollout and evaluation they block in an object broadcast / flag reduce
# until the engine rank is done. On NCCL that wait is a kernel spinning on a GPU that SGLang is
# using (and NCCL's own timeout watchdog counts it); on gloo it is a thread blocked on a socket.
_HOST_GROUPS: dict[str, Any] = {}


def _make_host_groups() -> None:
    """Collective over the world: every rank creates every group in the same order (dist.new_group)."""
    from megatron.core import parallel_state as ps

    _HOST_GROUPS.clear()
    world = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    _HOST_GROUPS["world"] = world
    for name, megatron_group in (("model_parallel", ps.get_model_parallel_group()),
                                 ("tensor_parallel", ps.get_tensor_model_parallel_group())):
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, dist.get_process_group_ranks(megatron_group), group=world)
        for ranks in sorted({tuple(r) for r in every}):
            group = dist.new_group(list(ranks), backend="gloo")
            if dist.get_rank() in ranks:
                _HOST_GROUPS[name] = group


def current_layout() -> Layout:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("parallel state is not initialised: call init_parallel() first")
    cuda = torch.cuda.is_available()
    return Layout(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        device=f"cuda:{torch.cuda.current_device()}" if cuda else "cpu",
    )


def destroy_parallel(keep_process_group: bool = False) -> None:
    """Tear down Megatron's groups and (unless keep_process_group, e.g. to re-initialise at another
    TP/PP in the same job) the default process group. Safe to call twice."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    _HOST_GROUPS.clear()
    if dist.is_initialized() and not keep_process_group:
        dist.destroy_process_group()


# Group accessors: the only handles to Megatron's groups that code outside mcore/ should use.
def tp_group(gloo: bool = False):
    """This rank's tensor-parallel group (gloo=True: its CPU twin, e.g. for the weight sync's gathers)."""
    from megatron.core import parallel_state as ps

    return _host_group("tensor_parallel") if gloo else ps.get_tensor_model_parallel_group()


def pp_group():
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_group()


def dp_group(gloo: bool = False):
    """Data-parallel group (gloo=True: Megatron's CPU-side gloo twin, for object collectives)."""
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group_gloo() if gloo else ps.get_data_parallel_group()


def model_parallel_group(gloo: bool = False):
    """This rank's model-parallel group (TP x PP of one replica); gloo=True: its CPU twin."""
    from megatron.core import parallel_state as ps

    if gloo:
        return _host_group("model_parallel")
    return ps.get_model_parallel_group()


def world_group(gloo: bool = False):
    """Every rank (gloo=True: a gloo group, the default group itself on a CPU-only job)."""
    return _host_group("world") if gloo else dist.group.WORLD


def _host_group(name: str):
    if name not in _HOST_GROUPS:
        raise RuntimeError("the gloo twin groups are made by init_parallel(); call it first")
    return _HOST_GROUPS[name]


def embedding_group():
    """First + last PP stage ranks holding the tied word embeddings (their grads must be summed)."""
    from megatron.core import parallel_state as ps

    return ps.get_embedding_group() if ps.is_rank_in_embedding_group() else None


def tp_ranks() -> list[int]:
    """Global ranks of this rank's TP group, in TP-rank order."""
    return dist.get_process_group_ranks(tp_group())


def pp_ranks() -> list[int]:
    """Global ranks of this rank's PP group, in stage order."""
    return dist.get_process_group_ranks(pp_group())


def dp_ranks() -> list[int]:
    return dist.get_process_group_ranks(dp_group())
