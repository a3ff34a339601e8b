"""The LLM judge: prompt, strict verdict parsing, clients, retries and a resumable cache.

A judge is anything that turns a prompt into a reply (`Judge.generate`). Two kinds ship:
  - `OpenAICompatibleJudge`: POST {base_url}/chat/completions with the stdlib only; works with a
    local `vllm serve`, OpenAI, or Gemini's OpenAI-compatible endpoint. The API key comes only
    from the environment variable JUDGE_API_KEY and is sent only in the Authorization header,
    never over plain http to a host other than this machine (unless explicitly allowed), and
    never to the target of a redirect.
  - `load_python_judge("python:path/to/file.py:generate")`: a user function `generate(prompt) -> str`.

Verdicts are parsed strictly: a reply counts as correct only if it is the word CORRECT (or ends
with the line "Verdict: CORRECT"). Anything else is "unparsed" and never counts as correct.
"""

import hashlib
import importlib.util
import ipaddress
import json
import re
import string
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

API_KEY_ENV = "JUDGE_API_KEY"

JUDGE_PROMPT = """You are checking whether a model's answer to a question is right.
Compare the model's final answer with the reference answer. Equivalent forms count as the same
answer (e.g. 0.5 and 1/2, or the same value with or without units); a different, incomplete or
missing answer is wrong.

Question:
{question}

Reference answer:
{ground_truth}

Model's answer:
{answer}

Reply with exactly one word: CORRECT or INCORRECT."""

_VERDICT_LINE = re.compile(r"verdict\s*:\s*(correct|incorrect)", re.IGNORECASE)
_EDGE_CHARACTERS = string.punctuation + string.whitespace
# Worth another try: the request timed out, was rate limited, or the server failed.
_RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


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


def parse_verdict(reply: str) -> str:
    """'correct', 'incorrect' or 'unparsed' for a judge reply.

    Accepted: the whole reply is one of the two words (case and surrounding punctuation
    ignored), or its last non-empty line is "Verdict: CORRECT" / "Verdict: INCORRECT".
    Everything else, e.g. "Maybe correct?" or "The answer is not incorrect", is unparsed.
    """
    whole = reply.strip(_EDGE_CHARACTERS).lower()
    if whole in ("correct", "incorrect"):
        return whole
    lines = [line.strip(_EDGE_CHARACTERS) for line in reply.splitlines() if line.strip(_EDGE_CHARACTERS)]
    if lines:
        match = _VERDICT_LINE.fullmatch(lines[-1])
        if match:
            return match.group(1).lower()
    return "unparsed"


class JudgeRequestError(Exception):
    """A judge request failed; `retryable` says whether asking again may help."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


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


class InsecureJudgeURLError(ValueError):
    """The judge URL would expose the API key (plain http to another machine) or is not http(s)."""


def is_local_host(host: str | None) -> bool:
    """Whether `host` is this machine: localhost, 127.0.0.0/8 or ::1 (also as ::ffff:127.x.y.z)."""
    if not host:
        return False
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])  # drop an IPv6 zone id
    except ValueError:
        return False  # a name: it may resolve anywhere
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def check_key_transport(base_url: str, api_key: str | None, allow_insecure_http: bool = False) -> None:
    """Raise InsecureJudgeURLError unless `base_url` is http(s), and the key, if any, would travel
    encrypted or stay on this machine. Checked before any request, so a refused key never leaves.

    Plain http to another host sends the key in clear text to anyone on the network path;
    `allow_insecure_http` is for a trusted network (e.g. a judge server inside a private cluster).
    """
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InsecureJudgeURLError(
            f"judge base URL {base_url!r} must start with http:// or https:// and name a host, "
            "e.g. http://localhost:8000/v1"
        )
    if api_key and parts.scheme == "http" and not is_local_host(parts.hostname) and not allow_insecure_http:
        raise InsecureJudgeURLError(
            f"refusing to send the judge API key ({API_KEY_ENV}) over plain http to {parts.hostname}: anyone on "
            "the network path could read it. Use an https:// URL, a server on this machine (localhost, "
            "127.0.0.0/8, ::1), or pass --allow_insecure_http if the network is trusted."
        )


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
                f"{self.url}: HTTP {error.code}: {detail}", retryable=error.code in _RETRYABLE_STATUS
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
