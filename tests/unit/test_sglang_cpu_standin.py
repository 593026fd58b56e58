"""Our pure-torch stand-in for sgl_kernel's two CPU ops (tools/sglang_cpu/stubs/sgl_kernel), on hand-computed
cases that mirror the triton kernels it replaces (sglang 0.5.21), and the env builder's cache key."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[2] / "tools" / "sglang_cpu"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sk():
    return _load("sgl_kernel_standin", TOOLS / "stubs" / "sgl_kernel" / "__init__.py")


def test_assign_req_to_token_pool(sk):
    req_to_token = torch.full((3, 6), -1, dtype=torch.int32)
    # request in pool row 2 gets columns [1, 3), row 0 gets [0, 3): out slots are consumed in batch order
    sk.assign_req_to_token_pool_cpu(torch.tensor([2, 0]), req_to_token, torch.tensor([1, 0]), torch.tensor([3, 3]),
                                    torch.tensor([10, 11, 20, 21, 22], dtype=torch.int64), 6)
    assert req_to_token.tolist() == [[20, 21, 22, -1, -1, -1], [-1] * 6, [-1, 10, 11, -1, -1, -1]]


def test_copy_all_layer_kv_cache_is_safe_in_place(sk):
    k = torch.arange(5 * 4, dtype=torch.float32).reshape(5, 4)
    v = torch.arange(5 * 2, dtype=torch.bfloat16).reshape(5, 2)
    want_k, want_v = k.clone(), v.clone()
    src, tgt = torch.tensor([0, 1]), torch.tensor([1, 3])  # row 1 is read before it is overwritten
    want_k[[1, 3]] = k[[0, 1]].clone()
    want_v[[1, 3]] = v[[0, 1]].clone()
    ptrs = torch.tensor([k.data_ptr(), v.data_ptr()], dtype=torch.int64)
    strides = torch.tensor([4 * 4, 2 * 2], dtype=torch.int64)  # bytes per row
    sk.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


def test_anything_else_imports_but_fails_loudly_when_called(sk):
    op = sk.build_tree_kernel_efficient_cpu  # sglang imports it at module level
    with pytest.raises(NotImplementedError, match="not provided by megatron-oreal's CPU stand-in"):
        op(1, 2)


def test_env_key_follows_the_lock_and_the_standin(tmp_path, monkeypatch):
    be = _load("build_env_under_test", TOOLS / "build_env.py")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = be.env_dir()
    assert d.parent == tmp_path / "megatron-oreal" and d.name.startswith("sglang-cpu-")
    assert not be.is_built(d)
    lock = tmp_path / "lock.txt"
    lock.write_text(be.LOCK.read_text() + "extra==1\n")
    monkeypatch.setattr(be, "LOCK", lock)
    assert be.env_dir() != d  # a changed pin means a different env
    text = be.LOCK.read_text()
    assert "torch==2.13.0" in text and all("==" in line for line in text.splitlines() if line and line[0] != "#")
