"""`openai:MODEL`: a judge behind any OpenAI-compatible chat-completions endpoint (`--base-url`), with the paper's
prompts (`dpokit.eval.templates`).

- The key comes from an environment variable (`OPENAI_API_KEY` unless told otherwise); a local server needs none.
- Strict parsing: an answer without exactly one `<verdict label>: A|B` line is `unparseable`, counted, never guessed.
- 429 and 5xx answers, timeouts and refused connections are retried with exponential backoff (a `Retry-After`
  header is honoured); after `max_retries` the comparison is `failed`. 401/403/404 stop the run: they never heal.
- At most `concurrency` requests are in flight; each waits at most `timeout` seconds.
- Verdicts (unparseable ones included) are cached on disk, keyed by judge, template, prompt and both answers in
  their order, so a rerun sends no request for what was already judged. Failed comparisons are not cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dpokit.eval.judges import Comparison, JudgeError, Verdict
from dpokit.eval.templates import Template, parse_verdict, prompt_text

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRYABLE = {408, 409, 425, 429}


class VerdictCache:
    """A JSON-lines file of {key, verdict}; appended as verdicts arrive (a torn last line is ignored on load)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self.entries: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        if self.path is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.entries[row["key"]] = row["verdict"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    @staticmethod
    def key(*parts: str) -> str:
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, verdict: dict[str, Any]) -> None:
        with self.lock:
            self.entries[key] = verdict
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"key": key, "verdict": verdict}, ensure_ascii=False) + "\n")


class OpenAIJudge:
    order_matters = True

    def __init__(
        self,
        model: str,
        template: Template,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 4,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        cache: str | Path | None = None,
        max_tokens: int = 256,
    ) -> None:
        self.name, self.model, self.template = f"openai:{model}", model, template
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = os.environ.get(api_key_env)
        if self.api_key is None and self.base_url == DEFAULT_BASE_URL:
            raise JudgeError(f"openai judge: set the API key in the environment variable {api_key_env}")
        self.concurrency, self.timeout, self.max_retries, self.backoff = concurrency, timeout, max_retries, backoff
        self.max_tokens = max_tokens
        self.cache = VerdictCache(cache)
        self.requests = 0
        self._count = threading.Lock()

    def judge(self, comparisons: Sequence[Comparison]) -> list[Verdict]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, comparisons))

    def _one(self, c: Comparison) -> Verdict:
        content = self.template.render(prompt_text(c.prompt), c.a, c.b)
        key = VerdictCache.key(self.name, self.template.name, self.template.digest, content)
        cached = self.cache.get(key)
        if cached is None:
            try:
                answer = self._ask(content)
            except _Failed as e:
                return Verdict(None, "failed", {"error": str(e)})
            choice = parse_verdict(answer, self.template)
            cached = {"outcome": choice, "raw": answer}
            self.cache.put(key, cached)
        if cached["outcome"] is None:
            return Verdict(None, "unparseable", {"raw": cached["raw"]})
        return Verdict(cached["outcome"], None, {"raw": cached["raw"]})

    def _ask(self, content: str) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": content}],
                "temperature": 0,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last, delay = "", 0.0
        for attempt in range(self.max_retries + 1):
            time.sleep(delay)
            with self._count:
                self.requests += 1
            delay = min(60.0, self.backoff * 2**attempt)
            request = urllib.request.Request(f"{self.base_url}/chat/completions", body, headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode("utf-8"))
                return _content(payload)
            except urllib.error.HTTPError as e:
                if e.code in (401, 403, 404):
                    raise JudgeError(
                        f"{self.name} at {self.base_url}: HTTP {e.code} {e.reason}; check the model name, the base "
                        "URL and the API key"
                    ) from e
                if e.code not in RETRYABLE and e.code < 500:
                    raise _Failed(f"HTTP {e.code} {e.reason}") from e
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    delay = min(60.0, float(retry_after))
                last = f"HTTP {e.code} {e.reason}"
            except (TimeoutError, urllib.error.URLError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (json.JSONDecodeError, _Malformed) as e:
                raise _Failed(f"a reply that is not a chat completion: {e}") from e
        raise _Failed(f"no answer after {self.max_retries + 1} attempts (last: {last})")


class _Failed(Exception):
    pass


class _Malformed(Exception):
    pass


def _content(payload: Any) -> str:
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise _Malformed(f"no choices[0].message.content in {str(payload)[:200]}") from e
    if not isinstance(content, str):
        raise _Malformed("choices[0].message.content is not a string")
    return content
