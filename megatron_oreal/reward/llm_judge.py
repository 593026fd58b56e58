"""Optional LLM verifier over an OpenAI-compatible `/v1/chat/completions` endpoint (stdlib only).

docs/algorithm.md §5.1 step 4: asked only when the rules say wrong; it sees the question, the gold answer and
the post-reasoning response; sampling as in OREAL's judge; "A" alone means correct. Any failure
(network, HTTP error, malformed reply, ambiguous verdict) counts as wrong: the LLM may only rescue
false negatives, never create doubt.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.request

log = logging.getLogger(__name__)

# Paraphrase of OREAL's `MathJudger.verify_prompt` ([P Fig A3]): options A CORRECT / B INCORRECT.
PROMPT = """Please as a grading expert, judge whether the final answers given by the candidates below \
are consistent with the standard answers, that is, whether the candidates answered correctly.

Rules: the candidate's answer must be mathematically equivalent to the standard answer (different \
but equivalent forms count as correct); if the candidate gives several different final answers, or \
no final answer, it is incorrect. Judge only the final answer, not the reasoning.

<Original Question Begin>
{question}
<Original Question End>
<Standard Answer Begin>
{gold}
<Standard Answer End>
<Candidate's Answer Begin>
{answer}
<Candidate's Answer End>

Reply with a single letter: A: CORRECT, or B: INCORRECT."""

# docs/algorithm.md §5.1: temperature 0, top_p 0.8, top_k 20, repetition_penalty 1.05, max_tokens 100.
SAMPLING = {"temperature": 0.0, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_tokens": 100}


def parse_verdict(text: str) -> bool | None:
    """`A` present and `B` absent -> True; the reverse -> False; anything else -> None."""
    has_a, has_b = re.search(r"\bA\b", text) is not None, re.search(r"\bB\b", text) is not None
    if has_a and not has_b:
        return True
    if has_b and not has_a:
        return False
    return None


class LLMJudge:
    """`judge(question, gold, answer) -> bool`; one try, `timeout` seconds, failures are False."""

    def __init__(self, base_url: str, model: str, timeout: float = 30.0, api_key: str | None = None):
        self.url = base_url.rstrip("/") + ("" if base_url.rstrip("/").endswith("/v1") else "/v1") + "/chat/completions"
        self.model = model
        self.timeout = timeout
        self.api_key = api_key
        self.failures = 0

    def judge(self, question: str, gold: str, answer: str) -> bool:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": PROMPT.format(question=question, gold=gold, answer=answer)}],
            **SAMPLING,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                reply = json.loads(resp.read().decode())
            text = reply["choices"][0]["message"]["content"]
            verdict = parse_verdict(str(text))
        except Exception as exc:  # network, HTTP status, JSON shape: all mean "not rescued"
            self.failures += 1
            log.warning("LLM judge failed (%s: %s); counting the case as wrong", type(exc).__name__, exc)
            return False
        return verdict is True
