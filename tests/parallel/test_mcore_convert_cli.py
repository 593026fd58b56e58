"""`python -m megatron_oreal convert`: hf-to-mcore under torchrun at TP=2, mcore-to-hf as a plain
process at TP=1; the exported folder is bit-identical to the source and has no leftovers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers.tiny_hf import make_tiny_qwen2
from helpers.torchrun import run_torchrun



@pytest.mark.slow
def test_convert_cli_round_trip(tmp_path):
    src, ckpt, out = tmp_path / "src", tmp_path / "ckpt", tmp_path / "out"
    make_tiny_qwen2(src, tie=True, shards=2, seed=8)
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    log = run_torchrun("megatron_oreal", 2, ["convert", "hf-to-mcore", "--hf", src, "--out", ckpt, "--tp", "2"],
                       timeout=300, module=True)
    assert "hf-to-mcore: tp=2 pp=1 dp=1" in log and "saved Megatron checkpoint" in log, log
    proc = subprocess.run([sys.executable, "-m", "megatron_oreal", "convert", "mcore-to-hf", "--ckpt", str(ckpt),
                           "--out", str(out), "--hf-config", str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "exported 26 tensors" in proc.stdout, proc.stdout
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "out", "src"]  # no .tmp folders left behind
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    want = {}
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            want.update(load_file(src / f))
    got = load_file(out / "model.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    def convert_at(tp):
        return subprocess.run([sys.executable, "-m", "megatron_oreal", "convert", "hf-to-mcore", "--hf", str(src),
                               "--out", str(tmp_path / "x"), "--tp", str(tp)], capture_output=True, text=True,
                               timeout=300)

    bad = convert_at(2)  # the heads allow TP=2, one process does not
    assert bad.returncode != 0 and "world size 1 is not divisible by tensor x pipeline = 2 x 1" in bad.stderr
    bad = convert_at(4)  # 2 KV heads cannot be split 4 ways: one line before any process group
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "tensor parallel size 4 must divide num_attention_heads=4 and num_key_value_heads=2" in bad.stderr
