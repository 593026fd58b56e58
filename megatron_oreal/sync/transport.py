"""Weight-sync transports: how one bucket of HF-named tensors reaches the rollout engine.

A transport is `begin(check) -> send(bucket)* -> end() -> verify(digests)`; `sync_weights`
(sync/__init__.py) drives it. Two transports:

* `InProcessTransport(engine)`: the CPU engine lives in this process; each bucket is handed to
  `engine.update_weights`, which copies it into its model before returning (optionally staged
  through flattened buffers first, `flat=True`, the GPU path's bucket code).
* `SGLangIPCTransport(engine)`: a co-located SGLang engine (rollout/sglang_engine.py). Every rank
  of the engine's group flattens its full HF tensors into one buffer per dtype, serialises it the
  way SGLang's `MultiprocessingSerializer.serialize(obj, output_str=True)` does (ForkingPickler ->
  CUDA IPC handle -> base64; sglang 0.5.21 `srt/utils/common.py:2997-3036`) and `gather_object`s
  the strings to the group's first rank, which POSTs them to `/update_weights_from_tensor` with
  `load_format="flattened_bucket"`: SGLang TP rank i opens payload i (`tp_worker.py:192-199`).
  This is slime's `_send_to_colocated_engine`
  (slime/backends/megatron_utils/update_weight/update_weight_from_tensor.py).
  Buffers are never reused or freed before the engine has answered: SGLang copies out of the IPC
  buffer asynchronously and a reused producer buffer "can race ... and corrupt weights" (slime's
  comment, ibid.), so every rank holds its buffers until the leader has the HTTP response and has
  broadcast it to the group.
"""

from __future__ import annotations

import base64
import io
import pickle
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from megatron_oreal.sync.buckets import FlatBucket, flatten
from megatron_oreal.sync.metrics import WeightDigests


class Transport(Protocol):
    def begin(self, check: bool = False) -> None: ...

    def send(self, named: list[tuple[str, torch.Tensor]]) -> int:
        """Deliver one bucket; return how many buffers it took (one per dtype)."""
        ...

    def end(self) -> None: ...

    def verify(self, digests: WeightDigests) -> list[str]:
        """After a checked sync: names (or messages) that the engine does not hold as sent."""
        ...


class InProcessTransport:
    def __init__(self, engine: Any, *, flat: bool = False) -> None:
        self.engine = engine
        # Default: hand the tensors over as they are; the engine copies them once into its model
        # (tools/bench_sync.py, 98M params, 1 thread: 1.32 GB/s vs 1.42 for a bare torch copy).
        # flat=True stages each bucket through the GPU path's flattened buffers (0.51 GB/s): the
        # same bucket code the SGLang transport runs, for tests and comparisons.
        self.flat = flat
        # The engine copies out before update_weights returns, so one staging buffer serves every
        # bucket (fresh allocations cost page faults: 2.6x slower in tools/bench_sync.py).
        self._staging: torch.Tensor | None = None

    def begin(self, check: bool = False) -> None:
        pass

    def send(self, named: list[tuple[str, torch.Tensor]]) -> int:
        if any(t is None for _, t in named):
            return 0  # not a destination rank of the gather: nothing to deliver here
        if not self.flat:
            self.engine.update_weights(list(named))
            return 1
        need = sum(t.numel() * t.element_size() + 16 for _, t in named)
        device = named[0][1].device if named else torch.device("cpu")
        if self._staging is None or self._staging.numel() < need or self._staging.device != device:
            self._staging = torch.empty(need, dtype=torch.uint8, device=device)
        buckets = flatten(named, staging=self._staging)
        for bucket in buckets:
            # update_weights copies into the model before returning: that return is the ack.
            self.engine.update_weights(bucket.tensors())
        return len(buckets)

    def end(self) -> None:
        pass

    def verify(self, digests: WeightDigests) -> list[str]:
        """Read the engine's weights back: `engine.named_weights()` if it has one, else the HF
        model's `state_dict()` (the CPU engine wraps an HF model, whose names are the HF names)."""
        read = getattr(self.engine, "named_weights", None)
        if read is not None:
            return digests.compare(dict(read()))
        model = getattr(self.engine, "model", None)
        if model is None or not hasattr(model, "state_dict"):
            raise RuntimeError(
                f"{type(self.engine).__name__} has neither named_weights() nor .model: cannot check its weights after a sync"
            )
        return digests.compare(model.state_dict())


# --- SGLang-compatible serialisation -----------------------------------------------------------


def serialize_payload(obj: Any) -> str:
    """ForkingPickler + base64, byte-for-byte what `MultiprocessingSerializer.serialize(obj,
    output_str=True)` produces: CUDA tensors travel as IPC handles, CPU tensors as shared-memory
    file descriptors (same host only)."""
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# The globals a flattened-bucket payload may reference: a subset of SGLang's SafeUnpickler allow-list
# (sglang 0.5.21 srt/utils/common.py:3085-3293), so a payload that loads here loads there.
_ALLOWED = {
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "int"), ("builtins", "str"),
    ("types", "SimpleNamespace"), ("copyreg", "__newobj__"),
    ("torch", "Tensor"), ("torch", "Size"), ("torch", "device"), ("torch", "dtype"),
    ("torch._tensor", "_rebuild_from_type_v2"), ("torch.nn.parameter", "Parameter"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch.storage", "UntypedStorage"), ("torch.storage", "TypedStorage"), ("torch", "UntypedStorage"),
    ("torch.multiprocessing.reductions", "rebuild_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_storage_fd"),
    ("torch.multiprocessing.reductions", "rebuild_storage_filename"),
    ("torch.multiprocessing.reductions", "rebuild_storage_empty"),
    ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
    ("sglang.srt.utils.patch_torch", "_rebuild_cuda_tensor_modified"),
    ("multiprocessing.resource_sharer", "DupFd"),
}


class _PayloadUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"weight payload references {module}.{name}, which SGLang would refuse")


def deserialize_payload(data: str | bytes) -> Any:
    """Inverse of `serialize_payload` with an allow-list (what our fake engines and tests use)."""
    raw = base64.b64decode(data, validate=True) if isinstance(data, str) else bytes(data)
    return _PayloadUnpickler(io.BytesIO(raw)).load()


def _patch_cuda_reductions() -> None:
    """On GPUs, send the device UUID instead of its index (the engine's processes may number GPUs
    differently); the receiver resolves it with the same patch (sglang `utils/patch_torch.py:41-96`)."""
    if not torch.cuda.is_available():
        return
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

    monkey_patch_torch_reductions()


_ENGINE_GROUP = object()  # default: the engine's own group


class SGLangIPCTransport:
    """`engine` is this rank's `SGLangEngine` (rollout/sglang_engine.py): `engine.group` is the gloo
    group of its ranks (None when only the leader takes part), `engine.is_leader` marks the rank
    that owns the HTTP server, `engine.tp_size` is SGLang's TP size (one payload per SGLang rank);
    only the leader calls the engine's HTTP methods.

    `group`/`leader_rank` override the engine's group for the weight sync only: the trainer runs a
    leader-only engine (one rank drives generation) but sends weights from every TP rank of the
    replica's first stage, SGLang TP rank i reading the buffers of trainer TP rank i, which sits on
    the same GPU (no CUDA IPC across GPUs). Ranks other than the leader then pass engine=None."""

    def __init__(self, engine: Any, *, group: Any = _ENGINE_GROUP, leader_rank: int | None = None,
                 serializer: Callable[[Any], str] = serialize_payload) -> None:
        self.engine = engine
        if group is _ENGINE_GROUP:
            self.group, self.leader_rank, self.is_leader = engine.group, engine.leader_rank, engine.is_leader
        else:
            if group is not None and leader_rank is None:
                raise ValueError("SGLangIPCTransport: a sync group needs its leader_rank")
            self.group, self.leader_rank = group, leader_rank
            self.is_leader = group is None or dist.get_rank() == leader_rank
            if self.is_leader and engine is None:
                raise ValueError("SGLangIPCTransport: the leader rank needs the engine")
        self.serializer = serializer
        self.inflight: list[FlatBucket] = []  # buffers the engine may still be reading
        self._checking = False
        _patch_cuda_reductions()

    # group helpers ---------------------------------------------------------------------------
    def _gather(self, obj: Any) -> list[Any] | None:
        group = self.group
        if group is None:
            return [obj]
        out = [None] * dist.get_world_size(group) if self.is_leader else None
        dist.gather_object(obj, out, dst=self.leader_rank, group=group)
        return out

    def _share(self, obj: Any) -> Any:
        """The leader's `obj` on every rank of the group (the acknowledgement)."""
        group = self.group
        if group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.leader_rank, group=group)
        return box[0]

    # transport ---------------------------------------------------------------------------------
    def begin(self, check: bool = False) -> None:
        self._checking = check
        error = None
        if self.is_leader:
            try:
                self.engine.begin_weight_sync(check=check)
            except Exception as exc:  # shared so that no rank waits in a gather that never comes
                error = f"{type(exc).__name__}: {exc}"
        error = self._share(error)
        if error:
            raise RuntimeError(f"SGLang weight sync could not start: {error}")

    def send(self, named: list[tuple[str, torch.Tensor | None]]) -> int:
        """Every rank of the group calls this with the same bucket. Ranks that hold the full tensors
        send their own copy (slime: each TP rank after its all-gather); ranks that hold `None` (the
        checkpoint gather fills only its destination rank) let the leader serialise its buffers once
        more for them: one `serialize` per SGLang rank, so each has its own CUDA-IPC ref count
        (what sglang's Engine does for per-rank payloads, entrypoints/engine.py:1656-1672)."""
        has_data = all(t is not None for _, t in named)
        self.inflight = flatten(named) if has_data else []
        try:
            payloads = [self.serializer(b.sglang_payload()) for b in self.inflight] if has_data else None
            gathered = self._gather(payloads)
            error = None
            if self.is_leader:
                if not has_data:
                    error = ("the engine's leader rank holds no tensors for this bucket: the weight source must "
                             "deliver full tensors to the first rank of every engine group")
                else:
                    # SGLang TP ranks beyond the group (a leader-only engine: group None, tp_size > 1)
                    # read the leader's buffers too, over CUDA IPC between GPUs of one node.
                    gathered = list(gathered) + [None] * (getattr(self.engine, "tp_size", 1) - len(gathered))
                    gathered = [p if p is not None else [self.serializer(b.sglang_payload()) for b in self.inflight]
                                for p in gathered]
                    error = self._post(gathered)
            error = self._share(error)  # every rank waits here until the engine has answered
            if error:
                raise RuntimeError(f"SGLang update_weights_from_tensor failed: {error}")
            return len(self.inflight)
        finally:
            self.inflight = []  # now, and only now, the buffers may be freed
            if torch.cuda.is_available():
                torch.cuda.ipc_collect()

    def _post(self, gathered: list[list[str]]) -> str | None:
        counts = {len(p) for p in gathered}
        if len(counts) != 1:
            return f"ranks sent different numbers of dtype buffers per bucket: {[len(p) for p in gathered]}"
        try:
            for k in range(counts.pop()):
                self.engine.update_weights_from_tensor([per_rank[k] for per_rank in gathered])
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def end(self) -> None:
        error = None
        if self.is_leader:
            try:
                self.engine.end_weight_sync()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        error = self._share(error)
        if error:
            raise RuntimeError(f"SGLang weight sync could not finish: {error}")

    def verify(self, digests: WeightDigests) -> list[str]:
        """SGLang compares its weights with the snapshot it took of the checkpoint it loaded at
        start-up (begin(check=True) took it, then scrambled the weights), so this holds on the
        first sync, while the trainer's weights still equal that checkpoint."""
        if not self._checking:
            raise RuntimeError("verify() needs begin(check=True)")
        problems = None
        if self.is_leader:
            problems = self.engine.compare_weights_with_snapshot()
        return self._share(problems) or []
