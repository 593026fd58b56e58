"""Checksums of run checkpoints (checkpoint/integrity.py) and the fallback to the newest intact one
(RunCheckpointer.resume_point): flipped bytes, truncated, emptied and missing files, a garbled
`latest`, and a full disk as torch's zip writer reports it."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_oreal.checkpoint.diskfull import is_disk_full
from megatron_oreal.checkpoint.integrity import MANIFEST, hash_file, verify, write_manifest
from megatron_oreal.checkpoint.resume import CheckpointError, RunCheckpointer


def writer(value):
    def write(path):
        path.mkdir(parents=True)
        torch.save({"w": torch.full((4096,), float(value))}, path / "w.pt")

    return write


def reader(out):
    def read(path):
        out.update(torch.load(path / "w.pt"))

    return read


def three_checkpoints(tmp_path, keep=3):
    ck = RunCheckpointer(tmp_path, keep=keep)
    for step in (1, 2, 3):
        ck.save(step, {"policy": writer(step)}, {})
    return ck, tmp_path / "checkpoints"


def flip(path, offset=100, n=16):
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file_with_its_hash(tmp_path):
    ck, root = three_checkpoints(tmp_path)
    manifest = json.loads((root / "step_000003" / MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["policy/w.pt", "rng/rank_00000.pt", "state.json"]
    f = root / "step_000003" / "policy" / "w.pt"
    assert manifest["files"]["policy/w.pt"] == dict(zip(("size", "sha256"), hash_file(f)))
    assert verify(root / "step_000003") == []


def test_split_over_ranks_gives_the_same_manifest(tmp_path):
    """Two 'ranks' hash alternate files; the gathered manifest equals a single rank's."""
    ck, root = three_checkpoints(tmp_path)
    path = root / "step_000003"
    single = write_manifest(path)
    parts = {}

    def gather_from(rank):
        def all_gather(obj):
            parts[rank] = obj
            return [parts.get(0, {}), parts.get(1, {})]
        return all_gather

    write_manifest(path, rank=1, world=2, all_gather=gather_from(1))
    two = write_manifest(path, rank=0, world=2, all_gather=gather_from(0))
    assert two == single and len(parts[0]) == 2 and len(parts[1]) == 1


@pytest.mark.parametrize("damage,why", [
    (lambda f: flip(f), "content changed: its SHA-256 differs"),
    (lambda f: f.write_bytes(f.read_bytes()[:1000]), "truncated: 1000 bytes"),
    (lambda f: f.write_bytes(b""), "empty: 0 bytes"),
    (lambda f: f.unlink(), "missing"),
])
def test_damaged_latest_falls_back_to_the_newest_intact(tmp_path, damage, why):
    ck, root = three_checkpoints(tmp_path)
    damage(root / "step_000003" / "policy" / "w.pt")
    lines = []
    path = ck.resume_point(log=lines.append)
    assert path.name == "step_000002"
    assert lines[0].startswith("warning: checkpoint step_000003 is damaged: ")
    assert f"step_000003/policy/w.pt: {why}" in lines[0]
    assert lines[1] == ("resuming from step_000002, the newest intact checkpoint "
                        "(step_000003 renamed step_000003.damaged)")
    assert (root / "latest").read_text() == "step_000002\n"
    assert (root / "step_000003.damaged" / "policy" / "w.pt").exists() or why == "missing"
    got = {}
    ck.load(path, {"policy": reader(got)})
    assert torch.equal(got["w"], torch.full((4096,), 2.0))


def test_a_step_damaged_twice_keeps_both_copies(tmp_path):
    ck, root = three_checkpoints(tmp_path)
    flip(root / "step_000003" / "policy" / "w.pt")
    assert ck.resume_point(log=lambda m: None).name == "step_000002"
    ck.save(3, {"policy": writer(3)}, {})  # the re-run step 3
    (root / "step_000003" / "state.json").write_text("")
    lines = []
    assert ck.resume_point(log=lines.append).name == "step_000002"
    assert lines[-1].endswith("(step_000003 renamed step_000003.damaged2)")
    assert (root / "step_000003.damaged").is_dir() and (root / "step_000003.damaged2").is_dir()


def test_no_intact_checkpoint_stops_and_changes_nothing(tmp_path):
    ck, root = three_checkpoints(tmp_path, keep=2)
    flip(root / "step_000003" / "policy" / "w.pt")
    (root / "step_000002" / "state.json").write_text("")
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(CheckpointError) as err:
        ck.resume_point(log=lambda m: None)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"no intact checkpoint in {root}: ")
    assert "step_000003/policy/w.pt: content changed" in msg and "step_000002/state.json: empty" in msg
    assert sorted(p.name for p in root.iterdir()) == before  # a rerun stops the same way, never starts over


def test_emptied_latest_pointer_uses_the_newest_complete(tmp_path):
    ck, root = three_checkpoints(tmp_path)
    (root / "latest").write_text("")
    lines = []
    assert ck.resume_point(log=lines.append).name == "step_000003"
    assert lines == [f"{root / 'latest'} is empty or unreadable; resuming from step_000003, the newest intact checkpoint"]


def test_latest_naming_a_vanished_checkpoint_refuses_to_start_over(tmp_path):
    ck = RunCheckpointer(tmp_path, keep=2)
    ck.save(1, {"policy": writer(1)}, {})
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "step_000001")
    with pytest.raises(CheckpointError, match="refusing to start over"):
        ck.resume_point(log=lambda m: None)


def test_fresh_run_has_no_resume_point(tmp_path):
    assert RunCheckpointer(tmp_path).resume_point(log=lambda m: None) is None


def test_truncated_rng_and_state_are_one_line(tmp_path):
    ck, root = three_checkpoints(tmp_path)
    rng = root / "step_000003" / "rng" / "rank_00000.pt"
    rng.write_bytes(rng.read_bytes()[:50])
    with pytest.raises(CheckpointError) as err:
        ck.load(root / "step_000003", {"policy": reader({})})
    assert str(err.value).startswith(f"{rng}: cannot read RNG state: ") and "\n" not in str(err.value)


def test_zip_writer_full_disk_is_named(tmp_path, monkeypatch):
    """torch.save on a full disk says `unexpected pos`, with no errno: the free space decides."""
    import megatron_oreal.checkpoint.diskfull as df

    exc = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    end = RuntimeError("basic_ios::clear: iostream error")  # the end of the archive failing
    monkeypatch.setattr(df, "_nearly_full", lambda p: True)
    assert is_disk_full(exc, tmp_path) and is_disk_full(end, tmp_path)
    monkeypatch.setattr(df, "_nearly_full", lambda p: False)
    assert not is_disk_full(exc, tmp_path)  # plenty of space: some other write failure, not called a full disk
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))

    ck = RunCheckpointer(tmp_path, keep=2)
    ck.save(1, {"policy": writer(1)}, {})

    def zip_full(path):
        path.mkdir(parents=True)
        raise exc

    with pytest.raises(CheckpointError) as err:  # not full: still one line, not a traceback
        ck.save(2, {"policy": zip_full}, {})
    assert str(err.value).startswith(f"saving checkpoint {tmp_path / 'checkpoints' / 'step_000002'} failed: write "
                                     "failed under ")
    monkeypatch.setattr(df, "_nearly_full", lambda p: True)
    monkeypatch.setattr(df, "free_bytes", lambda p: 4096)
    with pytest.raises(CheckpointError) as err:
        ck.save(2, {"policy": zip_full}, {})
    msg = str(err.value)
    assert msg.startswith(f"saving checkpoint {tmp_path / 'checkpoints' / 'step_000002'} failed: no space left on "
                          f"device writing {tmp_path / 'checkpoints' / '.tmp_step_000002'} (4 KiB free)")
    assert msg.endswith("`latest` still points at 'step_000001', which is intact")


def test_convert_refuses_a_damaged_run_checkpoint(tmp_path):
    """`convert mcore-to-hf --ckpt RUN_DIR/checkpoints/step_N/policy` checks the step's manifest first."""
    from types import SimpleNamespace

    from megatron_oreal.checkpoint.convert import _damage

    ck, root = three_checkpoints(tmp_path)
    layout = SimpleNamespace(rank=0, world_size=1)
    assert _damage(str(root / "step_000003" / "policy"), layout) is None
    assert _damage(str(tmp_path), layout) is None  # not a run checkpoint: nothing to check
    flip(root / "step_000003" / "policy" / "w.pt")
    assert _damage(str(root / "step_000003" / "policy"), layout) == (
        f"{root / 'step_000003'}: damaged checkpoint, not exported: "
        f"{root / 'step_000003' / 'policy' / 'w.pt'}: content changed: its SHA-256 differs from the manifest's")
