"""The CPU engine's KV-cache workspace: same memory for the same key across calls, bounded; a
bounded-out engine (nothing kept) generates exactly what a reusing one does."""

import torch
from helpers.tiny_hf import make_tiny_qwen2

from megatron_oreal.rollout.cpu_engine import CPUEngine, _Workspace
from megatron_oreal.rollout.engine import SamplingParams


def test_workspace_reuses_within_its_bound(monkeypatch):
    ws = _Workspace()
    a = ws.get(("k",), (4, 8), torch.float32)
    b = ws.get(("k",), (2, 8), torch.float32)  # smaller: a view of the same memory
    assert b.data_ptr() == a.data_ptr() and b.shape == (2, 8) and b.is_contiguous()
    c = ws.get(("k",), (8, 8), torch.float32)  # larger: a new buffer, kept in place of the old one
    assert ws.get(("k",), (8, 8), torch.float32).data_ptr() == c.data_ptr()
    monkeypatch.setattr(_Workspace, "KEEP_BYTES", 8 * 8 * 4 + 16)
    d = ws.get(("other",), (4, 4), torch.float32)  # would exceed the bound: handed out, not kept
    assert ws.get(("other",), (4, 4), torch.float32).data_ptr() != d.data_ptr()


def test_outputs_do_not_depend_on_reuse(tmp_path, monkeypatch, one_thread):
    make_tiny_qwen2(tmp_path, vocab_size=48, hidden=64, layers=2, heads=4, kv_heads=2, seed=0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 48, (int(n),), generator=g).tolist() for n in (3, 9, 5, 7)]
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, stop_token_ids=(7, 11), seed=2, return_logprobs=True)
    reusing = CPUEngine(tmp_path, threads=1, max_batch_rows=6)  # 2 prompts a chunk: buffers reused across chunks
    first = reusing.generate(prompts, sp)
    reusing.generate(prompts[:1], sp.with_seed(5))  # other shapes in between
    again = reusing.generate(prompts, sp)
    monkeypatch.setattr(_Workspace, "KEEP_BYTES", 0)  # nothing kept: fresh memory every time
    fresh = CPUEngine(tmp_path, threads=1, max_batch_rows=6).generate(prompts, sp)
    assert first == again == fresh
    assert len({o.finish_reason for outs in first for o in outs}) == 2  # rows stopped and compacted
