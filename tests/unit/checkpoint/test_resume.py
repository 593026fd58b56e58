import errno
import random

import pytest
import torch

from megatron_oreal.checkpoint.resume import CheckpointError, RunCheckpointer


def tensor_writer(value):
    def write(path):
        path.mkdir(parents=True)
        torch.save({"w": torch.full((3,), float(value))}, path / "w.pt")

    return write


def tensor_reader(out):
    def read(path):
        out.update(torch.load(path / "w.pt"))

    return read


def test_save_load_roundtrip_restores_state_and_rng(tmp_path):
    ck = RunCheckpointer(tmp_path, keep=2)
    random.seed(7)
    torch.manual_seed(7)
    ck.save(3, {"policy": tensor_writer(1.5)}, {"cursor": {"epoch": 0, "index": 12}})
    expected_py, expected_torch = random.random(), torch.rand(2)
    random.random(), torch.rand(5)  # move the RNGs on
    got = {}
    state = ck.load(ck.latest(), {"policy": tensor_reader(got)})
    assert state == {"step": 3, "cursor": {"epoch": 0, "index": 12}}
    assert torch.equal(got["w"], torch.full((3,), 1.5))
    assert random.random() == expected_py and torch.equal(torch.rand(2), expected_torch)


def test_latest_pointer_and_pruning(tmp_path):
    ck = RunCheckpointer(tmp_path, keep=2)
    for step in (10, 20, 30):
        ck.save(step, {"policy": tensor_writer(step)}, {})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000020", "step_000030"]
    assert ck.latest().name == "step_000030"


def test_full_disk_keeps_previous_checkpoint(tmp_path):
    ck = RunCheckpointer(tmp_path, keep=3)
    ck.save(10, {"policy": tensor_writer(10)}, {})

    def full_disk(path):
        path.mkdir(parents=True)
        (path / "partial").write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match=r"step_000020 failed.*No space left.*latest.*step_000010"):
        ck.save(20, {"policy": full_disk}, {})
    assert ck.latest().name == "step_000010"
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    got = {}
    ck.load(ck.latest(), {"policy": tensor_reader(got)})
    assert torch.equal(got["w"], torch.full((3,), 10.0))


def test_interrupted_save_leaves_latest_and_is_cleaned(tmp_path):
    ck = RunCheckpointer(tmp_path)
    ck.save(1, {"policy": tensor_writer(1)}, {})
    stale = tmp_path / "checkpoints" / ".tmp_step_000002"  # what a kill -9 mid-save leaves
    (stale / "policy").mkdir(parents=True)
    assert ck.latest().name == "step_000001"
    ck.save(2, {"policy": tensor_writer(2)}, {})
    assert not stale.exists() and ck.latest().name == "step_000002"


def test_load_errors_name_the_part(tmp_path):
    ck = RunCheckpointer(tmp_path)
    assert ck.latest() is None
    path = ck.save(5, {"policy": tensor_writer(5)}, {})
    with pytest.raises(CheckpointError, match=r"has no 'token_rm'"):
        ck.load(path, {"token_rm": tensor_reader({})})

    def broken(_):
        raise KeyError("decoder.layers.0.weight")

    with pytest.raises(CheckpointError, match=r"policy: cannot load policy: 'decoder.layers.0.weight'"):
        ck.load(path, {"policy": broken})
    (path / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        ck.latest()
