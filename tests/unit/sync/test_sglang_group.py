"""Two ranks, one SGLang engine (fake server): group-collective generate, the IPC transport's
gather to the leader (each rank's own payload; leader-only payloads when the others hold None),
the first-sync weight check, and errors shared by the whole group. One torchrun launch checks all of it."""

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha(t):
    import torch

    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.slow
def test_two_rank_engine_group(tmp_path):
    import torch

    from megatron_oreal.rollout.sglang_engine import sample_seed

    worker = os.path.join(os.path.dirname(__file__), "sglang_group_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           worker, str(_free_port()), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))

    assert (r0["is_leader"], r1["is_leader"], r0["leader"], r1["leader"]) == (True, False, 0, 0)
    assert r0["health"] and r1["health"]
    # rank 0 asked for 1 prompt, rank 1 for 2; each got its own, seeded by its own positions
    expect = lambda i, j: [100 + (sample_seed(5, i, j) >> (8 * k)) % 50 for k in range(3)]
    assert r0["gen"] == [[expect(0, 0), expect(0, 1)]]
    assert r1["gen"] == [[expect(0, 0), expect(0, 1)], [expect(1, 0), expect(1, 1)]]

    log = [json.loads(line) for line in open(tmp_path / "requests.jsonl")]
    updates = [e for e in log if e["path"] == "/update_weights_from_tensor"]
    assert len(updates) == 2 and all(len(u["per_rank"]) == 2 for u in updates)
    up = "model.layers.0.mlp.up_proj.weight"
    assert [p[up][2] for p in updates[0]["per_rank"]] == [
        _sha(torch.full((4, 4), 1.0, dtype=torch.bfloat16)), _sha(torch.full((4, 4), 2.0, dtype=torch.bfloat16))]
    assert [p["model.norm.weight"][2] for p in updates[1]["per_rank"]] == [_sha(torch.arange(8.0))] * 2
    # one release before the first sync; each sync paused, flushed, continued
    paths = [e["path"] for e in log]
    assert paths.count("/release_memory_occupation") == 1 and paths.count("/pause_generation") == 2
    assert paths.count("/continue_generation") == 2
    # the first sync (only) is checked, and both ranks agree on it (no rank left in a collective)
    assert [e["action"] for e in log if e["path"] == "/weights_checker"] == ["snapshot", "reset_tensors", "compare"]

    for r in (r0, r1):
        assert "SGLang generate" in r["abort"] and "abort" in r["abort"], r["abort"]
        assert r["health_after"]
