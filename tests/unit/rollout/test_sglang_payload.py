"""SGLang engine on CPU: request payloads, response parsing, and the HTTP engine against a fake
SGLang server subprocess on 127.0.0.1 (generate, weight sync, release/resume, restart on death).
When sglang is installed, the payloads are also validated by SGLang's own classes.

Run as a script (`python test_sglang_payload.py serve PORT LOG DIR decode|count`) this file *is* the
fake server (stdlib only unless it decodes weight payloads, which needs torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

POISON = 999_999  # a prompt starting with this token kills the fake server (once per marker file)
ABORT = 888_888  # ... makes it answer finish_reason "abort"


# ------------------------------------------------------------------------------------ fake server
def _fake_generate(body: dict) -> list:
    out = []
    for ids, sp in zip(body["input_ids"], body["sampling_params"]):
        m = sp["max_new_tokens"]
        toks = [100 + (sp["sampling_seed"] >> (8 * k)) % 50 for k in range(min(m, 4))]
        stops = sp.get("stop_token_ids") or []
        if len(toks) < m and stops:
            # real SGLang keeps the stop token in output_ids; leave it out for prompts starting
            # with 7 so the client's re-append path is exercised too
            if ids[0] != 7:
                toks.append(stops[0])
            finish = {"type": "stop", "matched": stops[0]}
        else:
            finish = {"type": "length", "length": m}
        meta = {"finish_reason": finish, "prompt_tokens": len(ids)}
        if body.get("return_logprob"):
            meta["output_token_logprobs"] = [[-0.25 * (k + 1), t, None] for k, t in enumerate(toks)]
        out.append({"output_ids": toks, "meta_info": meta})
    return out


def _fake_update(body: dict) -> dict:
    import torch

    from megatron_oreal.sync.buckets import unflatten
    from megatron_oreal.sync.transport import deserialize_payload

    per_rank = []  # what SGLang TP rank i would load: payload i
    for payload in body["serialized_named_tensors"]:
        obj = deserialize_payload(payload)
        per_rank.append({name: [str(t.dtype), list(t.shape), hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()]
                         for name, t in unflatten(obj["flattened_tensor"], obj["metadata"])})
    return per_rank


def serve(port: int, log_path: str, state_dir: str, decode: bool) -> None:
    released: set[str] = set()
    session = {"open": False}  # sglang 0.5.21's weight-update session (weight_updater.py:217-316)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _reply(self, code: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path in ("/health", "/model_info", "/ready"):
                with open(log_path + ".get", "a") as f:  # probes: kept apart from the POST choreography
                    f.write(json.dumps({"path": self.path}) + "\n")
                self._reply(200, None)
            else:
                self._reply(404, {"error": self.path})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
            entry = {"path": self.path, "pid": os.getpid()}
            code, reply = 200, None
            if self.path == "/generate":
                if any(ids and ids[0] == ABORT for ids in body["input_ids"]):
                    self._reply(200, [{"output_ids": [], "meta_info": {"finish_reason": {"type": "abort", "message": "fake abort"}}}
                                      for _ in body["input_ids"]])
                    return
                if any(ids and ids[0] == POISON for ids in body["input_ids"]):
                    marker = os.path.join(state_dir, "poisoned")
                    if not os.path.exists(marker):
                        open(marker, "w").close()
                        os._exit(3)  # die mid-request, as a crashed scheduler would
                reply = _fake_generate(body)
                entry["n"] = len(body["input_ids"])
            elif self.path == "/update_weights_from_tensor" and not session["open"]:
                # 0.5.21 answers success=False with HTTP 400 (http_server.py:1378-1397)
                code, reply = 400, {"success": False, "message": "update_weights_from_tensor must run between "
                                    "begin_weight_update() and end_weight_update()"}
            elif self.path in ("/begin_weight_update", "/end_weight_update"):
                want = self.path == "/end_weight_update"  # end needs an open session, begin a closed one
                if session["open"] != want:
                    code, reply = 400, {"success": False, "message": "session already open" if not want
                                        else "no weight-update session is open"}
                else:
                    session["open"] = not want
                    reply = {"success": True, "message": "Success"}
            elif self.path == "/update_weights_from_tensor" and os.path.exists(os.path.join(state_dir, "fail_update")):
                os.remove(os.path.join(state_dir, "fail_update"))  # one failed load, as a bad tensor would give
                code, reply = 400, {"success": False, "message": "fake load failure"}
            elif self.path == "/update_weights_from_tensor":
                entry["load_format"], entry["flush_cache"] = body["load_format"], body["flush_cache"]
                # decoding imports torch (seconds on a loaded machine): only where a test reads it
                entry["per_rank"] = _fake_update(body) if decode else len(body["serialized_named_tensors"])
                entry["tensors"] = entry["per_rank"][0] if decode else None
                reply = {"success": True, "message": "ok"}
            elif self.path in ("/release_memory_occupation", "/resume_memory_occupation"):
                tags = body["tags"]
                entry["tags"] = tags
                if self.path.startswith("/resume") and not set(tags) <= released:
                    code, reply = 400, {"error": f"KeyError {sorted(set(tags) - released)}"}
                else:
                    (released.update if self.path.startswith("/release") else released.difference_update)(tags)
            elif self.path == "/weights_checker":
                entry["action"] = body["action"]
                reply = {"success": True, "message": ""}
            elif self.path in ("/pause_generation", "/continue_generation", "/flush_cache"):
                entry["body"] = body
            else:
                code, reply = 404, {"error": self.path}
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            self._reply(code, reply)

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


# ------------------------------------------------------------------------------------ helpers
def _log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def fake_engine(tmp_path):
    from megatron_oreal.rollout.sglang_engine import SGLangEngine, free_port

    import torch.multiprocessing

    # CPU tensors cross to the fake server as shared-memory files; the default fd strategy needs the
    # receiver to share our multiprocessing authkey (CUDA tensors go as IPC handles either way).
    old = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    engines = []

    def make(**cfg):
        port = free_port()
        log = str(tmp_path / "requests.jsonl")
        mode = "decode" if cfg.pop("decode", False) else "count"
        cmd = [sys.executable, os.path.abspath(__file__), "serve", str(port), log, str(tmp_path), mode]
        rollout = SimpleNamespace(tensor_parallel_size=1, fp8=False, max_restarts=cfg.pop("max_restarts", 2),
                                  sync_bucket_mb=1, check_weights_after_first_sync=cfg.pop("check", False),
                                  mem_fraction_static=0.5)
        eng = SGLangEngine(str(tmp_path), None, rollout, port=port, command=cmd, launch_timeout_s=60, **cfg)
        engines.append(eng)
        return eng, log

    yield make
    for eng in engines:
        eng.close()
    torch.multiprocessing.set_sharing_strategy(old)


# ------------------------------------------------------------------------------------ pure payload tests
def test_generate_request_maps_our_sampling_params():
    from megatron_oreal.rollout.engine import SamplingParams
    from megatron_oreal.rollout.sglang_engine import build_generate_request, sample_seed

    sp = SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=10, stop_token_ids=(5, 6),
                        seed=11, max_total_length=12, return_logprobs=True)
    body, slots = build_generate_request([[1, 2, 3], [4] * 12, [8, 9]], sp)
    assert slots == [(0, 0), (0, 1), (2, 0), (2, 1)]  # prompt 1 has no budget left: not sent
    assert body["input_ids"] == [[1, 2, 3], [1, 2, 3], [8, 9], [8, 9]]
    assert body["return_logprob"] is True and body["stream"] is False
    p0 = body["sampling_params"][0]
    assert p0 == {"max_new_tokens": 9, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "stop_token_ids": [5, 6],
                  "sampling_seed": sample_seed(11, 0, 0)}
    assert body["sampling_params"][2]["max_new_tokens"] == 10  # min(10, 12 - 2)
    seeds = [p["sampling_seed"] for p in body["sampling_params"]]
    assert len(set(seeds)) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(11, 0, 1) != sample_seed(12, 0, 1) and sample_seed(11, 0, 1) == seeds[1]
    greedy, _ = build_generate_request([[1]], SamplingParams(top_k=5, temperature=0.0))
    assert greedy["sampling_params"][0]["top_k"] == 5 and greedy["sampling_params"][0]["stop_token_ids"] is None


def test_server_command_per_device():
    from megatron_oreal.rollout.sglang_engine import CPU_SERVER_FLAGS, server_command

    kw = dict(tp_size=2, base_gpu_id=4, port=1, nccl_port=2, mem_fraction_static=0.5, seed=3)
    gpu = server_command("/m", **kw, deterministic=True)
    assert gpu[1:3] == ["-m", "sglang.launch_server"] and "--enable-memory-saver" in gpu
    assert gpu[gpu.index("--base-gpu-id") + 1] == "4" and "--enable-deterministic-inference" in gpu
    assert not set(CPU_SERVER_FLAGS) & {"--device", "--attention-backend"} & set(gpu)
    cpu = server_command("/m", **kw, python="/env/bin/python", device="cpu", dtype="float32",
                         extra_args=["--context-length", "128"])
    assert cpu[0] == "/env/bin/python" and cpu[-2:] == ["--context-length", "128"]  # extra args last: they override
    assert cpu[cpu.index("--device") + 1] == "cpu" and cpu[cpu.index("--attention-backend") + 1] == "torch_native"
    assert "--enable-memory-saver" not in cpu and "--base-gpu-id" not in cpu  # needs libcuda / a GPU
    assert "--enable-deterministic-inference" not in cpu and cpu[cpu.index("--dtype") + 1] == "float32"


def test_server_env_drops_torchruns_rendezvous_variables():
    from megatron_oreal.rollout.sglang_engine import server_env

    env = server_env({"MASTER_PORT": "1", "RANK": "0", "TORCHELASTIC_USE_AGENT_STORE": "True", "PATH": "/bin",
                      "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "0,1"}


def test_cpu_threads_bind_splits_our_cores_per_tp_rank():
    from megatron_oreal.rollout.sglang_engine import cpu_threads_bind

    assert cpu_threads_bind(2, [0, 1]) == "0|1"  # what TP=2 on this 2-core machine ran with
    assert cpu_threads_bind(2, range(8)) == "0-3|4-7"
    assert cpu_threads_bind(1, [0, 1]) == "" and cpu_threads_bind(2, [0, 1, 2]) == ""
    assert cpu_threads_bind(2, [0, 2, 4, 5]) == ""  # not contiguous: left to SGLang's own message


def test_parse_generate_response():
    from megatron_oreal.rollout.engine import SamplingParams
    from megatron_oreal.rollout.sglang_engine import SGLangError, parse_generate_response

    sp = SamplingParams(n=2, max_new_tokens=3, stop_token_ids=(2,), max_total_length=5, return_logprobs=True)
    prompts = [[1, 1], [1] * 5]
    reply = [
        {"output_ids": [7, 2], "meta_info": {"finish_reason": {"type": "stop", "matched": 2},
                                             "output_token_logprobs": [[-0.1, 7, None], [-0.2, 2, None]]}},
        {"output_ids": [7], "meta_info": {"finish_reason": {"type": "stop", "matched": 2},
                                          "output_token_logprobs": [[-0.3, 7, None]]}},
    ]
    out = parse_generate_response(reply, [(0, 0), (0, 1)], prompts, sp)
    assert [o.token_ids for o in out[0]] == [[7, 2], [7, 2]]  # the missing stop token is appended
    assert out[0][0].logprobs == [-0.1, -0.2] and out[0][0].finish_reason == "stop"
    assert [(o.token_ids, o.finish_reason) for o in out[1]] == [([], "length"), ([], "length")]
    with pytest.raises(SGLangError, match="prompt 0 sample 1 finished with .*abort"):
        bad = [reply[0], {"output_ids": [], "meta_info": {"finish_reason": {"type": "abort", "message": "oom"}}}]
        parse_generate_response(bad, [(0, 0), (0, 1)], prompts, sp)
    with pytest.raises(SGLangError, match="returned 1 results for 2 requests"):
        parse_generate_response(reply[:1], [(0, 0), (0, 1)], prompts, sp)


# ------------------------------------------------------------------------------------ fake-server tests
def test_engine_against_fake_server(fake_engine):
    import torch

    from megatron_oreal.rollout.engine import SamplingParams
    from megatron_oreal.rollout.sglang_engine import sample_seed

    eng, log = fake_engine(decode=True)
    assert eng.health()
    sp = SamplingParams(n=3, max_new_tokens=6, stop_token_ids=(0,), seed=4, return_logprobs=True)
    out = eng.generate([[5, 1], [7, 1]], sp)
    assert [len(o) for o in out] == [3, 3]
    expect = [100 + (sample_seed(4, 1, 2) >> (8 * k)) % 50 for k in range(4)] + [0]
    assert out[1][2].token_ids == expect and out[1][2].finish_reason == "stop"  # stop re-appended (prompt 7)
    assert out[0][0].logprobs == [-0.25, -0.5, -0.75, -1.0, -1.25]
    assert out[0][1].token_ids != out[0][0].token_ids  # different seeds per sample

    # the training-phase choreography: release everything, then a sync, then everything is back
    eng.release_memory()
    g = torch.Generator().manual_seed(0)
    weights = {"model.layers.0.mlp.up_proj.weight": torch.randn(600, 1000, generator=g).to(torch.bfloat16),
               "model.norm.weight": torch.randn(500, generator=g),
               "model.embed_tokens.weight": torch.randn(300, 500, generator=g).to(torch.bfloat16)}
    eng.update_weights(weights.items())
    paths = [e["path"] for e in _log(log)]
    sync = paths[paths.index("/release_memory_occupation"):]
    # the updates inside a session; the KV cache and CUDA graphs back before generation continues
    assert sync == ["/release_memory_occupation", "/resume_memory_occupation", "/pause_generation", "/flush_cache",
                    "/begin_weight_update", "/update_weights_from_tensor", "/update_weights_from_tensor",
                    "/update_weights_from_tensor", "/end_weight_update", "/flush_cache", "/resume_memory_occupation",
                    "/continue_generation"]
    entries = _log(log)
    tags = [e["tags"] for e in entries if "tags" in e]
    assert tags == [["weights", "kv_cache", "cuda_graph"], ["weights"], ["kv_cache", "cuda_graph"]]
    updates = [e for e in entries if e["path"] == "/update_weights_from_tensor"]
    assert all(u["load_format"] == "flattened_bucket" and u["flush_cache"] is False for u in updates)
    # 1 MiB buckets: up_proj (1.2 MB bf16) alone, then norm (fp32) + embed (bf16): 2 dtype buffers
    assert [sorted(u["tensors"]) for u in updates] == [["model.layers.0.mlp.up_proj.weight"], ["model.norm.weight"],
                                                       ["model.embed_tokens.weight"]]
    got = {k: v for u in updates for k, v in u["tensors"].items()}
    for name, t in weights.items():
        assert got[name][2] == hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest(), name
    # resume with nothing released sends nothing (the server would answer KeyError)
    before = len(_log(log))
    eng.resume_memory()
    assert len(_log(log)) == before


def test_fake_server_refuses_updates_outside_a_session(fake_engine):
    """Like sglang 0.5.21: an update, an end or a second begin out of turn is a 400 with success=False."""
    from megatron_oreal.rollout.sglang_engine import SGLangError

    eng, log = fake_engine()
    c = eng.client
    with pytest.raises(SGLangError, match="HTTP 400.*must run between begin_weight_update"):
        c.update_weights_from_tensor(["x"])
    with pytest.raises(SGLangError, match="HTTP 400.*no weight-update session"):
        c.end_weight_update()
    c.begin_weight_update()
    with pytest.raises(SGLangError, match="HTTP 400.*already open"):
        c.begin_weight_update()
    c.end_weight_update()


def test_failed_sync_closes_the_session_and_the_next_sync_works(fake_engine, tmp_path):
    import torch

    from megatron_oreal.rollout.engine import SamplingParams
    from megatron_oreal.rollout.sglang_engine import EngineRestarted

    eng, log = fake_engine()
    open(tmp_path / "fail_update", "w").close()
    with pytest.raises(RuntimeError, match="fake load failure"):
        eng.update_weights([("model.norm.weight", torch.ones(4))])
    assert not eng.session_open and eng.needs_resync
    assert [e["path"] for e in _log(log)][-3:] == ["/begin_weight_update", "/update_weights_from_tensor",
                                                  "/end_weight_update"]
    with pytest.raises(EngineRestarted, match="stale"):  # half-loaded weights are never sampled from
        eng.generate([[1, 2]], SamplingParams(n=1, max_new_tokens=2))
    eng.update_weights([("model.norm.weight", torch.ones(4))])
    assert eng.generate([[1, 2]], SamplingParams(n=1, max_new_tokens=2))[0][0].finish_reason == "length"


def test_health_probes_never_generate_on_a_released_engine(fake_engine):
    eng, log = fake_engine()
    open(log + ".get", "w").close()  # forget the start-up /health
    assert eng.health()
    eng.release_memory()
    assert eng.health()
    assert [e["path"] for e in _log(log + ".get")] == ["/ready", "/model_info"]


def test_restart_on_death_and_stale_weights(fake_engine):
    import torch

    from megatron_oreal.rollout.engine import SamplingParams
    from megatron_oreal.rollout.sglang_engine import EngineRestarted, SGLangError

    eng, log = fake_engine(max_restarts=3)
    sp = SamplingParams(n=1, max_new_tokens=2)
    first_pid = eng.server.proc.pid
    # the server dies mid-request: restarted, and the request is retried (no weights synced yet)
    out = eng.generate([[999_999, 1]], sp)
    assert len(out[0][0].token_ids) == 2 and eng.restarts == 1 and eng.server.proc.pid != first_pid
    # after a sync the restarted server would hold stale weights: generate refuses until re-synced
    eng.update_weights([("model.norm.weight", torch.ones(4))])
    os.killpg(eng.server.proc.pid, signal.SIGKILL)
    eng.server.proc.wait(10)
    with pytest.raises(EngineRestarted, match="re-sync the weights"):
        eng.generate([[1, 2]], sp)
    assert eng.restarts == 2 and eng.needs_resync
    with pytest.raises(EngineRestarted, match="stale after a restart"):
        eng.generate([[1, 2]], sp)
    eng.update_weights([("model.norm.weight", torch.ones(4))])
    assert not eng.needs_resync and eng.generate([[1, 2]], sp)[0][0].finish_reason == "length"
    # a death before the training phase: release restarts and releases the new server (no error)
    os.killpg(eng.server.proc.pid, signal.SIGKILL)
    eng.server.proc.wait(10)
    eng.release_memory()
    assert eng.restarts == 3 and eng.needs_resync and eng.released == {"weights", "kv_cache", "cuda_graph"}
    eng.update_weights([("model.norm.weight", torch.ones(4))])
    assert not eng.needs_resync and not eng.released
    # the restart budget is bounded
    os.killpg(eng.server.proc.pid, signal.SIGKILL)
    eng.server.proc.wait(10)
    with pytest.raises(SGLangError, match="died again after 3 restarts"):
        eng.generate([[1, 2]], sp)


def test_weight_check_choreography(fake_engine):
    import torch

    eng, log = fake_engine(check=True)
    eng.update_weights([("model.norm.weight", torch.ones(4))])
    eng.update_weights([("model.norm.weight", torch.ones(4))])  # only the first sync is checked
    actions = [e["action"] for e in _log(log) if e["path"] == "/weights_checker"]
    assert actions == ["snapshot", "reset_tensors", "compare"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_process_dies_with_a_killed_trainer(tmp_path):
    import subprocess
    import time

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    trainer = subprocess.Popen([sys.executable, "-c", f"""
import subprocess, sys, time
sys.path.insert(0, {repo!r})
from megatron_oreal.rollout.sglang_engine import _death_signal_setter
p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True,
                     preexec_fn=_death_signal_setter())
print(p.pid, flush=True)
time.sleep(300)
"""], stdout=subprocess.PIPE, text=True)
    server_pid = int(trainer.stdout.readline())
    trainer.kill()  # SIGKILL: no cleanup code runs in the trainer
    trainer.wait()
    for _ in range(100):
        try:
            os.kill(server_pid, 0)
            if open(f"/proc/{server_pid}/stat").read().split(")")[1].split()[0] == "Z":
                break  # dead, waiting to be reaped by init
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.1)
    else:
        os.kill(server_pid, signal.SIGKILL)
        pytest.fail("the server outlived its trainer")


def test_startup_failure_names_the_log(tmp_path):
    from megatron_oreal.rollout.sglang_engine import SGLangEngine, SGLangError, free_port

    cmd = [sys.executable, "-c", "import sys; sys.exit(7)"]
    with pytest.raises(SGLangError, match="exited with code 7 during start-up"):
        SGLangEngine(str(tmp_path), None, None, port=free_port(), command=cmd, launch_timeout_s=30)
    with pytest.raises(TypeError, match="needs an HF checkpoint folder"):
        SGLangEngine(object())


# ------------------------------------------------------------------------------------ real SGLang classes
def test_payloads_validate_against_sglang_classes():
    pytest.importorskip("sglang")
    import torch

    try:
        import sglang.srt.managers.io_struct as io
        from sglang.srt.sampling.sampling_params import SamplingParams as SGLSamplingParams
    except Exception as exc:  # pragma: no cover - depends on the local sglang install
        pytest.skip(f"sglang installed but its io_struct does not import here: {exc}")
    import pydantic

    from megatron_oreal.rollout.engine import SamplingParams
    from megatron_oreal.rollout.sglang_engine import build_generate_request
    from megatron_oreal.sync.buckets import flatten
    from megatron_oreal.sync.transport import serialize_payload

    sp = SamplingParams(n=2, temperature=0.0, top_k=0, max_new_tokens=5, stop_token_ids=(3,), seed=1)
    body, _ = build_generate_request([[1, 2], [4]], sp)
    req = pydantic.TypeAdapter(io.GenerateReqInput).validate_python(body)
    assert req.input_ids == body["input_ids"]
    for params in body["sampling_params"]:
        SGLSamplingParams(**params).verify(vocab_size=100)  # unknown keys or bad values raise here

    (bucket,) = flatten([("model.layers.0.mlp.up_proj.weight", torch.randn(4, 4))])
    payload = serialize_payload(bucket.sglang_payload())
    upd = {"serialized_named_tensors": [payload], "load_format": "flattened_bucket", "flush_cache": False,
           "weight_version": None}
    req = pydantic.TypeAdapter(io.UpdateWeightsFromTensorReqInput).validate_python(upd)
    assert req.load_format == "flattened_bucket" and isinstance(req.serialized_named_tensors[0], bytes)
    for cls, kw in ((io.ReleaseMemoryOccupationReqInput, {"tags": ["weights", "kv_cache", "cuda_graph"]}),
                    (io.ResumeMemoryOccupationReqInput, {"tags": ["weights"]}),
                    (io.PauseGenerationReqInput, {"mode": "abort"}), (io.ContinueGenerationReqInput, {}),
                    (io.CheckWeightsReqInput, {"action": "compare", "allow_quant_error": False})):
        pydantic.TypeAdapter(cls).validate_python(kw)


# ------------------------------------------------------------------------------------ real SGLang on a GPU
@pytest.mark.gpu
def test_real_sglang_engine_on_gpu(tmp_path):
    """Unrun on the CPU machines this was written on: a real server on a tiny random Qwen2, greedy
    generation vs transformers, the release -> sync -> resume cycle with the first-sync check, and
    a sync of new weights that changes what it generates the way transformers says it should."""
    pytest.importorskip("sglang")
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_oreal.rollout.engine import SamplingParams
    from megatron_oreal.rollout.sglang_engine import SGLangEngine

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, torch_dtype="bfloat16")
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).cuda().eval()
    model.save_pretrained(tmp_path / "hf")
    rollout = SimpleNamespace(tensor_parallel_size=1, fp8=False, max_restarts=1, sync_bucket_mb=8,
                              check_weights_after_first_sync=True, mem_fraction_static=0.3)
    eng = SGLangEngine(str(tmp_path / "hf"), None, rollout, log_path=str(tmp_path / "sglang.log"),
                       extra_args=["--disable-cuda-graph"])
    try:
        prompt = [1, 5, 9, 13]
        greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=6)

        def hf_first_token(m):
            with torch.no_grad():
                return int(m(torch.tensor([prompt]).cuda()).logits[0, -1].argmax())

        out = eng.generate([prompt], greedy)
        assert out[0][0].token_ids == out[0][1].token_ids and len(out[0][0].token_ids) == 6
        assert out[0][0].token_ids[0] == hf_first_token(model)
        eng.release_memory()
        eng.update_weights((n, t) for n, t in model.state_dict().items())  # checked against the start-up load
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        eng.release_memory()
        eng.update_weights((n, t) for n, t in model.state_dict().items())
        out = eng.generate([prompt], greedy)
        assert out[0][0].token_ids[0] == hf_first_token(model)
    finally:
        eng.close()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
    if len(sys.argv) == 6 and sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "decode")
    else:
        sys.exit(f"usage: {sys.argv[0]} serve PORT LOG STATE_DIR decode|count")
