"""The optional LLM judge against a fake OpenAI-compatible server on 127.0.0.1."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megatron_oreal.reward import LLMJudge, Verifier
from megatron_oreal.reward.llm_judge import parse_verdict


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body))
        mode = self.server.mode
        if mode == "sleep":
            time.sleep(2)
        if mode == "500":
            self.send_response(500)
            self.end_headers()
            return
        reply = {"A": "A", "B": "B", "both": "A or B", "garbage": None}.get(mode)
        data = b"not json" if reply is None else json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.requests, srv.mode = [], "A"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _judge(srv, timeout=5.0):
    return LLMJudge(f"http://127.0.0.1:{srv.server_address[1]}", model="judge", timeout=timeout)


@pytest.mark.parametrize("mode,expected", [("A", True), ("B", False), ("both", False), ("garbage", False), ("500", False)])
def test_verdicts_and_failures(server, mode, expected):
    server.mode = mode
    assert _judge(server).judge("What is 2+2?", "4", "four") is expected


def test_request_shape(server):
    _judge(server).judge("Q?", "4", "four")
    path, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert body["model"] == "judge" and body["temperature"] == 0.0 and body["max_tokens"] == 100
    content = body["messages"][0]["content"]
    assert "Q?" in content and "four" in content and "4" in content


def test_timeout_is_wrong(server):
    server.mode = "sleep"
    judge = _judge(server, timeout=0.3)
    assert judge.judge("Q", "4", "four") is False
    assert judge.failures == 1


def test_unreachable_is_wrong():
    assert LLMJudge("http://127.0.0.1:9", model="m", timeout=1).judge("Q", "4", "four") is False


def test_parse_verdict():
    assert parse_verdict("A") is True and parse_verdict("B: INCORRECT") is False
    assert parse_verdict("") is None and parse_verdict("A and B") is None


def test_pool_asks_only_rule_negatives(server):
    with Verifier(workers=1, timeout=5, llm_judge=_judge(server)) as v:
        results = v.verify_batch([
            {"solution": r"\boxed{5}", "gold": "5", "question": "q1"},
            {"solution": r"The result is \boxed{\text{five}}", "gold": "5", "question": "q2"},
            {"solution": r"\boxed{5}", "gold": "5", "finish_reason": "length", "question": "q3"},
        ])
    assert [(r.correct, r.reason, r.by_llm) for r in results] == [
        (True, "correct", False), (True, "correct", True), (False, "truncated", False)]
    asked = [body["messages"][0]["content"] for _, body in server.requests]
    assert len(asked) == 1 and "q2" in asked[0]
