"""Outcome reward for math answers: extraction, equivalence, a worker pool and an LLM fallback.

`verify` and `extract_answer` import no sympy until a case needs it, so the trainer's parent
process stays light; the `Verifier` pool does the symbolic work in killable workers.

`verify` relies on size/depth pre-checks only (a pure function cannot kill itself); for model
output at scale use `Verifier`, whose per-case wall-clock limit is the backstop:

    with Verifier(workers=2, timeout=5.0, stop_word="<|im_end|>") as v:
        results = v.verify_batch([(response, gold, finish_reason), ...])  # Result(correct, reason)
"""

from megatron_oreal.reward.extract import extract_answer
from megatron_oreal.reward.judge import REASONS, judge, verify

__all__ = ["REASONS", "Result", "Verifier", "LLMJudge", "extract_answer", "judge", "verify"]


def __getattr__(name: str):
    # lazy: the pool pulls in multiprocessing and the judge urllib; plain `verify` needs neither
    if name in ("Verifier", "Result"):
        from megatron_oreal.reward import pool

        return getattr(pool, name)
    if name == "LLMJudge":
        from megatron_oreal.reward.llm_judge import LLMJudge

        return LLMJudge
    raise AttributeError(name)
