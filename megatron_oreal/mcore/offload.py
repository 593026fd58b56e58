"""Train-state offload: move a model's parameters, gradient buffers and optimizer state to host memory
during rollout and back before training, so the rollout engine gets (almost) the whole GPU.

What moves, per DDP-wrapped model and its Megatron optimizer (megatron-core 0.16.1):
  * parameters: every `p` of the model; under Megatron DDP with the distributed optimizer they are
    views into the buffers' `param_data` (distributed/param_and_grad_buffer.py), which moves whole;
  * gradient buffers: every `p.main_grad`, views into the buffers' `grad_data`;
  * optimizer state: for every (chained) optimizer the inner torch optimizer's parameters (the FP32
    master copies of a BF16 model, or the distributed optimizer's shards of them), their `.grad`, and
    every tensor of its `state` (Adam's moments).
The reference snapshot is already on the host (model.ReferenceWeights).

How: per distinct storage, copy its bytes to a host buffer (pinned on a GPU machine, so the copy runs
at PCIe/C2C DMA speed; allocated once and reused every step), then `storage.resize_(0)`; reloading
resizes the same storage back and copies the bytes in. A set marked `discard` (the gradient buffers:
every update starts by zeroing them, train_step.py `optim.zero_grads`) is only freed, and comes back
zeroed, so it costs neither copy time nor host memory. Resizing the storage in place, rather than
replacing tensors, keeps every tensor object, every view (params into `param_data`, `main_grad` into `grad_data`) and every reference the optimizer
and DDP hold valid: the model trains on exactly the same objects, bit for bit. verl frees Megatron's
DDP buffers the same way (`buffer.param_data.storage().resize_(0)`, grads freed without a copy). On a CPU the identical code runs (the "host" copy is a second CPU
buffer), which is what the parity tests exercise.

While offloaded the tensors have no memory: touching one is an invalid memory access (a segfault on
CPU), so reload before any use. `Offload.resident()` brings them back for a block (checkpoint, export).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch


def model_tensors(ddp_model) -> Iterator[torch.Tensor]:
    """Parameters and their gradient buffers (`main_grad`) of a (DDP-wrapped) model."""
    for p in ddp_model.parameters():
        yield p
        grad = getattr(p, "main_grad", None)
        if grad is not None:
            yield grad
        if p.grad is not None:
            yield p.grad


def optimizer_tensors(optimizer) -> Iterator[torch.Tensor]:
    """Master weights, their grads and the state of every inner torch optimizer of a Megatron optimizer
    (a ChainedOptimizer holds several in `chained_optimizers`)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                yield p
                if p.grad is not None:
                    yield p.grad
        for state in inner.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    yield value


@dataclass
class _Moved:
    storage: torch.UntypedStorage
    nbytes: int
    host: torch.Tensor | None  # uint8 [nbytes]; None for a discarded set


def _distinct_storages(tensors: Iterable[torch.Tensor], device: torch.device | None) -> list[torch.UntypedStorage]:
    seen: dict[tuple[str, int], torch.UntypedStorage] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor) or (device is not None and t.device != device):
            continue
        s = t.untyped_storage()
        if s.nbytes() == 0:
            continue
        seen.setdefault((str(s.device), s.data_ptr()), s)
    return list(seen.values())


def _bytes_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class Offload:
    """Named sets of training tensors, each offloaded to / reloaded from host memory as one.

    `sets`: name -> zero-argument callable returning the set's tensors, walked at offload time (the
    optimizer's state appears only at its first step). `enabled=False` makes every call a no-op, so the
    loop's choreography is the same with and without `policy.offload_train_state`.
    """

    def __init__(self, sets: dict[str, Callable[[], Iterable[torch.Tensor]]], *, enabled: bool = True,
                 device: str | torch.device | None = None, discard: Iterable[str] = ()):
        self.enabled = enabled
        self.discard = set(discard)  # freed without a copy, zeroed on reload
        self.device = torch.device(device) if device is not None else None
        self.sources = dict(sets)
        self.moved: dict[str, list[_Moved]] = {name: [] for name in sets}
        self.pin = torch.cuda.is_available()
        # Host buffers are kept and reused (the sets' storages have the same sizes every step):
        # pinning tens of GiB again each step would cost seconds of cudaHostAlloc.
        self._host: dict[str, list[torch.Tensor]] = {name: [] for name in sets}

    def is_offloaded(self, name: str) -> bool:
        return bool(self.moved[name])

    def offload(self, *names: str) -> int:
        """Copy the named sets to the host and free their device memory; returns the bytes copied.
        A set already offloaded is left as it is. Storages shared between sets move once."""
        if not self.enabled:
            return 0
        names = names or tuple(self.sources)
        total = 0
        for name in names:
            if self.moved[name]:
                continue
            storages = _distinct_storages(self.sources[name](), self.device)
            if name in self.discard:
                self.moved[name] = [_Moved(s, s.nbytes(), None) for s in storages]
                for s in storages:
                    s.resize_(0)
                continue
            cache = self._host[name]
            if [h.numel() for h in cache] != [s.nbytes() for s in storages]:
                cache[:] = [torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=self.pin) for s in storages]
            moved = []
            for s, host in zip(storages, cache):
                host.copy_(_bytes_view(s), non_blocking=self.pin)
                moved.append(_Moved(s, s.nbytes(), host))
            if self.pin:
                torch.cuda.synchronize()  # the copies must land before the memory is freed
            for m in moved:
                m.storage.resize_(0)
                total += m.nbytes
            self.moved[name] = moved
        return total

    def reload(self, *names: str) -> int:
        """Re-allocate the named sets' storages (same objects) and copy their bytes back."""
        if not self.enabled:
            return 0
        names = names or tuple(self.sources)
        total = 0
        for name in names:
            for m in self.moved[name]:
                m.storage.resize_(m.nbytes)
                if m.host is None:
                    _bytes_view(m.storage).zero_()
                    continue
                _bytes_view(m.storage).copy_(m.host, non_blocking=self.pin)
                total += m.nbytes
            self.moved[name] = []
        if self.pin:
            torch.cuda.synchronize()  # the next offload overwrites the host buffers
        return total

    @contextlib.contextmanager
    def resident(self, *names: str):
        """Everything named (default: all) on the device for the block, then back where it was."""
        names = names or tuple(self.sources)
        was = [n for n in names if self.moved[n]]
        self.reload(*was)
        try:
            yield
        finally:
            self.offload(*was)


def train_state_offload(trainer, *, enabled: bool, device: str) -> Offload:
    """The three sets the loop moves (runtime.Run.to_rollout / to_training): "grads" (every gradient
    buffer, freed without a copy) and "rest" (the token RM's parameters and both optimizers' masters and
    state) leave as soon as training ends; "policy_params" stays on the device until the weight sync
    has read it."""
    models = [m for m in (trainer.policy, trainer.token_rm) if m is not None]
    opts = [o for o in (trainer.policy_opt, trainer.rm_opt) if o is not None]

    def key(t: torch.Tensor) -> tuple[str, int]:
        return str(t.device), t.untyped_storage().data_ptr()

    def policy_params():
        return list(trainer.policy.parameters())

    def grads():
        out = [g for m in models for p in m.parameters() for g in (getattr(p, "main_grad", None), p.grad)]
        for opt in opts:
            for inner in getattr(opt, "chained_optimizers", [opt]):
                params = [p for grp in getattr(getattr(inner, "optimizer", None), "param_groups", []) for p in grp["params"]]
                out += [p.grad for p in params]
        return [g for g in out if g is not None]

    def rest():
        # A storage of the other sets (the distributed optimizer's shard views of `param_data`, master
        # grads aliasing `main_grad`) belongs to them: the sync still reads the policy's parameters.
        skip = {key(t) for t in policy_params() + grads()}
        out = [t for opt in opts for t in optimizer_tensors(opt)]
        if trainer.token_rm is not None:
            out += list(trainer.token_rm.parameters())
        return [t for t in out if key(t) not in skip]

    return Offload({"grads": grads, "rest": rest, "policy_params": policy_params}, enabled=enabled,
                   device=device, discard=("grads",))
