"""Fused CPU kernels in plain C (cpu_kernels.c), compiled on first use with the system C compiler.

Why: on the CPU path the tiny model's step is bound by memory passes, not arithmetic. A decode step's
attention in PyTorch is about ten ops per layer (rotate q and k, append k and v to the cache, two
batched matmuls, mask, softmax), each a full pass over its operands; `decode_attention` does it in one
pass per row. Measured on the `grpo` rung (in process, calls alternating with the PyTorch code):
generate 0.80x, the update 0.88x; one layer's slot attention forward + backward 5.2 -> 3.3 ms.

How: `kernels()` compiles cpu_kernels.c with `cc -O3 -march=native -fopenmp -shared` into a cache
(`$MEGATRON_OREAL_CACHE/native` or `~/.cache/megatron-oreal/native`, keyed by the source, the
compiler, its flags and this CPU's model and flags, so an NFS home shared by different CPUs keeps one
build per CPU kind) and loads it with ctypes: about 1 s the first time, a dlopen afterwards.
No PyTorch headers are involved, so the build does not depend on the torch version. `-fopenmp` links
`libgomp.so.1`, which resolves to the copy torch has already loaded, so the kernels share torch's
OpenMP threads (and `torch.set_num_threads`).

Fallback: with no compiler, a failed build or `MEGATRON_OREAL_NATIVE=0`, `kernels()` returns None
(logging why once) and every caller keeps its PyTorch code, which computes the same values up to
float round-off (tests/unit/test_native.py compares them).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-std=gnu11"]

_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
# name -> argument types, as declared in cpu_kernels.c
_SIGNATURES = {
    "decode_attention": [_P, _L, _P, _P, _P, _P, _P, _L, _P, _I, _I, _I, _I, _I, _I, _P, _I],
    "rms_norm_forward": [_P, _P, _F, _P, _P, _L, _I],
    "rms_norm_backward": [_P, _P, _P, _P, _P, _P, _P, _I, _L, _I],
    "swiglu_forward": [_P, _P, _L, _I],
    "swiglu_backward": [_P, _P, _P, _L, _I],
    "rope_rotate": [_P, _L, _P, _P, _F, _P, _L, _L, _I, _I],
    "slot_attention_forward": [_P, _L, _P, _P, _P, _P, _I, _I, _I, _I, _I, _F, _P, _P, _P, _I],
    "slot_attention_backward": [_P, _L, _P, _P, _P, _P, _I, _I, _I, _I, _I, _F, _P, _P, _P, _P, _P, _I],
    "slot_scratch_floats": [_I, _I],
}
_RESTYPES = {"slot_scratch_floats": ctypes.c_long}

_loaded: list = []  # [lib or None] once tried


def cache_dir() -> Path:
    root = os.environ.get("MEGATRON_OREAL_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "megatron-oreal"
    return base / "native"


def _cpu_identity() -> str:
    """Model name and feature flags of this CPU (the build uses -march=native)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def build(cc: str, out_dir: Path) -> Path:
    """Compile cpu_kernels.c into out_dir (atomically: a temporary name, then a rename) and return the
    library's path; an existing build with the same key is reused. Raises RuntimeError with the
    compiler's message when the build fails."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(FLAGS), _cpu_identity()]).encode())
    lib = out_dir / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} {' '.join(FLAGS)} {SOURCE} failed:\n{done.stderr.strip()}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def kernels():
    """The loaded kernel library (ctypes.CDLL with typed functions), or None when unavailable."""
    if _loaded:
        return _loaded[0]
    lib = None
    if os.environ.get("MEGATRON_OREAL_NATIVE", "1") == "0":
        log.info("native CPU kernels off (MEGATRON_OREAL_NATIVE=0): using the PyTorch code")
    elif (cc := _compiler()) is None:
        log.warning("native CPU kernels unavailable: no C compiler (cc, or $CC) on PATH; using the PyTorch "
                    "code (slower on the CPU path)")
    else:
        try:
            lib = ctypes.CDLL(str(build(cc, cache_dir())))
            for name, argtypes in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = argtypes, _RESTYPES.get(name)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            log.warning("native CPU kernels unavailable (%s); using the PyTorch code", e)
            lib = None
    _loaded.append(lib)
    return lib


def reset() -> None:
    """Forget the loaded library so the next `kernels()` decides again (tests switch the env variable)."""
    _loaded.clear()
