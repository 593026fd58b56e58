"""The `sglang` tier: real SGLang 0.5.21 servers on CPU, run by `make test-sglang` (tools/sglang_cpu/README.md).

One server per test module (a start costs ~2.5 min on 2 cores), launched through our own SGLangEngine with
the CPU flags, on 127.0.0.1, its log next to the test's files; the module's tests and their torchrun workers
attach to it by URL. At the end the server's process group and any torch_shm_manager this process started
(CPU tensors cross to the server as shared-memory files) are killed.
"""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import pytest

from helpers.sglang_cpu import TINY, rollout_cfg


def _children_named(name: str) -> list[int]:
    """Our own direct children called `name` (the torch_shm_manager torch forks for file_system sharing)."""
    me, pids = os.getpid(), []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if comm == name and int(rest[1]) == me:
            pids.append(int(d))
    return pids


@pytest.fixture(scope="module")
def sglang_engine(tmp_path_factory):
    """(engine owning a real server on the tiny model, its log path, start-up seconds)."""
    from megatron_oreal.rollout.sglang_engine import SGLangEngine

    log = tmp_path_factory.mktemp("sglang_server") / "server.log"
    t0 = time.perf_counter()
    try:
        eng = SGLangEngine(str(TINY), None, rollout_cfg(), log_path=str(log))
    except Exception as exc:
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"
        pytest.fail(f"the real SGLang server did not start: {exc}\n--- server log tail ---\n{tail}", pytrace=False)
    started = time.perf_counter() - t0
    print(f"\n[sglang] server start: {started:.1f} s (log {log})", flush=True)
    yield SimpleNamespace(engine=eng, log=log, start_s=started, url=eng.client.base_url)
    eng.close()
    for pid in _children_named("torch_shm_manager"):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
