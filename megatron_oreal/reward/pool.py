"""`Verifier`: score batches in warm worker processes with a hard per-case wall-clock limit.

sympy has no cancellation and SIGALRM only works in a main thread, so the limit is enforced from
the outside: a worker past its deadline is killed and replaced, and its case scores `timeout`
(wrong). Workers come from a forkserver that has already imported sympy and the parser, so a
replacement is a fork (tens of ms), not a fresh interpreter. The cheap `fast_judge` runs in the
parent and settles most cases (plain numbers, identical strings) without any IPC.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing as mp
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Iterable

from megatron_oreal.reward.judge import fast_judge, judge

log = logging.getLogger(__name__)

# Imported once in the forkserver so that every (re)started worker is born warm.
_PRELOAD = ["megatron_oreal.reward._forkserver_preload"]
# Consecutive worker deaths before giving up: a start-up crash would otherwise respawn forever.
_MAX_DEATHS = 8


@dataclass(frozen=True)
class Result:
    correct: bool
    reason: str  # one of judge.REASONS
    by_llm: bool = False  # the rules said wrong and the LLM judge said correct


@dataclass(frozen=True)
class Case:
    solution: str
    gold: str
    finish_reason: str | None = None
    question: str = ""  # only the LLM judge reads it


def as_case(item: Any) -> Case:
    """Accept (solution, gold), (solution, gold, finish_reason), a dict, or a Case."""
    if isinstance(item, Case):
        return item
    if isinstance(item, dict):
        return Case(item["solution"], item["gold"], item.get("finish_reason"), item.get("question", ""))
    return Case(*item)


def _worker_main(conn: Connection, stop_word: str | None, strict_hedging: bool = False) -> None:
    # A no-op when the forkserver preloaded it; warms this worker if the forkserver was started
    # earlier by someone else (then our preload list was never applied).
    import megatron_oreal.reward._forkserver_preload  # noqa: F401
    from megatron_oreal.launch.signals import ignore_preemption_signals

    # Slurm signals every process of a task: a worker must not die before the trainer has saved
    # (it exits on EOF when the trainer goes, and the pool kills it with SIGKILL on a timeout).
    ignore_preemption_signals()
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        idx, solution, gold, finish_reason = msg
        try:
            reason = judge(solution, gold, stop_word, finish_reason, strict_hedging)
        except Exception:  # a bug of ours must not take the batch down; it is wrong, and logged
            log.exception("verifier error on case %d", idx)
            reason = "error"
        conn.send((idx, reason))


class _Worker:
    def __init__(self, ctx, stop_word: str | None, strict_hedging: bool):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, stop_word, strict_hedging), daemon=True)
        self.proc.start()
        child.close()
        self.job: tuple[int, float] | None = None  # (case index, deadline)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class Verifier:
    """A pool of `workers` processes; `timeout` seconds per case, then the worker is killed.

    `stop_word`: docs/algorithm.md §5.1 truncation rule (a response not ending with it is `truncated`).
    `llm_judge`: optional `LLMJudge`, asked only for cases the rules call wrong or answerless.
    `strict_hedging`: score a final part with an earlier differing `\\boxed{}` wrong; default False
    scores the last box only (the paper's released judge; see `judge._prepare`).
    Workers start from a forkserver, so a script using this needs the `if __name__ == "__main__":`
    guard, as with any non-fork multiprocessing.
    """

    def __init__(self, workers: int = 2, timeout: float = 5.0, stop_word: str | None = None, llm_judge=None,
                 strict_hedging: bool = False):
        self.timeout = timeout
        self.strict_hedging = strict_hedging
        self.stop_word = stop_word
        self.llm_judge = llm_judge
        self.counts: collections.Counter[str] = collections.Counter()
        self._deaths = 0
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(_PRELOAD)
        self._workers = [_Worker(self._ctx, stop_word, strict_hedging) for _ in range(workers)]

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        for w in self._workers:
            w.proc.join(1)
            if w.proc.is_alive():
                w.kill()
        self._workers = []

    def verify(self, solution: str, gold: str, finish_reason: str | None = None) -> Result:
        return self.verify_batch([(solution, gold, finish_reason)])[0]

    def verify_batch(self, pairs: Iterable[Any]) -> list[Result]:
        """Results in input order; every case ends in one of judge.REASONS."""
        cases = [as_case(p) for p in pairs]
        reasons: list[str | None] = [None] * len(cases)
        todo = collections.deque()
        for i, c in enumerate(cases):
            try:
                reasons[i] = fast_judge(c.solution, c.gold, self.stop_word, c.finish_reason, self.strict_hedging)
            except Exception:
                reasons[i] = None  # let a worker try (and time out if it must)
            if reasons[i] is None:
                todo.append(i)
        if todo:
            self._run(cases, todo, reasons)
        results = [Result(r == "correct", r) for r in reasons]
        if self.llm_judge is not None:
            results = self._rescue(cases, results)
        self.counts.update(r.reason for r in results)
        return results

    def _run(self, cases: list[Case], todo: collections.deque, reasons: list) -> None:
        if not self._workers:
            for i in todo:  # workers=0: in-process, no time limit (debugging)
                reasons[i] = judge(cases[i].solution, cases[i].gold, self.stop_word, cases[i].finish_reason, self.strict_hedging)
            return
        while todo or any(w.job for w in self._workers):
            for w in self._workers:
                if w.job is None and todo:
                    i = todo.popleft()
                    c = cases[i]
                    try:
                        w.conn.send((i, c.solution, c.gold, c.finish_reason))
                    except (BrokenPipeError, OSError):  # died while idle: replace it, retry the case
                        todo.appendleft(i)
                        self._died(w, i)
                        continue
                    w.job = (i, time.monotonic() + self.timeout)
            busy = [w for w in self._workers if w.job]
            if not busy:
                continue
            first_deadline = min(w.job[1] for w in busy)
            ready = wait([w.conn for w in busy], timeout=max(0.0, first_deadline - time.monotonic()))
            for w in busy:
                if w.conn in ready:
                    try:
                        i, reason = w.conn.recv()
                        self._deaths = 0
                    except (EOFError, OSError):  # the worker died (e.g. out of memory)
                        i, reason = w.job[0], "error"
                        self._died(w, i)
                    reasons[i] = reason
                    w.job = None
                elif time.monotonic() >= w.job[1]:
                    i = w.job[0]
                    log.warning("verifier case %d exceeded %.1fs; killing its worker", i, self.timeout)
                    reasons[i] = "timeout"
                    self._replace(w)

    def _died(self, w: _Worker, case: int) -> None:
        log.warning("verifier worker died on case %d; restarting it", case)
        self._deaths += 1
        if self._deaths > _MAX_DEATHS:
            raise RuntimeError(
                "verifier workers keep dying; if this is a script, guard its entry "
                "point with `if __name__ == '__main__':` (forkserver re-imports it)"
            )
        self._replace(w)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        fresh = _Worker(self._ctx, self.stop_word, self.strict_hedging)
        self._workers[self._workers.index(w)] = fresh

    def _rescue(self, cases: list[Case], results: list[Result]) -> list[Result]:
        """docs/algorithm.md §5.1 step 4: the LLM can only turn a rule-negative into a positive."""
        asks = [i for i, r in enumerate(results) if r.reason in ("wrong", "no_answer")]
        if not asks:
            return results
        from megatron_oreal.reward.extract import strip_reasoning

        def ask(i: int) -> bool:
            c = cases[i]
            return self.llm_judge.judge(c.question, c.gold, strip_reasoning(c.solution, self.stop_word))

        with ThreadPoolExecutor(max_workers=min(8, len(asks))) as ex:
            verdicts = list(ex.map(ask, asks))
        out = list(results)
        for i, ok in zip(asks, verdicts):
            if ok:
                out[i] = Result(True, "correct", by_llm=True)
        return out
