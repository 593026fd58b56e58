"""Worker for tests/unit/launch/test_launch_signals.py (run as a subprocess or under torchrun).

single MODE (no torch): stages of --stage-seconds; prints "stage N start" before each; on a signal
the current stage finishes, DIR/state.json is written and the process exits EXIT_PREEMPTED. A rerun
resumes from state.json.

dist MODE (torchrun, gloo): rank 1 signals itself (SIGUSR1) in the middle of stage 2; every rank
must stop after stage 2; prints one JSON line per rank and exits 0 (torchrun would turn a non-zero
exit into its own failure code).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from megatron_oreal.launch.signals import PreemptionHandler, finish_preemption


def _stage(seconds: float, on_half=None) -> float:
    t0 = time.monotonic()
    half_done = False
    while time.monotonic() - t0 < seconds:
        time.sleep(0.02)
        if on_half and not half_done and time.monotonic() - t0 >= seconds / 2:
            half_done = True
            on_half()
    return time.monotonic() - t0


def single(args) -> int:
    state_file = Path(args.dir) / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"step": 0, "stages": []}
    with PreemptionHandler() as preempt:
        while state["step"] < args.steps:
            print(f"stage {state['step'] + 1} start", flush=True)
            took = _stage(args.stage_seconds)
            state["step"] += 1
            state["stages"].append(round(took, 3))
            if preempt.requested:
                state["signal"] = preempt.signal_name
                state_file.write_text(json.dumps(state))
                return finish_preemption(True, None, environ={})
    state["signal"] = None
    state_file.write_text(json.dumps(state))
    return 0


def dist(args) -> int:
    from datetime import timedelta

    import torch.distributed as torch_dist
    from helpers.say import say

    from megatron_oreal.launch.env import dist_env

    env = dist_env()
    torch_dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=60))
    me = os.getpid()
    with PreemptionHandler() as preempt:
        step = 0
        while step < args.steps:
            step += 1
            hit = (lambda: os.kill(me, signal.SIGUSR1)) if (env.rank == 1 and step == 2) else None
            _stage(args.stage_seconds, on_half=hit)
            if preempt.should_stop():
                break
        code = finish_preemption(env.rank == 0, torch_dist.barrier, environ={}) if preempt.should_stop() else 0
        line = {"rank": env.rank, "stop_step": step, "requested": preempt.requested,
                "signal": preempt.signal_name, "code": code}  # fmt: skip
    say(json.dumps(line))  # one write: the two ranks share torchrun's stdout
    torch_dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["single", "dist"])
    ap.add_argument("--dir", default=".")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--stage-seconds", type=float, default=0.5)
    a = ap.parse_args()
    sys.exit(single(a) if a.mode == "single" else dist(a))
