"""mcore/offload.py on plain tensors (single process, no Megatron): views survive, bytes round-trip,
host buffers are reused, `resident()` restores the previous placement, disabled is a no-op."""

from __future__ import annotations

import torch

from megatron_oreal.mcore.offload import Offload


def _state():
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(64, generator=g)  # a DDP-style buffer ...
    views = [flat[:16].view(4, 4), flat[16:]]  # ... and parameters viewing it
    other = torch.randn(8, generator=g).to(torch.bfloat16)
    return flat, views, other


def test_offload_frees_and_restores_bytes_and_views():
    flat, views, other = _state()
    want = [flat.clone(), other.clone()]
    off = Offload({"a": lambda: views, "b": lambda: [other, other[2:]]})  # shared storages move once
    assert off.offload("a") == 64 * 4 and flat.untyped_storage().nbytes() == 0
    assert other.untyped_storage().nbytes() == 16  # "b" untouched
    assert off.offload() == 8 * 2 and off.is_offloaded("a") and off.is_offloaded("b")
    hosts = [m.host for m in off.moved["a"]]
    assert off.reload() == 64 * 4 + 8 * 2
    assert torch.equal(flat, want[0]) and torch.equal(other, want[1])
    views[0].add_(1.0)  # the views still alias the restored buffer
    assert torch.equal(flat[:16], want[0][:16] + 1)
    off.offload("a")
    assert [m.host for m in off.moved["a"]][0] is hosts[0]  # the host buffer is reused
    off.reload("a")
    assert torch.equal(flat[:16], want[0][:16] + 1)


def test_resident_brings_back_only_what_was_offloaded_and_disabled_is_a_no_op():
    flat, views, other = _state()
    off = Offload({"a": lambda: views, "b": lambda: [other]})
    off.offload("a")
    with off.resident():
        assert flat.untyped_storage().nbytes() == 64 * 4 and other.untyped_storage().nbytes() == 16
        flat.mul_(2)
    assert off.is_offloaded("a") and not off.is_offloaded("b")
    ref = flat  # reload and compare with what was written inside the block
    off.reload()
    assert torch.equal(ref, _state()[0] * 2)
    noop = Offload({"a": lambda: views}, enabled=False)
    assert noop.offload() == 0 and flat.untyped_storage().nbytes() == 64 * 4 and noop.reload() == 0


def test_a_discarded_set_costs_no_copy_and_comes_back_zeroed():
    flat, views, other = _state()
    off = Offload({"grads": lambda: views, "b": lambda: [other]}, discard=("grads",))
    assert off.offload("grads") == 0 and flat.untyped_storage().nbytes() == 0  # freed, nothing copied
    assert off.offload("b") == 16
    assert off.reload() == 16
    assert flat.untyped_storage().nbytes() == 64 * 4 and torch.equal(flat, torch.zeros(64))
    assert torch.equal(other, _state()[2])
