"""The worker pool: order, fast path, truncation, and the kill-and-replace timeout."""

import logging
import time

from megatron_oreal.reward import Verifier
from megatron_oreal.reward.pool import Case

SLOW = r"\boxed{(1000!)^{9999}}"  # passes the pre-checks, then minutes of bignum work


def test_order_preserved(pool):
    pairs = [(rf"\boxed{{{i}}}", str(i if i % 3 else i + 1)) for i in range(40)]
    pairs += [(r"\boxed{x^2+2x+1}", "(x+1)^2"), (r"\boxed{\sqrt{8}}", r"2\sqrt{2}"), (r"\boxed{\sqrt{8}}", r"3\sqrt{2}")]
    results = pool.verify_batch(pairs)
    assert [r.correct for r in results[:40]] == [bool(i % 3) for i in range(40)]
    assert [r.correct for r in results[40:]] == [True, True, False]


def test_reasons(pool):
    results = pool.verify_batch([
        (r"\boxed{5}", "5"),
        (r"\boxed{6}", "5"),
        ("I give up.\nNo idea.\nReally none.", "5"),
        (r"\boxed{5}", "5", "length"),  # cut off by max_tokens
        {"solution": r"\boxed{5}", "gold": "5", "finish_reason": "stop"},
        Case(r"\boxed{x}", "x"),
    ])
    assert [r.reason for r in results] == ["correct", "wrong", "no_answer", "truncated", "correct", "correct"]


def test_stop_word_truncation():
    with Verifier(workers=1, timeout=5, stop_word="<|im_end|>") as v:
        ok, cut = v.verify_batch([(r"\boxed{5}<|im_end|>", "5"), (r"\boxed{5} and then", "5")])
    assert (ok.reason, cut.reason) == ("correct", "truncated")


def test_timeout_kills_and_replaces_worker_and_batch_continues(caplog):
    with Verifier(workers=1, timeout=1.0) as v:
        pid_before = v._workers[0].proc.pid
        pairs = [(r"\boxed{7}", "7"), (SLOW, "1"), (r"\boxed{x^2-1}", "(x-1)(x+1)"), (r"\boxed{\sqrt{2}}", r"\sqrt{3}")]
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="megatron_oreal.reward.pool"):
            results = v.verify_batch(pairs)
        elapsed = time.monotonic() - start
        assert [r.reason for r in results] == ["correct", "timeout", "correct", "wrong"]
        assert not results[1].correct
        assert v._workers[0].proc.pid != pid_before and v._workers[0].proc.is_alive()
        assert v.counts["timeout"] == 1
        assert elapsed < 10
        assert any("exceeded" in m for m in caplog.messages)
        # the replacement worker serves the next batch
        assert v.verify_batch([(r"\boxed{\frac{x}{2}}", "0.5x")])[0].correct


def test_close_and_context_manager():
    v = Verifier(workers=2, timeout=5)
    procs = [w.proc for w in v._workers]
    assert v.verify_batch([(r"\boxed{\pi}", "3.14")])[0].correct
    v.close()
    assert all(not p.is_alive() for p in procs)


def test_in_process_mode():
    with Verifier(workers=0) as v:
        assert [r.correct for r in v.verify_batch([(r"\boxed{2x}", "x+x"), (r"\boxed{3}", "4")])] == [True, False]


def test_dead_idle_worker_is_replaced():
    with Verifier(workers=1, timeout=5) as v:
        v._workers[0].proc.kill()
        v._workers[0].proc.join()
        results = v.verify_batch([(r"\boxed{x+x}", "2x"), (r"\boxed{3}", "3")])
    assert [r.reason for r in results][1] == "correct"
    assert results[0].reason in ("correct", "error")  # sent before the death was noticed, or retried
