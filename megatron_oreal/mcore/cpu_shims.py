"""Megatron-Core 0.16.1 on a CPU-only torch: the six monkeypatches it needs, and nothing else.

Megatron assumes CUDA in a handful of places (listed per shim below, file:line in megatron-core
0.16.1). On a machine without CUDA, `apply_cpu_shims()` makes "the CUDA device" mean the CPU:
`torch.cuda.current_device()` is "cpu", `device="cuda"` factories build CPU tensors, the CUDA RNG
tracker runs on the CPU generator, `synchronize` is a no-op, CPU tensors report CUDA type names
(Megatron's optimizers whitelist those), and `.cuda()` returns the tensor itself.

With CUDA present nothing is patched, so the same code runs unchanged on GPUs. Each shim was
checked by leaving it out on a CPU-only torch; the test
`tests/unit/mcore/test_mcore_cpu_shims.py` re-checks on every run that each one is still needed,
so an upgrade that makes one redundant is noticed.
"""

from __future__ import annotations

import functools

import torch

SHIM_NAMES = ("current_device", "factories", "rng", "synchronize", "tensor_type", "tensor_cuda")
_applied: set[str] = set()

# Factories that Megatron calls with a literal device="cuda" (or the current_device() result).
# Wrapped globally: these wrappers are invisible to other libraries (checked with transformers'
# from_pretrained). `torch.tensor` is NOT wrapped globally: a Python wrapper around it makes
# transformers 5.23 from_pretrained leave RoPE `inv_freq` uninitialised (garbage logits) in the same
# process. It is replaced only inside the Megatron modules that call torch.tensor(device="cuda").
_FACTORIES = ("empty", "zeros", "ones", "full", "arange", "rand", "randn", "randint")
_TENSOR_MODULES = (
    "megatron.core.optimizer.optimizer",  # optimizer.py:473-485,907 MixedPrecisionOptimizer (bf16)
    "megatron.core.optimizer.grad_scaler",  # grad_scaler.py:15,88-94
    "megatron.core.optimizer.clip_grads",  # clip_grads.py:90 (inf norm)
    "megatron.core.tensor_parallel.data",  # data.py:37 broadcast_data
    "megatron.core.rerun_state_machine",  # rerun_state_machine.py:261,265
    "megatron.core.utils",  # utils.py:1207
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # state_dict_saver.py:204
)


class _TorchWithCpuTensor:
    """Stands in for the `torch` module inside one Megatron module: everything forwards to torch,
    except `tensor`, whose device="cuda" becomes the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def tensor(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return torch.tensor(*args, **kwargs)


def _to_cpu_device(device):
    """Map any CUDA device spelling (str, torch.device, int index) to the CPU."""
    if device is None:
        return None
    if isinstance(device, int):
        return "cpu"
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return "cpu"
    return device


def _shim_current_device() -> None:
    # rotary_pos_embedding.py:162 `inv_freq.to(device=torch.cuda.current_device())`,
    # tensor_parallel/layers.py:261,552 `torch.empty(..., device=torch.cuda.current_device())`,
    # pipeline_parallel/p2p_communication.py (recv buffers). Unpatched: "Torch not compiled with CUDA".
    torch.cuda.current_device = lambda: "cpu"


def _shim_factories() -> None:
    # transformer/utils.py:35 get_default_causal_mask `torch.ones(sq, sq, device="cuda")`,
    # pipeline_parallel/schedules.py:596 `torch.zeros([], dtype=torch.int, device="cuda")`,
    # optimizer/clip_grads.py:90,115 `torch.tensor(..., device='cuda')`, tensor_parallel/data.py:37.
    for name in _FACTORIES:
        original = getattr(torch, name)

        @functools.wraps(original)
        def factory(*args, __original=original, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            return __original(*args, **kwargs)

        setattr(torch, name, factory)
    import importlib

    proxy = _TorchWithCpuTensor()
    for mod_name in _TENSOR_MODULES:
        mod = importlib.import_module(mod_name)
        if getattr(mod, "torch", None) is torch:
            mod.torch = proxy


def _shim_rng() -> None:
    # tensor_parallel/random.py:235-238 CudaRNGStatesTracker.add calls torch.cuda.get_rng_state /
    # torch.cuda.manual_seed; random.py:422 model_parallel_cuda_manual_seed calls
    # torch.cuda.manual_seed; random.py:55 _get_cuda_rng_state and random.py:81 _set_cuda_rng_state
    # are used by tracker.fork() (dropout, weight init under TP). On CPU the "CUDA" generator is the
    # CPU generator: forks still give each TP rank its own stream and restore the state after.
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # Seed the CPU generator directly: torch.manual_seed itself calls torch.cuda.manual_seed_all.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)


def _shim_synchronize() -> None:
    # pipeline_parallel/p2p_communication.py:242,398 `torch.cuda.synchronize()` after every PP
    # send/recv; on CPU (gloo) the collectives are already synchronous.
    torch.cuda.synchronize = lambda device=None: None


def _shim_tensor_type() -> None:
    # optimizer/optimizer.py:690, optimizer/distrib_optimizer.py:420 accept only params whose
    # `.type()` is 'torch.cuda.FloatTensor' / '...HalfTensor' / '...BFloat16Tensor';
    # optimizer/clip_grads.py:167 asserts grad.type() == 'torch.cuda.FloatTensor'.
    original = torch.Tensor.type

    @functools.wraps(original)
    def tensor_type(self, *args, **kwargs):
        if args or kwargs:  # a conversion, not a query
            return original(self, *args, **kwargs)
        name = original(self)
        if self.device.type == "cpu" and name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch.") :]
        return name

    torch.Tensor.type = tensor_type


def _shim_tensor_cuda() -> None:
    # models/common/language_module/language_module.py:244 `weight.data = weight.data.cuda()`
    # (tied embeddings with PP>1), tensor_parallel/data.py:84 broadcast_data.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


_SHIMS = {
    "current_device": _shim_current_device,
    "factories": _shim_factories,
    "rng": _shim_rng,
    "synchronize": _shim_synchronize,
    "tensor_type": _shim_tensor_type,
    "tensor_cuda": _shim_tensor_cuda,
}


def apply_cpu_shims(skip: tuple[str, ...] = ()) -> list[str]:
    """Patch torch so Megatron-Core runs on the CPU; a no-op when CUDA is available.

    Idempotent: each shim is applied at most once per process. `skip` leaves named shims out
    (used by the test that proves each is still needed). Returns the names applied by this call.
    """
    unknown = set(skip) - set(SHIM_NAMES)
    if unknown:
        raise ValueError(f"unknown CPU shim(s) {sorted(unknown)}; known: {SHIM_NAMES}")
    if torch.cuda.is_available():
        return []
    done = []
    for name in SHIM_NAMES:
        if name in skip or name in _applied:
            continue
        _SHIMS[name]()
        _applied.add(name)
        done.append(name)
    return done


def applied_shims() -> tuple[str, ...]:
    return tuple(n for n in SHIM_NAMES if n in _applied)
