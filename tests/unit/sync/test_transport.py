"""Transports and sync_weights on CPU: in-process delivery + metrics + the post-sync check, the
SGLang IPC transport holding its buffers until the engine answers, and (when sglang is installed)
SGLang's own FlattenedTensorBucket / MultiprocessingSerializer reading our payloads."""

import gc
import weakref

import pytest
import torch

from megatron_oreal.sync import InProcessTransport, SGLangIPCTransport, sync_weights
from megatron_oreal.sync.buckets import flatten, unflatten
from megatron_oreal.sync.fp8 import dequantize_block_fp8
from megatron_oreal.sync.transport import deserialize_payload, serialize_payload


class DictEngine:
    """What the CPU engine does in update_weights: copy into its own tensors before returning."""

    def __init__(self):
        self.weights, self.calls = {}, 0

    def update_weights(self, named):
        self.calls += 1
        for name, t in named:
            self.weights[name] = t.clone()

    def named_weights(self):
        return self.weights.items()


def _model():
    g = torch.Generator().manual_seed(1)
    return {
        "model.embed_tokens.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(32, 32, generator=g).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(32, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(32, 130, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(32, generator=g),
    }


def test_inprocess_sync_metrics_and_check():
    model = _model()
    engine = DictEngine()
    m = sync_weights(model.items(), InProcessTransport(engine, flat=True), bucket_bytes=6000, check=True)
    # bytes by hand: embed 64*32*2=4096, q 32*32*2=2048, bias 128, down 32*130*2=8320, norm 128
    assert m.bytes == m.source_bytes == 4096 + 2048 + 128 + 8320 + 128
    # source buckets at 6000 B: [embed], [q, bias], [down], [norm] -> dtype buffers 1 + 2 + 1 + 1
    assert m.tensors == 5 and m.buckets == 5 and engine.calls == 5
    assert m.checked and m.mismatches == [] and m.seconds > 0 and m.gb_per_s > 0
    for name, t in model.items():
        assert torch.equal(engine.weights[name], t), name
    d = m.as_dict()
    assert d["sync/bytes"] == 14720.0 and d["sync/buckets"] == 5.0 and d["sync/check_mismatches"] == 0.0
    assert "5 tensors / 5 buckets" in m.summary() and "check: OK" in m.summary()

    class LossyEngine(DictEngine):  # drops a value: the check must catch it and name the tensor
        def update_weights(self, named):
            super().update_weights(named)
            if "model.norm.weight" in self.weights:
                self.weights["model.norm.weight"][3] += 1.0

    with pytest.raises(RuntimeError, match="1 tensor\\(s\\) differ in the engine: model.norm.weight"):
        sync_weights(model.items(), InProcessTransport(LossyEngine()), check=True)
    # unflattened (the default): one engine call per source bucket, same bytes, same weights
    plain = DictEngine()
    m2 = sync_weights(model.items(), InProcessTransport(plain), bucket_bytes=6000, check=True)
    assert (m2.bytes, m2.buckets, plain.calls) == (14720, 4, 4) and plain.weights.keys() == engine.weights.keys()


def test_fp8_sync_sends_quantized_linears():
    model = _model()
    engine = DictEngine()
    m = sync_weights(model.items(), InProcessTransport(engine), fp8=True)
    w = engine.weights
    assert w["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert tuple(w["model.layers.0.mlp.down_proj.weight_scale_inv"].shape) == (1, 2)
    assert w["model.embed_tokens.weight"].dtype == torch.bfloat16  # embeddings stay bf16
    # 32x32 and 32x130 fp8 (1 B each) + two scale tensors (1 and 2 fp32) instead of bf16
    assert m.bytes == 4096 + 1024 + 128 + 4160 + 128 + 4 + 8 and m.source_bytes == 14720 and m.tensors == 7
    deq = dequantize_block_fp8(w["model.layers.0.mlp.down_proj.weight"], w["model.layers.0.mlp.down_proj.weight_scale_inv"])
    ref = model["model.layers.0.mlp.down_proj.weight"].float()
    assert float((deq - ref).abs().max()) <= float(ref.abs().max()) * 2.0**-4


class IPCFakeEngine:
    """Leader-side hooks of SGLangEngine; checks at load time that the sender still holds the buffers."""

    group, leader_rank, is_leader = None, 0, True

    def __init__(self):
        self.transport = None
        self.events, self.loaded, self.alive_at_load = [], {}, []

    def begin_weight_sync(self, check=False):
        self.events.append(("begin", check))

    def update_weights_from_tensor(self, payloads):
        assert len(payloads) == 1  # one rank in the group
        self.alive_at_load.append([b.buffer for b in self.transport.inflight])
        obj = deserialize_payload(payloads[0])
        for name, t in unflatten(obj["flattened_tensor"], obj["metadata"]):
            self.loaded[name] = t.clone()
        self.events.append(("load", sorted(m.name for m in obj["metadata"])))

    def end_weight_sync(self):
        self.events.append(("end",))

    def compare_weights_with_snapshot(self):
        return ["engine says no"]


def test_ipc_transport_holds_buffers_until_the_engine_answers():
    import torch.multiprocessing

    old = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        engine = IPCFakeEngine()
        transport = engine.transport = SGLangIPCTransport(engine)
        model = _model()
        transport.begin()
        refs = []
        n = transport.send(list(model.items()))
        assert n == 2  # bf16 + fp32 buffers
        # during each load the transport still referenced the buffer being read
        assert [len(bufs) for bufs in engine.alive_at_load] == [2, 2]
        refs = [weakref.ref(b) for bufs in engine.alive_at_load for b in bufs]
        engine.alive_at_load.clear()
        assert transport.inflight == []
        gc.collect()
        assert all(r() is None for r in refs)  # released after the answer, not kept forever
        transport.end()
        assert engine.events[0] == ("begin", False) and engine.events[-1] == ("end",)
        assert [e[0] for e in engine.events] == ["begin", "load", "load", "end"]
        for name, t in model.items():
            assert torch.equal(engine.loaded[name], t), name

        class Failing(IPCFakeEngine):
            def update_weights_from_tensor(self, payloads):
                raise ValueError("boom")

        bad = Failing()
        bad.transport = SGLangIPCTransport(bad)
        with pytest.raises(RuntimeError, match="update_weights_from_tensor failed: ValueError: boom"):
            bad.transport.send([("x", torch.ones(2))])
        assert bad.transport.inflight == []
        with pytest.raises(RuntimeError, match="verify\\(\\) needs begin\\(check=True\\)"):
            bad.transport.verify(None)
        bad.transport.begin(check=True)
        assert bad.transport.verify(None) == ["engine says no"]
    finally:
        torch.multiprocessing.set_sharing_strategy(old)


def test_payload_unpickler_refuses_foreign_globals():
    import base64
    import pickle

    evil = base64.b64encode(pickle.dumps({"x": print})).decode()
    with pytest.raises(pickle.UnpicklingError, match="builtins.print, which SGLang would refuse"):
        deserialize_payload(evil)


def test_sglang_reads_our_buckets():
    pytest.importorskip("sglang")
    try:
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
    except Exception as exc:  # pragma: no cover - depends on the local sglang install
        pytest.skip(f"sglang installed but its weight-sync classes do not import: {exc}")
    model = _model()
    for bucket in flatten(list(model.items())):
        payload = serialize_payload(bucket.sglang_payload())
        # SGLang's SafeUnpickler must accept every global our payload references
        obj = MultiprocessingSerializer.deserialize(payload)
        rec = dict(FlattenedTensorBucket(flattened_tensor=obj["flattened_tensor"], metadata=obj["metadata"]).reconstruct_tensors())
        assert sorted(rec) == sorted(bucket.names)
        for name, t in rec.items():
            assert t.dtype == model[name].dtype and torch.equal(t, model[name]), name
        # and SGLang's own bucket of the same tensors has the same bytes and offsets
        theirs = FlattenedTensorBucket(named_tensors=[(n, model[n]) for n in bucket.names])
        assert torch.equal(theirs.get_flattened_tensor(), bucket.buffer)
        assert [(m.start_idx, m.end_idx, m.numel) for m in theirs.get_metadata()] == [
            (m.start_idx, m.end_idx, m.numel) for m in bucket.metadata]


def test_leader_serialises_for_ranks_without_tensors():
    """The checkpoint gather fills only the first rank of a group: the leader then sends one
    separately serialised copy of its buffers per engine rank."""
    import torch.multiprocessing

    old = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        posted = []
        engine = IPCFakeEngine()
        engine.update_weights_from_tensor = posted.append
        serialised = []

        def counting(obj):
            serialised.append(obj["metadata"][0].name)
            return serialize_payload(obj)

        transport = engine.transport = SGLangIPCTransport(engine, serializer=counting)
        transport._gather = lambda payloads: [payloads, None]  # rank 1 of a 2-rank group holds None
        model = _model()
        assert transport.send(list(model.items())) == 2
        # one serialize call per (dtype buffer, engine rank): separate CUDA-IPC ref counts on GPUs
        assert len(serialised) == 4 and [len(p) for p in posted] == [2, 2]
        for per_rank in posted:
            decoded = [dict(unflatten(**{"buffer": o["flattened_tensor"], "metadata": o["metadata"]}))
                       for o in map(deserialize_payload, per_rank)]
            assert decoded[0].keys() == decoded[1].keys()
            for name in decoded[0]:
                assert torch.equal(decoded[0][name], decoded[1][name]) and torch.equal(decoded[0][name], model[name])
        # a leader-only engine (no group) with SGLang TP=3 gets three payloads per buffer
        posted.clear()
        engine.tp_size = 3
        del transport._gather
        assert transport.send([("w", torch.ones(3))]) == 1 and [len(p) for p in posted] == [3]
        engine.tp_size = 1
        # a leader without tensors cannot serve its engine: a clear error on every rank
        with pytest.raises(RuntimeError, match="leader rank holds no tensors"):
            transport.send([("x", None)])
        # and a non-destination rank's sync_weights sends nothing of its own and counts nothing
        calls = []

        class Quiet:
            def begin(self, check=False): pass
            def send(self, named): calls.append(named); return 0
            def end(self): pass

        m = sync_weights([[("a", None), ("b", None)]], Quiet(), fp8=True)
        assert calls == [[("a", None), ("b", None)]] and m.bytes == 0 and m.tensors == 0
    finally:
        torch.multiprocessing.set_sharing_strategy(old)


def test_check_falls_back_to_the_hf_model_state_dict():
    model = _model()

    class HFLike:  # the CPU engine: an HF model inside, fp32 weights, bf16 tensors sent
        def __init__(self):
            self.model = torch.nn.Module()
            self.held = {n: torch.zeros(t.shape) for n, t in model.items()}
            self.model.state_dict = lambda: self.held

        def update_weights(self, named):
            for n, t in named:
                self.held[n].copy_(t.float())

    m = sync_weights(model.items(), InProcessTransport(HFLike()), check=True)
    assert m.checked and m.mismatches == []
