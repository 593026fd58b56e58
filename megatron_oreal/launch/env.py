"""Who am I in the job: rank, world size and rendezvous from torchrun or Slurm variables.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under `srun` (one task per GPU,
no torchrun) only SLURM_* are set: the rendezvous host is the first node of SLURM_JOB_NODELIST
(the sbatch scripts export MASTER_ADDR from `scontrol show hostnames`, which is authoritative)
and the port is derived from the job id so concurrent jobs on a node do not collide.
A plain `python` process is a world of one.

torchrun under srun (one torchrun per node) sets both: torchrun's variables win, because they
describe the worker processes while SLURM_PROCID describes the per-node launcher.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | single
    local_world_size: int = 1  # processes on this node (one per GPU)
    node_rank: int = 0
    num_nodes: int = 1


def slurm_port(job_id: int) -> int:
    """Rendezvous port of a Slurm job: 20000 + job_id % 20000 (examples/slurm/common.sh uses the same rule).

    Derived from the job id so two jobs sharing a node do not collide; a requeued job keeps its id
    and so its port.
    """
    return 20000 + job_id % 20000


# One item of a hostlist: a prefix, then alternating [ranges] and literal text: "rack[1-2]-gpu[03,05]".
_BRACKET = re.compile(r"\[([^\]]*)\]")


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    """'03-05,07' -> ['03', '04', '05', '07'], keeping zero padding as Slurm does."""
    out = []
    for part in ranges.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"SLURM nodelist {nodelist!r}: bad range {part!r}")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"SLURM nodelist {nodelist!r}: descending range {part!r}")
        width = len(lo)
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def _split_top_level(nodelist: str) -> list[str]:
    """Split on commas outside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"SLURM nodelist {nodelist!r}: unbalanced ']'")
        elif ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"SLURM nodelist {nodelist!r}: unbalanced '['")
    items.append(nodelist[start:])
    return [item.strip() for item in items if item.strip()]


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm hostlist -> hostnames, in order: 'gpu[03-05,07],cpu1' -> [gpu03, gpu04, gpu05, gpu07, cpu1].

    The same expansion as `scontrol show hostnames` for the forms Slurm prints (several bracket
    groups in one name expand as a product, e.g. 'r[1-2]-n[1-2]' -> r1-n1, r1-n2, r2-n1, r2-n2).
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        pieces = _BRACKET.split(item)  # literal, ranges, literal, ranges, ..., literal
        choices = [[p] if i % 2 == 0 else _expand_ranges(p, nodelist) for i, p in enumerate(pieces)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def _first_host(nodelist: str) -> str:
    """First hostname of a Slurm nodelist: 'gpu[03-05,07],cpu1' -> 'gpu03'."""
    hosts = expand_nodelist(nodelist) if nodelist.strip() else []
    return hosts[0] if hosts else "127.0.0.1"


def parse_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"SLURM_TASKS_PER_NODE={spec!r}: cannot parse {part!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"environment variable {name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _checked(env: DistEnv, source: str) -> DistEnv:
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise ValueError(f"{source}: rank {env.rank} is outside world size {env.world_size}")
    if not 0 <= env.local_rank < max(env.local_world_size, 1):
        raise ValueError(f"{source}: local rank {env.local_rank} is outside {env.local_world_size} per node")
    return env


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        return _checked(
            DistEnv(
                rank=_int(env, "RANK"),
                world_size=world,
                local_rank=_int(env, "LOCAL_RANK", 0),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=_int(env, "MASTER_PORT", 29500),
                launcher="torchrun",
                local_world_size=local_world,
                node_rank=_int(env, "GROUP_RANK", 0),
                num_nodes=max(world // max(local_world, 1), 1),
            ),
            "torchrun variables (RANK/WORLD_SIZE/LOCAL_RANK)",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        node_rank = _int(env, "SLURM_NODEID", 0)
        per_node_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
        per_node = parse_tasks_per_node(per_node_spec) if per_node_spec else []
        world = _int(env, "SLURM_NTASKS")
        num_nodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", 1))
        # Without a tasks-per-node spec assume an even spread (what `--ntasks-per-node` gives).
        local_world = per_node[node_rank] if node_rank < len(per_node) else -(-world // max(num_nodes, 1))
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        return _checked(
            DistEnv(
                rank=_int(env, "SLURM_PROCID"),
                world_size=world,
                local_rank=_int(env, "SLURM_LOCALID", 0),
                master_addr=env.get("MASTER_ADDR") or _first_host(nodelist),
                master_port=_int(env, "MASTER_PORT", slurm_port(_int(env, "SLURM_JOB_ID", 0))),
                launcher="slurm",
                local_world_size=local_world,
                node_rank=node_rank,
                num_nodes=num_nodes,
            ),
            "Slurm variables (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID)",
        )
    return DistEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", 0), "single")
