"""The openai: judge against a chat-completions server that this test starts on 127.0.0.1: a 429 then success, a
malformed verdict (counted, not guessed), a timeout then success, a server that keeps failing, the key in the
Authorization header, the concurrency limit, and a cached rerun that sends zero requests."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dpokit.eval.judges import Comparison, JudgeError, make_judge
from dpokit.eval.openai_judge import OpenAIJudge
from dpokit.eval.templates import DIALOGUE, SUMMARIZATION, parse_verdict


class ChatServer:
    """Answers by the words in the two responses: `good` wins; `ratelimit` gets one 429 first, `slow` one late answer,
    `garbled` an answer without a verdict line, `broken` always 503."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.headers: list[str | None] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content = body["messages"][0]["content"]
                response_a = re.search(r"(?:Response|Summary) A:\n(.*?)\n\n(?:Response|Summary) B:", content, re.S)[1]
                with server.lock:
                    server.requests[response_a] += 1
                    server.headers.append(self.headers.get("Authorization"))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    count = server.requests[response_a]
                try:
                    self._answer(content, response_a, count)
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, content: str, response_a: str, count: int) -> None:
                time.sleep(0.05)
                if "broken" in content:
                    return self._send(503, {"error": "unavailable"})
                if "ratelimit" in content and count == 1:
                    return self._send(429, {"error": "slow down"}, {"Retry-After": "0.05"})
                if "slow" in content and count == 1:
                    time.sleep(1.0)  # past the client's timeout
                if "garbled" in content:
                    text = "Both responses have merits; I cannot decide."
                else:
                    text = f"Comparison: one is better.\nMore helpful: {'A' if 'good' in response_a else 'B'}"
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})

            def _send(self, code: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


COMPARISONS = [
    Comparison("Say hi", "good answer", "bad answer"),
    Comparison("Say hi", "bad answer", "good answer"),
    Comparison("Say hi", "good ratelimit", "bad"),
    Comparison("Say hi", "garbled one", "garbled two"),
    Comparison("Say hi", "bad slow", "good"),
    Comparison("Say hi", "good broken", "bad"),
]


def _judge(server: ChatServer, cache, **kwargs) -> OpenAIJudge:
    options = {"timeout": 0.4, "max_retries": 2, "backoff": 0.01, "concurrency": 3} | kwargs
    return OpenAIJudge("judge-model", DIALOGUE, base_url=server.url, cache=cache, **options)


def test_openai_judge_against_a_local_server(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    cache = tmp_path / "cache.jsonl"
    with ChatServer() as server:
        judge = _judge(server, cache)
        verdicts = judge.judge(COMPARISONS)
        assert [v.outcome for v in verdicts] == ["A", "B", "A", None, "B", None]
        assert [v.problem for v in verdicts] == [None, None, None, "unparseable", None, "failed"]
        assert verdicts[3].detail["raw"].startswith("Both responses")
        assert "3 attempts" in verdicts[5].detail["error"]
        # 429 then success; timeout then success; 503 three times (max_retries=2); one request for the others.
        assert server.requests == Counter(
            {"good answer": 1, "bad answer": 1, "good ratelimit": 2, "garbled one": 1, "bad slow": 2, "good broken": 3}
        )
        assert judge.requests == 10
        assert set(server.headers) == {"Bearer sk-test"}
        assert server.max_in_flight <= 3

        # A rerun reads every verdict it has from the cache: only the failed comparison is asked again.
        again = _judge(server, cache)
        rerun = again.judge(COMPARISONS)
        assert [v.outcome for v in rerun] == [v.outcome for v in verdicts]
        assert again.requests == 3 and server.requests["good broken"] == 6
        cached_only = _judge(server, cache).judge(COMPARISONS[:5])
        assert [v.outcome for v in cached_only] == ["A", "B", "A", None, "B"]
        assert sum(server.requests.values()) == 13  # zero requests for the cached rerun


def test_the_cache_key_holds_the_order_and_the_template(tmp_path) -> None:
    with ChatServer() as server:
        cache = tmp_path / "cache.jsonl"
        _judge(server, cache).judge([Comparison("q", "good x", "bad y")])
        _judge(server, cache).judge([Comparison("q", "bad y", "good x")])  # swapped: a new question
        assert sum(server.requests.values()) == 2
        tldr = OpenAIJudge("judge-model", SUMMARIZATION, base_url=server.url, cache=cache)
        tldr.judge([Comparison("q", "good x", "bad y")])
        assert sum(server.requests.values()) == 3


def test_concurrency_limit_one(tmp_path) -> None:
    with ChatServer() as server:
        _judge(server, None, concurrency=1).judge([Comparison("q", f"good {i}", "bad") for i in range(4)])
        assert server.max_in_flight == 1


def test_unauthorised_stops_the_run(monkeypatch) -> None:
    class Refusing(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        judge = OpenAIJudge("m", DIALOGUE, base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1")
        with pytest.raises(JudgeError, match="HTTP 401"):
            judge.judge([Comparison("q", "a", "b")])
    finally:
        httpd.shutdown()
        httpd.server_close()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
        make_judge("openai:gpt-4o")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Comparison: A is clearer.\nMore helpful: A", "A"),
        ('Comparison: x\nMore helpful: "B"', "B"),
        ("**More helpful:** B.", "B"),
        ("More helpful: A\nMore helpful: B", None),
        ("More helpful: A or B", None),
        ("The answer is A.", None),
        ("Preferred: A", None),
    ],
)
def test_strict_parsing(text, expected) -> None:
    assert parse_verdict(text, DIALOGUE) == expected
