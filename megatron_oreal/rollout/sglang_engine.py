"""Co-located SGLang rollout engine (GPU only; docs/design.md decision 5; the loop shape
and weight path follow slime's colocated mode, slime/backends/megatron_utils/actor.py and update_weight/).

One engine per group of `rollout.tensor_parallel_size` consecutive ranks, on those ranks' GPUs. The
group's first rank (the leader) runs SGLang as an HTTP server *subprocess* (`python -m
sglang.launch_server`), not the in-process `sglang.Engine`: the server lives in its own process
group, so a crash cannot take the trainer with it and a restart is kill + relaunch; the trainer
process keeps its own CUDA context, signal handlers and event loop (the in-process Engine runs an
asyncio loop and SGLang's tokenizer manager inside the caller); and every request is plain JSON that
a fake server on 127.0.0.1 can answer in the CPU tests. verl runs SGLang the same way (HTTP server +
adapter: verl/workers/rollout/sglang_rollout/async_sglang_server.py
and sglang_rollout.py `ServerAdapter`). Every method is collective over the group; only the leader talks HTTP
and it shares results (or the error) with the group, so all ranks fail together.

API used, sglang==0.5.21 (the newest release built against torch 2.13.0; 0.5.22+ need 2.14.1):
  server flags   srt/arg_groups/fields: model.py (model_path, dtype, load_format, json_model_override_args),
                 parallel.py:25-51 (nccl_port, tp_size), device.py:28,47 (base_gpu_id, random_seed),
                 schedule.py:27 (mem_fraction_static), exec_.py:55 (enable_memory_saver),
                 exec_.py:1010 (enable_deterministic_inference), serving.py:58-66 (skip_tokenizer_init, host, port)
  /health        srt/entrypoints/http_server.py:699-777: generates one token (SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION
                 defaults to on, srt/environ.py:347), so it is asked only at start-up; a possibly-released
                 engine is probed with /model_info (liveness: tokenizer manager only, :790) and /ready
                 (readiness: up and not paused, :692-696)
  /generate      http_server.py:910-962 + managers/io_struct.py GenerateReqInput; sampling dict keys are
                 srt/sampling/sampling_params.py:114-154 (top_k=-1 = off, sampling_seed); the reply per
                 request is {output_ids, meta_info: {finish_reason: {type: stop|length|abort, matched}}}
                 (managers/tokenizer_manager.py:2371-2378, managers/schedule_batch.py:270-331)
  /update_weights_from_tensor   http_server.py:1378-1397, io_struct.py:1926-1946; refused outside a session:
  /begin_weight_update, /end_weight_update   http_server.py:1400-1427, managers/scheduler_components/
                 weight_updater.py:217-226 (update outside a session), 290-316 (a second begin is refused)
  /release_memory_occupation, /resume_memory_occupation   http_server.py:1517-1538, tags per
                 managers/scheduler_components/weight_updater.py:318-395 (resuming an unreleased tag is a KeyError)
  /pause_generation, /continue_generation   http_server.py:1740-1764, io_struct.py:1826-1854
  /flush_cache   http_server.py:987-1002 (400 while requests run)
  /weights_checker  http_server.py:1540-1560, srt/utils/weight_checker.py:109-200 (snapshot/reset_tensors/compare)

On a CPU-only machine (`rollout.sglang_device=cpu`, the `sglang` test tier, tools/sglang_cpu/README.md) the
server runs with the CPU flags of `CPU_SERVER_FLAGS` from the interpreter `rollout.sglang_python`.
Per-sample `sampling_seed` is honoured only with `--enable-deterministic-inference` (sampling_batch_info.py:
143-158: without it the seeds are dropped); `rollout.sglang_deterministic` (default on) passes it. 0.5.21
refuses it with the torch_native attention backend, the only one that runs on CPU (arg_groups/overrides.py:
1039-1044), so on CPU it must be off and SGLang samples are not reproducible there.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from megatron_oreal.rollout.engine import GenOutput, SamplingParams

# The server on a CPU-only machine (reference: tools/sglang_cpu/README.md): no CUDA graphs, no overlap
# scheduler, torch-native attention and sampling. --enable-memory-saver cannot work there (its LD_PRELOAD
# needs libcuda), so release/resume run SGLang's code path but free nothing.
CPU_SERVER_FLAGS = ("--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
                    "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
                    "--disable-overlap-schedule")
# Released between phases. cuda_graph too: its pools are sizeable and SGLang releases all three
# when asked for no tags (weight_updater.py:326-327), as slime does (`rollout_manager.offload`,
# slime/ray/rollout.py).
RELEASE_TAGS = ("weights", "kv_cache", "cuda_graph")
# verl's way to run block-FP8 SGLang from a BF16 checkpoint (`ServerAdapter.__init__`,
# verl/workers/rollout/sglang_rollout/sglang_rollout.py, rollout.quantization=fp8): inject the
# DeepSeek-style quantization_config; the weights arrive by the first sync (sync/fp8.py layout).
FP8_QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


class SGLangError(RuntimeError):
    pass


class EngineRestarted(SGLangError):
    """The server died and was restarted: it holds the start-up checkpoint, not the synced weights."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_seed(seed: int, prompt: int, sample: int) -> int:
    """One 63-bit stream id per (call seed, prompt position, sample index) (rollout/engine.py
    docstring), mixed with splitmix64 so neighbouring seeds do not give neighbouring streams."""
    x = (seed * 0x9E3779B97F4A7C15 + prompt * 0xBF58476D1CE4E5B9 + sample * 0x94D049BB133111EB) & (2**64 - 1)
    for mult, shift in ((0xBF58476D1CE4E5B9, 30), (0x94D049BB133111EB, 27)):
        x = ((x ^ (x >> shift)) * mult) & (2**64 - 1)
    return (x ^ (x >> 31)) >> 1


def sglang_sampling_params(sampling: SamplingParams, max_new_tokens: int, seed: int) -> dict:
    """Our SamplingParams -> one SGLang sampling_params dict (sampling_params.py:114-154)."""
    return {
        "max_new_tokens": max_new_tokens,
        "temperature": sampling.temperature,  # 0 -> SGLang switches to top_k=1 (greedy), :217-220
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,  # ours 0 = off, SGLang's -1 = off
        "stop_token_ids": list(sampling.stop_token_ids) or None,
        "sampling_seed": seed,  # honoured with --enable-deterministic-inference (sampling_batch_info.py:143-157)
    }


def build_generate_request(prompts: list[list[int]], sampling: SamplingParams) -> tuple[dict, list[tuple[int, int]]]:
    """One /generate batch with each prompt repeated n times (one seed per sample, which SGLang's
    own `n` cannot give: its copies would share the request's seed). Returns the JSON body and the
    (prompt, sample) of each entry; prompts with no token budget left are not sent."""
    input_ids, params, slots = [], [], []
    for i, ids in enumerate(prompts):
        budget = sampling.budget(len(ids))
        if budget <= 0:
            continue
        for j in range(sampling.n):
            input_ids.append(list(ids))
            params.append(sglang_sampling_params(sampling, budget, sample_seed(sampling.seed, i, j)))
            slots.append((i, j))
    body = {"input_ids": input_ids, "sampling_params": params, "return_logprob": sampling.return_logprobs, "stream": False}
    return body, slots


def parse_generate_response(reply: Any, slots: list[tuple[int, int]], prompts: list[list[int]], sampling: SamplingParams) -> list[list[GenOutput]]:
    if isinstance(reply, dict):  # a batch of one comes back as a bare dict
        reply = [reply]
    if not isinstance(reply, list) or len(reply) != len(slots):
        got = len(reply) if isinstance(reply, list) else type(reply).__name__
        raise SGLangError(f"/generate returned {got} results for {len(slots)} requests")
    outputs: list[list[GenOutput | None]] = [[None] * sampling.n for _ in prompts]
    for (i, j), item in zip(slots, reply):
        finish = (item.get("meta_info") or {}).get("finish_reason") or {}
        kind = finish.get("type")
        if kind not in ("stop", "length"):
            raise SGLangError(f"/generate: prompt {i} sample {j} finished with {finish!r}")
        ids = [int(t) for t in item.get("output_ids", [])]
        matched = finish.get("matched")
        # Our contract ends a "stop" sample with its stop token (rollout/engine.py GenOutput).
        if kind == "stop" and isinstance(matched, int) and (not ids or ids[-1] != matched):
            ids.append(matched)
        logprobs = None
        if sampling.return_logprobs:
            logprobs = [float(lp) for lp, *_ in item["meta_info"].get("output_token_logprobs", [])]
        outputs[i][j] = GenOutput(ids, kind, logprobs)
    for i, ids in enumerate(prompts):
        if sampling.budget(len(ids)) <= 0:
            outputs[i] = [GenOutput([], "length", [] if sampling.return_logprobs else None) for _ in range(sampling.n)]
    return outputs  # type: ignore[return-value]


class SGLangClient:
    """Minimal JSON-over-HTTP client for one SGLang server (stdlib only)."""

    def __init__(self, base_url: str, timeout_s: float = 3600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def request(self, path: str, payload: Any = None, *, method: str = "POST", timeout: float | None = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout_s) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")[:500]
            raise SGLangError(f"{method} {self.base_url}{path}: HTTP {exc.code}: {text}") from None
        if not body:
            return None
        try:
            return json.loads(body)
        except json.JSONDecodeError:
            return body.decode(errors="replace")

    def _ok(self, path: str, timeout: float) -> bool:
        try:
            self.request(path, method="GET", timeout=timeout)
            return True
        except (SGLangError, OSError):
            return False

    def healthy(self, timeout: float = 5.0) -> bool:
        """Start-up only: 0.5.21's /health runs a one-token generation, which a released engine cannot."""
        return self._ok("/health", timeout)

    def live(self, timeout: float = 5.0) -> bool:
        """The HTTP server and tokenizer manager answer (touches no model memory: safe when released)."""
        return self._ok("/model_info", timeout)

    def ready(self, timeout: float = 5.0) -> bool:
        """Up and not paused: new requests would be served."""
        return self._ok("/ready", timeout)

    def begin_weight_update(self) -> None:
        self._expect_success("/begin_weight_update", {})

    def end_weight_update(self) -> None:
        self._expect_success("/end_weight_update", {})

    def _expect_success(self, path: str, payload: Any) -> None:
        reply = self.request(path, payload)
        if not (isinstance(reply, dict) and reply.get("success")):
            raise SGLangError(f"{path}: {reply!r}")

    def generate(self, body: dict) -> Any:
        return self.request("/generate", body)

    def update_weights_from_tensor(self, payloads: list[str], *, flush_cache: bool = False, weight_version: str | None = None) -> None:
        reply = self.request("/update_weights_from_tensor", {
            "serialized_named_tensors": payloads, "load_format": "flattened_bucket",
            "flush_cache": flush_cache, "weight_version": weight_version,
        })
        if not (isinstance(reply, dict) and reply.get("success")):
            raise SGLangError(f"/update_weights_from_tensor: {reply!r}")

    def release_memory_occupation(self, tags: Iterable[str]) -> None:
        self.request("/release_memory_occupation", {"tags": list(tags)})

    def resume_memory_occupation(self, tags: Iterable[str]) -> None:
        self.request("/resume_memory_occupation", {"tags": list(tags)})

    def pause_generation(self) -> None:
        self.request("/pause_generation", {"mode": "abort"})

    def continue_generation(self) -> None:
        self.request("/continue_generation", {})

    def flush_cache(self, retries: int = 20, wait_s: float = 0.5) -> None:
        """400 means requests are still running (http_server.py:997-1002): retry, as NeMo-RL does."""
        for attempt in range(retries):
            try:
                self.request("/flush_cache", method="POST")
                return
            except SGLangError:
                if attempt == retries - 1:
                    raise
                time.sleep(wait_s)

    def weights_checker(self, action: str, allow_quant_error: bool = False) -> Any:
        return self.request("/weights_checker", {"action": action, "allow_quant_error": allow_quant_error})


def server_command(model_path: str, *, tp_size: int, base_gpu_id: int, port: int, nccl_port: int,
                   mem_fraction_static: float, dtype: str = "bfloat16", seed: int = 0, fp8: bool = False,
                   extra_args: Iterable[str] = (), python: str = "", device: str = "cuda",
                   deterministic: bool = False) -> list[str]:
    """`extra_args` come last, so they override ours (argparse keeps the last value)."""
    cmd = [python or sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
           "--host", "127.0.0.1", "--port", str(port), "--nccl-port", str(nccl_port),
           "--tp-size", str(tp_size), "--dtype", dtype, "--random-seed", str(seed),
           "--skip-tokenizer-init"]  # token ids in and out; the trainer owns the tokenizer
    if device == "cpu":
        cmd += list(CPU_SERVER_FLAGS)
    else:
        cmd += ["--base-gpu-id", str(base_gpu_id), "--mem-fraction-static", str(mem_fraction_static),
                "--enable-memory-saver"]  # makes release/resume_memory_occupation work (exec_.py:55-58)
    if deterministic:  # per-sample sampling_seed is ignored without it (module docstring)
        cmd += ["--enable-deterministic-inference"]
    if fp8:
        cmd += ["--json-model-override-args", json.dumps({"quantization_config": FP8_QUANT_CONFIG}), "--load-format", "dummy"]
    return cmd + list(extra_args)


def _death_signal_setter() -> Callable[[], None] | None:
    """A preexec_fn that makes the server get SIGKILL when the thread that started it (the trainer's main
    thread) dies, even by SIGKILL: it lives in its own session, so nothing else would end it (SGLang's own
    subprocesses follow their launcher). prctl is resolved here, in the parent: the child between fork and
    exec must not import anything (another thread may hold the import lock)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class SGLangServer:
    """The leader's server subprocess: launch, wait for /health, kill the whole process group."""

    def __init__(self, cmd: list[str], client: SGLangClient, *, launch_timeout_s: float = 900.0,
                 log_path: str | None = None, env: dict | None = None) -> None:
        self.cmd, self.client, self.launch_timeout_s = cmd, client, launch_timeout_s
        self.log_path, self.env = log_path, env
        self.proc: subprocess.Popen | None = None
        self.launches = 0

    def start(self) -> None:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env=self.env, preexec_fn=_death_signal_setter())
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # the child holds its own copy
        self.launches += 1
        deadline = time.monotonic() + self.launch_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SGLangError(f"SGLang server exited with code {self.proc.returncode} during start-up "
                                  f"(log: {self.log_path or 'not kept'}; command: {' '.join(self.cmd)})")
            if self.client.healthy(timeout=2.0):
                return
            time.sleep(0.2)
        self.stop()
        raise SGLangError(f"SGLang server not healthy after {self.launch_timeout_s:.0f} s (log: {self.log_path})")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(self.proc.pid, sig)  # the server's own session: scheduler/detokenizer children too
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.proc = None


class SGLangEngine:
    """`RolloutEngine` backed by a co-located SGLang server; see the module docstring.

    `group`: gloo group of this engine's ranks (None when the engine has one rank), `leader_rank`:
    its first global rank. `command` overrides the launch command (tests start a fake server).
    `url`: attach to a server that is already running (launched and owned by someone else: never
    restarted or stopped here; the `sglang` test tier shares one server between tests and processes).
    """

    def __init__(self, model_or_hf_dir: Any, tokenizer: Any = None, rollout_cfg: Any = None, *,
                 group: Any = None, leader_rank: int = 0, port: int | None = None, gpu_id: int | None = None,
                 dtype: str | None = None, seed: int = 0, extra_args: Iterable[str] = (),
                 command: list[str] | None = None, log_path: str | None = None, launch_timeout_s: float | None = None,
                 request_timeout_s: float = 3600.0, url: str | None = None) -> None:
        if not isinstance(model_or_hf_dir, (str, Path)):
            raise TypeError(f"SGLangEngine needs an HF checkpoint folder, got {type(model_or_hf_dir).__name__}")
        self.tokenizer = tokenizer
        self.tp_size = getattr(rollout_cfg, "tensor_parallel_size", 1)
        self.fp8 = getattr(rollout_cfg, "fp8", False)
        self.max_restarts = getattr(rollout_cfg, "max_restarts", 3)
        self.bucket_bytes = getattr(rollout_cfg, "sync_bucket_mb", 512) << 20
        self.check_first_sync = getattr(rollout_cfg, "check_weights_after_first_sync", False)
        self.device = getattr(rollout_cfg, "sglang_device", "cuda")
        if launch_timeout_s is None:
            launch_timeout_s = getattr(rollout_cfg, "sglang_launch_timeout_s", 900.0)
        self.session_open = False  # a /begin_weight_update not yet closed by /end_weight_update
        self.group, self.leader_rank = group, leader_rank
        self.is_leader = group is None or dist.get_rank() == leader_rank
        # group None with tp_size > 1 is a leader-only engine: one trainer rank drives a server that
        # spans the GPUs of its model-parallel neighbours, and sends every SGLang rank its buffers.
        if group is not None and dist.get_world_size(group) != self.tp_size:
            raise ValueError(f"rollout.tensor_parallel_size={self.tp_size} but the engine group has "
                             f"{dist.get_world_size(group)} ranks")
        self.released: set[str] = set()
        self.synced = False  # the engine holds trainer weights (not only the start-up checkpoint)
        self.needs_resync = False
        self.restarts = 0
        self.server: SGLangServer | None = None
        self.client: SGLangClient | None = None
        error = None
        if self.is_leader and url:
            self.client = SGLangClient(url, timeout_s=request_timeout_s)
        elif self.is_leader:
            try:
                port = port or free_port()
                if gpu_id is None:
                    gpu_id = torch.cuda.current_device() if torch.cuda.is_available() else 0
                extra = list(getattr(rollout_cfg, "sglang_server_args", ()) or ()) + list(extra_args)
                cmd = command or server_command(
                    str(model_or_hf_dir), tp_size=self.tp_size, base_gpu_id=gpu_id, port=port,
                    nccl_port=free_port(), mem_fraction_static=getattr(rollout_cfg, "mem_fraction_static", 0.6),
                    # float32 on CPU: what the CPU engine and the trainer compute in there
                    dtype=dtype or ("float32" if self.device == "cpu" else "bfloat16"), seed=seed,
                    fp8=self.fp8, extra_args=extra, python=getattr(rollout_cfg, "sglang_python", ""),
                    device=self.device, deterministic=getattr(rollout_cfg, "sglang_deterministic", False))
                env = server_env(os.environ)
                if self.device == "cpu":  # SGLang's CPU code paths (sglang/srt/utils: is_cpu)
                    env["SGLANG_USE_CPU_ENGINE"] = "1"
                    bind = cpu_threads_bind(self.tp_size)
                    if bind and "SGLANG_CPU_OMP_THREADS_BIND" not in env:
                        env["SGLANG_CPU_OMP_THREADS_BIND"] = bind
                self.client = SGLangClient(f"http://127.0.0.1:{port}", timeout_s=request_timeout_s)
                self.server = SGLangServer(cmd, self.client, launch_timeout_s=launch_timeout_s, log_path=log_path,
                                           env=env)
                self.server.start()
                if self.check_first_sync:
                    if self.fp8:
                        raise ValueError("rollout.check_weights_after_first_sync needs real start-up weights; fp8 starts from dummy ones")
                    # Snapshot now: after a release the weights' contents are gone (no CPU backup).
                    self.client.weights_checker("snapshot")
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                if self.server is not None:
                    self.server.stop()
        self._raise_shared(error, "SGLang engine start-up failed")

    # group plumbing ------------------------------------------------------------------------------
    def _share(self, obj: Any) -> Any:
        if self.group is None:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.leader_rank, group=self.group)
        return box[0]

    def _raise_shared(self, error: str | None, what: str) -> None:
        error = self._share(error)
        if error:
            raise (EngineRestarted if error.startswith("EngineRestarted") else SGLangError)(f"{what}: {error}")

    def _leader_call(self, what: str, fn: Callable[[], Any], *, needs_synced_weights: bool = False) -> Any:
        """Run `fn` on the leader; if the server died, restart it (bounded) and retry once, unless
        `fn` needs the trainer's weights, which the restarted server no longer has."""
        result, error = None, None
        if self.is_leader:
            try:
                result = self._with_restart(fn, needs_synced_weights)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        self._raise_shared(error, what)
        return self._share(result)

    def _with_restart(self, fn: Callable[[], Any], needs_synced_weights: bool) -> Any:
        try:
            return fn()
        except (SGLangError, OSError):
            if self.server is None or (self.server.alive() and self.client.live()):
                raise  # the server is fine (or not ours to restart): the request itself failed
            self.restart()
            if needs_synced_weights and self.needs_resync:
                raise EngineRestarted("the SGLang server died and was restarted; re-sync the weights") from None
            return fn()

    def restart(self) -> None:
        if self.restarts >= self.max_restarts:
            raise SGLangError(f"SGLang server died again after {self.restarts} restarts (rollout.max_restarts)")
        self.restarts += 1
        self.server.stop()
        self.server.start()
        self.released.clear()
        self.session_open = False
        self.needs_resync = self.synced
        if self.check_first_sync and not self.synced:
            self.client.weights_checker("snapshot")  # the first sync's check compares with this server

    # RolloutEngine -------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[list[GenOutput]]:
        """Collective over the group: each rank passes its own prompts and gets their outputs."""
        per_rank = [prompts] if self.group is None else [None] * dist.get_world_size(self.group)
        if self.group is not None:
            dist.all_gather_object(per_rank, prompts, group=self.group)

        def run() -> list:
            if self.needs_resync:
                raise EngineRestarted("weights are stale after a restart; sync them before generating")
            results = []
            for rank_prompts in per_rank:  # seeds restart per rank: positions are per call (engine.py)
                body, slots = build_generate_request(rank_prompts, sampling)
                reply = self.client.generate(body) if slots else []
                results.append(parse_generate_response(reply, slots, rank_prompts, sampling))
            return results

        results = self._leader_call("SGLang generate", run, needs_synced_weights=True)
        return results[0 if self.group is None else dist.get_rank(self.group)]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.sync(named_tensors, bucket_bytes=self.bucket_bytes, check=self.check_first_sync and not self.synced)

    def sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, bucket_bytes: int, check: bool,
             **transport_kw: Any) -> Any:
        """sync_weights through SGLangIPCTransport (the runtime calls this too): CPU tensors as shared-memory
        files on a CPU server, and a failed sync closes the server's weight-update session. Returns the
        SyncMetrics. `transport_kw` (group, leader_rank) makes it a per-TP-rank sync (sync/transport.py)."""
        from megatron_oreal.sync import SGLangIPCTransport, sync_weights

        with cpu_tensor_sharing(self.device):
            try:
                metrics = sync_weights(named_tensors, SGLangIPCTransport(self, **transport_kw), fp8=self.fp8,
                                       bucket_bytes=bucket_bytes, check=check)
            except BaseException:
                self.abort_weight_sync()
                raise
        self.synced, self.needs_resync = True, False  # on every rank: the next check decision must agree
        return metrics

    def release_memory(self) -> None:
        def run() -> None:
            todo = [t for t in RELEASE_TAGS if t not in self.released]
            if todo:
                self.client.release_memory_occupation(todo)
                self.released.update(todo)
        self._leader_call("SGLang release_memory_occupation", run)

    def resume_memory(self, tags: Iterable[str] = RELEASE_TAGS) -> None:
        wanted = list(tags)

        def run() -> None:
            todo = [t for t in wanted if t in self.released]  # resuming an unreleased tag is a KeyError there
            if todo:
                self.client.resume_memory_occupation(todo)
                self.released.difference_update(todo)
        self._leader_call("SGLang resume_memory_occupation", run)

    def health(self) -> bool:
        """Liveness while released (a /health probe would generate), readiness otherwise. Collective."""
        ok = self.is_leader and (self.server is None or self.server.alive()) and (
            self.client.live() if self.released else self.client.ready())
        return bool(self._share(ok))

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    # weight-sync hooks (leader only; called by sync.SGLangIPCTransport) --------------------------
    def begin_weight_sync(self, check: bool = False) -> None:
        """Weights memory back (KV cache stays released: peak memory is weights + one bucket, the
        two-stage resume of slime's train.py: `onload_weights`, sync, then `onload_kv`), nothing running,
        cache empty."""
        if self.server is not None and not self.server.alive():
            self.restart()
        if "weights" in self.released:
            self.client.resume_memory_occupation(["weights"])
            self.released.discard("weights")
        self.client.pause_generation()
        self.client.flush_cache()
        if check:  # scramble, so that only what the sync writes can match the start-up snapshot
            self.client.weights_checker("reset_tensors")
        # 0.5.21 loads tensors only inside a session (weight_updater.py:217-226)
        self.client.begin_weight_update()
        self.session_open = True

    def update_weights_from_tensor(self, payloads: list[str]) -> None:
        self.client.update_weights_from_tensor(payloads, flush_cache=False)

    def end_weight_sync(self) -> None:
        self.client.end_weight_update()
        self.session_open = False
        self.client.flush_cache()  # cached prefixes were computed with the old weights
        # Memory first, then requests: continuing with the KV cache (or CUDA graphs) still released
        # would let the scheduler run into freed pools.
        rest = [t for t in RELEASE_TAGS if t in self.released]
        if rest:
            self.client.resume_memory_occupation(rest)
            self.released.difference_update(rest)
        self.client.continue_generation()
        self.synced, self.needs_resync = True, False

    def abort_weight_sync(self) -> None:
        """After a failed sync (any rank; no collectives here): close the session so that the next
        sync can open one, and refuse to generate until a sync completes (the weights are a mix)."""
        self.needs_resync = True
        if not self.is_leader or (self.server is not None and not self.server.alive()):
            return
        try:
            if self.session_open:
                self.client.end_weight_update()
                self.session_open = False
        except (SGLangError, OSError) as exc:
            print(f"SGLang: closing the weight-update session after a failed sync: {exc}", file=sys.stderr)

    def compare_weights_with_snapshot(self) -> list[str]:
        try:
            self.client.weights_checker("compare", allow_quant_error=self.fp8)
        except SGLangError as exc:
            return [str(exc)]
        return []


# torchrun's variables, inherited by the trainer: a server that sees TORCHELASTIC_USE_AGENT_STORE joins
# torch's rendezvous as a client of the *trainer's* agent store at its own --nccl-port, where nobody
# listens, and hangs in init_process_group (seen on CPU: py-spy in rendezvous.py _create_c10d_store).
_LAUNCHER_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                  "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE")


def server_env(environ: dict) -> dict:
    """The trainer's environment minus torchrun's rendezvous variables: the server is its own job."""
    return {k: v for k, v in environ.items() if k not in _LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")}


def cpu_threads_bind(tp_size: int, cores: Iterable[int] | None = None) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND for a CPU server with tp_size ranks: our cores split into tp_size
    contiguous ranges ("0-3|4-7"). Without it 0.5.21 allows one rank per NUMA node only
    (srt/utils/numa_utils.py:449-462), so TP=2 on a one-node machine needs it. "" for TP=1 or when the
    cores do not split evenly into contiguous ranges (SGLang then says what to set)."""
    if tp_size <= 1:
        return ""
    cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
    if len(cores) < tp_size or len(cores) % tp_size:
        return ""
    k, parts = len(cores) // tp_size, []
    for i in range(tp_size):
        chunk = cores[i * k:(i + 1) * k]
        if chunk[-1] - chunk[0] != k - 1:
            return ""
        parts.append(str(chunk[0]) if k == 1 else f"{chunk[0]}-{chunk[-1]}")
    return "|".join(parts)


class cpu_tensor_sharing:
    """On a CPU server, tensors cross as shared-memory files: torch's default fd strategy would need
    the server to share our multiprocessing authkey. CUDA tensors travel as IPC handles either way."""

    def __init__(self, device: str) -> None:
        self.device, self.old = device, None

    def __enter__(self) -> None:
        if self.device == "cpu":
            import torch.multiprocessing as tmp

            self.old = tmp.get_sharing_strategy()
            tmp.set_sharing_strategy("file_system")

    def __exit__(self, *exc: Any) -> None:
        if self.old is not None:
            import torch.multiprocessing as tmp

            tmp.set_sharing_strategy(self.old)


def make_engine_group(tp_size: int) -> tuple[Any, int]:
    """(gloo group of this rank's engine, its leader's global rank): engines take consecutive ranks.
    Collective over the world (every rank creates every group, as `dist.new_group` requires)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if tp_size != 1:
            raise ValueError(f"rollout.tensor_parallel_size={tp_size} needs {tp_size} ranks; the job has 1")
        return None, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    if tp_size == 1:
        return None, rank
    if world % tp_size:
        raise ValueError(f"rollout.tensor_parallel_size={tp_size} does not divide the world size {world}")
    mine = None
    for start in range(0, world, tp_size):
        g = dist.new_group(list(range(start, start + tp_size)), backend="gloo")
        if start <= rank < start + tp_size:
            mine = (g, start)
    return mine
