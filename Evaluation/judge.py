"""The LLM judge: prompt, strict verdict parsing, clients, retries and a resumable cache.

A judge is anything that turns a prompt into a reply (`Judge.generate`). Three kinds ship:
  - `OpenAICompatibleJudge` (the default): POST {base_url}/chat/completions with the stdlib only;
    works with a local `vllm serve`, OpenAI, or Gemini's OpenAI-compatible endpoint. The API key
    comes only from the environment variable JUDGE_API_KEY and is sent only in the Authorization
    header, never over plain http to a host other than this machine (unless explicitly allowed),
    and never to the target of a redirect.
  - `OpenAISDKJudge` (verl/utils/llm_judge.py): the same requests through the openai SDK, under the
    same key rules; needs the optional dependency group (`pip install 'vision-sr1[judge]'`).
  - `load_python_judge("python:path/to/file.py:generate")`: a user function `generate(prompt) -> str`.

The prompt, verdict parsing and key-transport rules live in verl/utils/llm_judge.py, shared with
the LLM-judge reward function, and are importable from here too.

Verdicts are parsed strictly: a reply counts as correct only if it is the word CORRECT (or ends
with the line "Verdict: CORRECT"). Anything else is "unparsed" and never counts as correct.
"""

import hashlib
import importlib.util
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

from verl.utils.llm_judge import (  # noqa: F401 (re-exported: the judge's whole interface is importable from here)
    API_KEY_ENV,
    JUDGE_PROMPT,
    OPENAI_MISSING_MESSAGE,
    RETRYABLE_STATUS,
    InsecureJudgeURLError,
    JudgeRequestError,
    OpenAISDKJudge,
    check_key_transport,
    is_local_host,
    parse_verdict,
)


def build_judge_prompt(row: dict[str, Any], rule_answer: str | None) -> str:
    """The judge prompt for one row: its question, ground truth, and the model's final answer.

    The boxed answer is shown when there is one (short, and it is what is graded); otherwise
    the whole response, so the judge can find an answer the rules missed.
    """
    return JUDGE_PROMPT.format(
        question=row["prompt"].replace("<image>", "").strip(),
        ground_truth=row["ground_truth"],
        answer=rule_answer if rule_answer is not None else row["response"],
    )


@dataclass
class Judge:
    """A named reply function plus the retry policy used around it.

    `name` is part of the cache key, so replies of one judge model are never reused for another.
    """

    name: str
    generate: Callable[[str], str]
    max_retries: int = 3
    retry_backoff_s: float = 1.0

    def ask(self, prompt: str) -> str:
        """The reply to `prompt`, retrying failures with exponential backoff; JudgeRequestError at the end."""
        attempt = 0
        while True:
            try:
                reply = self.generate(prompt)
            except JudgeRequestError as error:
                if not error.retryable or attempt == self.max_retries:
                    raise
            except Exception as error:  # a user-supplied generate() may fail in any way
                if attempt == self.max_retries:
                    raise JudgeRequestError(f"{self.name}: {type(error).__name__}: {error}", retryable=False) from error
            else:
                if not isinstance(reply, str):
                    raise JudgeRequestError(
                        f"{self.name}: generate() returned {type(reply).__name__}, expected str", retryable=False
                    )
                return reply
            time.sleep(self.retry_backoff_s * 2**attempt)
            attempt += 1


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib would follow a redirect with the same headers, the key included, to any host and
    over plain http; a chat-completions POST never needs one, so none is followed."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        raise JudgeRequestError(
            f"{req.full_url}: HTTP {code} redirect to {newurl} not followed (the request carries the API key); "
            "set the judge base URL to the final address",
            retryable=False,
        )


_OPENER = urllib.request.build_opener(_RefuseRedirects)


class OpenAICompatibleJudge:
    """One chat-completions request per call, stdlib only; raises JudgeRequestError on failure.

    Raises InsecureJudgeURLError at construction for a URL the key must not be sent to
    (see `check_key_transport`).
    """

    def __init__(
        self, base_url: str, model: str, api_key: str | None, timeout_s: float, allow_insecure_http: bool = False
    ):
        check_key_transport(base_url, api_key, allow_insecure_http)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self._api_key = api_key
        self.timeout_s = timeout_s

    def __repr__(self) -> str:  # keeps the key out of any log or traceback that prints the object
        return f"OpenAICompatibleJudge(url={self.url!r}, model={self.model!r})"

    def generate(self, prompt: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read()[:200].decode(errors="replace")
            raise JudgeRequestError(
                f"{self.url}: HTTP {error.code}: {detail}", retryable=error.code in RETRYABLE_STATUS
            ) from error
        except (OSError, HTTPException) as error:  # timeouts, refused connections, dropped replies
            raise JudgeRequestError(f"{self.url}: {type(error).__name__}: {error}", retryable=True) from error
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise JudgeRequestError(
                f"{self.url}: reply is not a chat completion: {payload[:200]!r}", retryable=False
            ) from error
        return content or ""  # some servers send null content for an empty reply


def load_python_judge(spec: str) -> Callable[[str], str]:
    """The function named by "python:path/to/file.py:function_name"."""
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] != "python" or not parts[1] or not parts[2]:
        raise ValueError(f"judge spec {spec!r} must look like python:path/to/file.py:function_name")
    _, file_path, function_name = parts
    path = Path(file_path)
    if not path.is_file():
        raise FileNotFoundError(f"judge spec {spec!r}: no file {path}")
    module_spec = importlib.util.spec_from_file_location(f"custom_judge_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"judge spec {spec!r}: {path} has no function {function_name!r}")
    return function


class JudgeCache:
    """Replies already received, one jsonl line each, keyed by a hash of (judge name, prompt).

    Lines are appended and flushed as replies arrive, so an interrupted run loses nothing it
    was told. Failed requests are not cached: a rerun asks again.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._replies: dict[str, str] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        with open(self.path, encoding="utf-8") as file:
            for line_number, line in enumerate(file, 1):
                try:
                    entry = json.loads(line)
                    self._replies[entry["key"]] = entry["reply"]
                except (ValueError, KeyError, TypeError):
                    # A line cut short by an interrupted run: that reply is simply asked again.
                    print(f"warning: {self.path}:{line_number}: unreadable cache line ignored", file=sys.stderr)

    @staticmethod
    def key(judge_name: str, prompt: str) -> str:
        return hashlib.sha256(json.dumps([judge_name, prompt]).encode()).hexdigest()

    def get(self, judge_name: str, prompt: str) -> str | None:
        with self._lock:
            return self._replies.get(self.key(judge_name, prompt))

    def put(self, judge_name: str, prompt: str, reply: str) -> None:
        key = self.key(judge_name, prompt)
        line = json.dumps({"key": key, "judge": judge_name, "reply": reply}, ensure_ascii=False) + "\n"
        with self._lock:
            self._replies[key] = reply
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(line)
