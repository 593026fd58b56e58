"""A REAL full filesystem (a small tmpfs; skipped where mounting is not allowed): the shapes a full
disk takes in each writer, and the one-line messages built from them."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file

from megatron_oreal.checkpoint.diskfull import is_disk_full
from megatron_oreal.checkpoint.resume import CheckpointError, RunCheckpointer
from helpers.tmpfs import fill, mounted_tmpfs


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 KiB tmpfs mounted at tmp_path/fs."""
    with mounted_tmpfs(tmp_path / "fs", "256k") as mnt:
        yield mnt


def error_of(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - what each writer raises is the point
        return exc
    raise AssertionError("no error on a full disk")


def test_each_writer_on_a_full_disk_is_recognised(tiny_fs):
    fill(tiny_fs, leave=8192)
    big = torch.zeros(64 * 1024)
    zip_err = error_of(lambda: torch.save({"w": big}, tiny_fs / "a.pt"))
    assert isinstance(zip_err, RuntimeError) and "unexpected pos" in str(zip_err)  # no errno, no words
    assert is_disk_full(zip_err, tiny_fs)
    st_err = error_of(lambda: save_file({"w": big}, str(tiny_fs / "a.safetensors")))
    assert "No space left on device" in str(st_err) and is_disk_full(st_err)
    py_err = error_of(lambda: (tiny_fs / "steps.jsonl").write_text("x" * 100_000))
    assert is_disk_full(py_err)
    from megatron_oreal.observability.tb import MetricsWriter

    def tb():
        w = MetricsWriter(tiny_fs / "tb")
        for i in range(5000):
            w.write(i, {"loss": 1.0})
        w.flush()

    assert is_disk_full(error_of(tb))
    assert not is_disk_full(RuntimeError("unexpected pos 1 vs 0"), tiny_fs.parent)  # the parent fs has room


def test_checkpoint_save_on_a_full_disk_names_it_and_keeps_latest(tiny_fs):
    def writer(n):
        def write(path):
            path.mkdir(parents=True)
            torch.save({"w": torch.zeros(n)}, path / "w.pt")
        return write

    ck = RunCheckpointer(tiny_fs, keep=2)
    ck.save(1, {"policy": writer(1000)}, {})
    fill(tiny_fs, leave=16384)
    with pytest.raises(CheckpointError) as err:
        ck.save(2, {"policy": writer(64 * 1024)}, {})
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"saving checkpoint {tiny_fs / 'checkpoints' / 'step_000002'} failed: no space left on "
                          f"device writing {tiny_fs / 'checkpoints' / '.tmp_step_000002'} (")
    assert msg.endswith("`latest` still points at 'step_000001', which is intact")
    assert ck.resume_point(log=lambda m: None).name == "step_000001"  # intact: its checksums match
    assert not (tiny_fs / "checkpoints" / ".tmp_step_000002").exists()


def test_cli_line_for_a_full_disk_outside_a_save(tiny_fs):
    """train.main's line for steps.jsonl / eval files / TensorBoard: the path, what is intact."""
    from megatron_oreal.train import _disk_full_line

    def writer(path):
        path.mkdir(parents=True)
        torch.save({"w": torch.zeros(10)}, path / "w.pt")

    run_dir = tiny_fs / "run"
    RunCheckpointer(run_dir, keep=2).save(4, {"policy": writer}, {})
    fill(tiny_fs)
    from megatron_oreal.checkpoint.diskfull import naming

    def append():  # as runtime.append_step_record writes it
        with naming(run_dir / "steps.jsonl"), open(run_dir / "steps.jsonl", "a") as f:
            f.write("x" * 10_000)

    exc = error_of(append)
    assert is_disk_full(exc, run_dir)
    assert _disk_full_line(exc, str(run_dir)) == (
        f"no space left on device writing {run_dir / 'steps.jsonl'} (0 KiB free); the checkpoint 'step_000004' is "
        "intact; free space and rerun the same command to resume")
