"""Flattened buckets: exact round trips (mixed dtypes, non-contiguous views, scalars, empties),
byte offsets as SGLang reads them, and re-bucketing of a streamed source."""

import pytest
import torch

from megatron_oreal.sync.buckets import flatten, nbytes_of, rebucket, unflatten


def _mixed():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    return [
        ("a.weight", torch.randn(4, 3, generator=g).to(torch.bfloat16)),
        ("b.weight", base.t()),  # non-contiguous (transposed view)
        ("c.weight", base[:, ::3]),  # non-contiguous (strided slice)
        ("d.bias", torch.randn(5, generator=g).to(torch.bfloat16)),
        ("e.scalar", torch.tensor(3.5)),  # 0-dim
        ("f.empty", torch.empty(0, 7)),
        ("g.ids", torch.arange(9, dtype=torch.int64).view(3, 3)),
        ("h.mask", torch.tensor([True, False, True])),
        ("i.fp8", torch.tensor([1.0, -2.0, 0.5]).to(torch.float8_e4m3fn)),
    ]


def test_round_trip_exact_per_dtype():
    named = _mixed()
    buckets = flatten(named)
    # one buffer per dtype, in first-seen order
    assert [b.dtype for b in buckets] == [torch.bfloat16, torch.float32, torch.int64, torch.bool, torch.float8_e4m3fn]
    assert [b.names for b in buckets][0] == ["a.weight", "d.bias"]
    assert buckets[1].names == ["b.weight", "c.weight", "e.scalar", "f.empty"]
    back = dict(kv for b in buckets for kv in b.tensors())
    assert list(back) != [] and set(back) == {n for n, _ in named}
    for name, t in named:
        got = back[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    # byte offsets: fp32 bucket is 10x6 + 6x4 + 1 + 0 floats = 85 * 4 bytes, contiguous slots
    fp32 = buckets[1]
    assert fp32.nbytes == (60 + 24 + 1) * 4
    assert [(m.start_idx, m.end_idx, m.numel) for m in fp32.metadata] == [(0, 240, 240), (240, 336, 96), (336, 340, 4), (340, 340, 0)]
    assert sum(b.nbytes for b in buckets) == nbytes_of(named)


def test_views_share_the_buffer_and_inputs_are_copied():
    src = torch.zeros(2, 2)
    (bucket,) = flatten([("w", src)])
    src.fill_(7.0)  # the bucket holds a copy, not the input
    name, view = bucket.tensors()[0]
    assert torch.equal(view, torch.zeros(2, 2))
    bucket.buffer.view(torch.float32)[0] = 1.25  # views alias the buffer
    assert view[0, 0].item() == 1.25


def test_bad_inputs_name_the_tensor():
    with pytest.raises(ValueError, match="duplicate tensor name 'x'"):
        flatten([("x", torch.zeros(1)), ("x", torch.zeros(1))])
    with pytest.raises(TypeError, match="'y' is a list"):
        flatten([("y", [1, 2])])
    (b,) = flatten([("z", torch.zeros(4))])
    bad = [type(b.metadata[0])("z", torch.Size([8]), torch.float32, 0, 32, 32)]
    with pytest.raises(ValueError, match="'z' spans bytes \\[0, 32\\) outside the 16-byte buffer"):
        unflatten(b.buffer, bad)
    assert flatten([]) == []


def test_sglang_payload_has_the_attributes_sglang_reads():
    (b,) = flatten([("m.weight", torch.ones(3, 2))])
    payload = b.sglang_payload()
    assert payload["flattened_tensor"] is b.buffer
    (meta,) = payload["metadata"]
    assert (meta.name, meta.shape, meta.dtype, meta.start_idx, meta.end_idx, meta.numel) == (
        "m.weight", torch.Size([3, 2]), torch.float32, 0, 24, 24)
    assert torch.equal(dict(unflatten(payload["flattened_tensor"], payload["metadata"]))["m.weight"], torch.ones(3, 2))


def test_rebucket_groups_pairs_and_passes_ready_buckets():
    t = lambda n: torch.zeros(n, dtype=torch.uint8)  # n bytes
    pairs = [("a", t(40)), ("b", t(50)), ("c", t(20)), ("big", t(500)), ("d", t(10))]
    got = [[n for n, _ in b] for b in rebucket(iter(pairs), bucket_bytes=100)]
    assert got == [["a", "b"], ["c"], ["big"], ["d"]]
    ready = [[("x", t(1)), ("y", t(1))], ("z", t(1)), [("w", t(300))]]
    assert [[n for n, _ in b] for b in rebucket(ready, 100)] == [["x", "y"], ["z"], ["w"]]
    with pytest.raises(TypeError, match="weight source yielded Tensor"):
        list(rebucket([t(3)], 100))


def test_flatten_into_a_staging_buffer():
    named = _mixed()
    staging = torch.empty(4096, dtype=torch.uint8)
    buckets = flatten(named, staging=staging)
    base = staging.data_ptr()
    starts = [b.buffer.data_ptr() - base for b in buckets]
    assert all(s % 16 == 0 for s in starts) and starts == sorted(starts)  # aligned, consecutive slices
    assert all(b.buffer.untyped_storage().data_ptr() == base for b in buckets)
    back = dict(kv for b in buckets for kv in b.tensors())
    for name, t in named:
        assert torch.equal(back[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    with pytest.raises(ValueError, match="staging buffer of 64 bytes is too small"):
        flatten(named, staging=torch.empty(64, dtype=torch.uint8))
