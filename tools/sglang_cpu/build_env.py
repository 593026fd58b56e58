"""Build (or find) the CPU SGLang 0.5.21 environment the `sglang` tests run their servers from.

    python tools/sglang_cpu/build_env.py          # builds if needed; prints the env's python on stdout
    python tools/sglang_cpu/build_env.py --check  # prints it only if already built (exit 1 if not)

Progress goes to stderr, so `PY=$(python tools/sglang_cpu/build_env.py)` works.

Why a separate environment: sglang pins transformers 5.12.1 and pulls ~3 GB (triton, xgrammar...), and
0.5.21 does not install on a CPU-only machine as published (see tools/sglang_cpu/README.md). The env is
cached OUTSIDE the checkout, keyed by the hash of the pinned lock and of this file, so a fresh CI clone
reuses it while the machine still has it and builds it when not. The key covers the lock, the sgl_kernel
stand-in copied into the env, and RECIPE (bump it when a change here changes what gets built; log-only
edits of this file do not force a 13-minute rebuild). The build goes into a temporary
directory that is renamed into place only when complete: a half-built env is never reused.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCK = HERE / "requirements-sglang-cpu.txt"
STANDIN = HERE / "stubs" / "sgl_kernel" / "__init__.py"  # copied into the env: it is part of the key
SGLANG = "sglang==0.5.21"
RECIPE = "v1: venv; torch; lock --no-deps; sglang --no-deps; torchvision nms/qnms guard; sgl_kernel stand-in"
TORCH = "torch==2.13.0"  # on every pip command: anything unpinned would pull a multi-GB CUDA torch

# PyPI's torchvision 0.28.0 registers fake kernels for torchvision::nms/qnms unconditionally; without its
# compiled ops (CUDA build, no CUDA here) that import fails. Guard them like its other meta registrations.
_TV_GUARD = "(torch.library.register_fake({op}) if torchvision.extension._has_ops() else (lambda f: f))"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "megatron-oreal"


def env_key() -> str:
    h = hashlib.sha256()
    for f in (LOCK, STANDIN):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update((SGLANG + TORCH + RECIPE + _TV_GUARD).encode())
    h.update(f"python{sys.version_info[0]}.{sys.version_info[1]}".encode())  # the lock's wheels are per version
    return h.hexdigest()[:12]


def env_dir() -> Path:
    return cache_root() / f"sglang-cpu-{env_key()}"


def env_python(d: Path | None = None) -> Path:
    return (d or env_dir()) / "bin" / "python"


def is_built(d: Path | None = None) -> bool:
    d = d or env_dir()
    return (d / ".complete").is_file() and env_python(d).exists()


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run(cmd: list[str]) -> None:
    _say("+ " + " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _run_env(cmd: list[str], env: dict) -> None:
    _say("+ " + " ".join(cmd))
    subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)


def _guard_torchvision(site: Path) -> None:
    f = site / "torchvision" / "_meta_registrations.py"
    text = f.read_text()
    for op in ('"torchvision::nms"', '"torchvision::qnms"'):
        old = f"@torch.library.register_fake({op})"
        if old not in text:
            raise SystemExit(f"build_env: {f}: expected line {old!r} not found (torchvision changed?)")
        text = text.replace(old, "@" + _TV_GUARD.format(op=op))
    f.write_text(text)


def build() -> Path:
    final = env_dir()
    if is_built(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    for old in final.parent.glob(f".{final.name}.tmp-*"):  # failed builds, kept for a post-mortem
        if not _pid_alive(int(old.name.rsplit("-", 1)[1])):
            shutil.rmtree(old, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    t0 = time.time()
    try:
        _run([sys.executable, "-m", "venv", str(tmp)])
        py = str(env_python(tmp))
        pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]
        _run(pip + [TORCH])
        _run(pip + [TORCH, "-r", str(LOCK)])
        _run(pip + [TORCH, SGLANG])
        site = Path(subprocess.check_output(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
        _guard_torchvision(site)
        shutil.copytree(STANDIN.parent, site / "sgl_kernel")
        # Smoke: the server's entry module and the CPU memory pool (which imports our stand-in) load.
        env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1")
        env.pop("PYTHONPATH", None)
        _run_env([py, "-c", "import sglang.srt.entrypoints.http_server, sglang.srt.mem_cache.allocation"], env)
        (tmp / ".complete").write_text(f"built in {time.time() - t0:.0f} s\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another build won the race: use its complete env
            if not is_built(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        _say(f"build_env: FAILED after {time.time() - t0:.0f} s; partial env left in {tmp} "
             "(never used; removed by the next build)")
        raise
    _say(f"build_env: built {final} in {time.time() - t0:.0f} s")
    return final


def main() -> int:
    if sys.argv[1:] == ["--check"]:
        if not is_built():
            _say(f"build_env: not built: {env_dir()}")
            return 1
        print(env_python())
        return 0
    d = build()
    print(env_python(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
