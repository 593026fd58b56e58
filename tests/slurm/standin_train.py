"""Stand-in for `python -m megatron_oreal train` in the fast Slurm tests (exact, quick checks).

It does what the trainer does at the launch level, with the real library pieces: rank and
rendezvous from `launch.env.dist_env()`, a gloo process group, one all-reduce per "step", a
`PreemptionHandler` polled between steps, a resumable state file (written atomically by rank 0),
and on a preemption signal: save, `finish_preemption()` (requeue + EXIT_PREEMPTED).

    python tests/slurm/standin_train.py --state-dir DIR --steps N [--step-seconds S]

DIR/state.json holds the step cursor and the history of runs; DIR/result.json is written at the
end; DIR/progress holds the last finished step (the test waits on it before signalling).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_oreal.launch.env import dist_env
from megatron_oreal.launch.signals import EXIT_PREEMPTED, PreemptionHandler, finish_preemption


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous state


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--step-seconds", type=float, default=0.2)
    args = ap.parse_args(argv)
    out = Path(args.state_dir)
    env = dist_env()
    with PreemptionHandler() as preempt:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=120),
        )
        state_file = out / "state.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {"step": 0, "total": 0, "runs": []}
        run = {
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "start_step": state["step"],
            "launcher": env.launcher,
            "world_size": env.world_size,
        }
        # Every rank reports who it is, so the test can check ranks, local ranks and hosts.
        me = [env.rank, env.local_rank, env.local_world_size, socket.gethostname(), env.master_addr, env.master_port]
        everyone: list = [None] * env.world_size
        dist.all_gather_object(everyone, me)
        step = state["step"]
        while step < args.steps:
            t_end = time.monotonic() + args.step_seconds
            while time.monotonic() < t_end:  # the "stage": a signal here must not cut it short
                time.sleep(0.05)
            x = torch.tensor([float(env.rank + 1)])
            dist.all_reduce(x)
            state["total"] += int(x.item())
            step += 1
            state["step"] = step
            if env.rank == 0:
                (out / "progress").write_text(str(step))
            if preempt.should_stop():
                run.update(stop_step=step, signal=preempt.signal_name, exit_code=EXIT_PREEMPTED)
                if env.rank == 0:
                    state["runs"].append(run)
                    _write_json(state_file, state)
                code = finish_preemption(env.rank == 0, dist.barrier)
                dist.destroy_process_group()
                return code
        run.update(stop_step=step, signal=None, exit_code=0)
        if env.rank == 0:
            state["runs"].append(run)
            _write_json(state_file, state)
            _write_json(out / "result.json", {"state": state, "ranks": everyone, "allreduce_sum": int(x.item())})
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
