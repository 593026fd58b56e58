"""The planner's memory terms against the real Megatron objects (one torchrun launch, 2 ranks, DP=2).

Parameter counts (policy, and the token RM with its h->1 head), fp32 gradient buffers (4 B/param)
and the distributed optimizer's fp32 master + Adam m, v (12 B/param, split over DP) are measured on
the project's own builders (mcore/model.py, mcore/optim.py) and compared with estimate.py.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from helpers.torchrun import pythonpath
from megatron_oreal.observability.estimate import Workload, memory_table, stage_params
from megatron_oreal.observability.flops import arch_from_hf_config, gpu_by_name

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
pytestmark = pytest.mark.slow


def run_torchrun(script: str, nproc: int, timeout: float) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port), script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath(REPO)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{script} timed out after {timeout}s: {str(exc.stderr)[-3000:]}") from None
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-6000:]}"
    return proc.stdout


def test_memory_terms_match_megatron_objects():
    out = run_torchrun(os.path.join(HERE, "memory_worker.py"), 2, timeout=300)
    m = json.loads(out.strip().splitlines()[-1])
    print(m)
    arch = arch_from_hf_config(m["hf"])
    p = arch.params()
    assert m["params"] == p
    assert m["rm_params"] == stage_params(arch, 1, vocab_head=False)
    # The grad buffer is padded for bucketing; the planner's 4 B/param is the unpadded size.
    assert 4 * p <= m["grad_buffer_bytes"] <= 4 * p * 1.05
    assert m["optimizer_bytes_sum"] == 12 * p  # fp32 master + m + v, every parameter exactly once
    w = Workload(arch, gpu_by_name("h100-80g"), 2, distributed_optimizer=True, trained_models=1)
    planned = memory_table(w)["components"]["policy optimizer"]
    assert planned == 12 * p / 2
    assert m["optimizer_bytes_max_rank"] == pytest.approx(planned, rel=0.1)  # shards are bucket-aligned
