"""LLM-judge pieces shared by the grading command (Evaluation/LLM_eval.py) and reward functions
(examples/reward_function/llm_judge.py): the verdict prompt and its strict parsing, the rules for
where the API key may be sent, and a judge client on the openai SDK.

The openai package is optional (`pip install 'vision-sr1[judge]'`); this module imports it only
when an `OpenAISDKJudge` is built, so everything else here works without it.
"""

import ipaddress
import re
import string
import urllib.parse
from types import ModuleType

API_KEY_ENV = "JUDGE_API_KEY"
OPENAI_MISSING_MESSAGE = (
    "the openai package is not installed; it is an optional dependency of the SDK judge: "
    "pip install 'vision-sr1[judge]' (or pip install -r requirements/judge.txt)"
)

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
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


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


def check_key_transport(
    base_url: str, api_key: str | None, allow_insecure_http: bool = False, allow_hint: str = "--allow_insecure_http"
) -> None:
    """Raise InsecureJudgeURLError unless `base_url` is http(s), and the key, if any, would travel
    encrypted or stay on this machine. Checked before any request, so a refused key never leaves.

    Plain http to another host sends the key in clear text to anyone on the network path;
    `allow_insecure_http` is for a trusted network (e.g. a judge server inside a private cluster).
    `allow_hint` is how the caller's user allows it (a flag or a keyword argument), for the message.
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
            f"127.0.0.0/8, ::1), or pass {allow_hint} if the network is trusted."
        )


def import_openai() -> ModuleType:
    """The openai module, or ImportError saying how to install it."""
    try:
        import openai
    except ImportError as error:
        raise ImportError(OPENAI_MISSING_MESSAGE) from error
    return openai


# The SDK refuses to build a client without some key. With no JUDGE_API_KEY it gets this
# placeholder, and every request then leaves the Authorization header out.
_NO_KEY_PLACEHOLDER = "no-key"


class OpenAISDKJudge:
    """One chat-completions request per call through the openai SDK; raises JudgeRequestError on failure.

    The same key rules as the stdlib client: `check_key_transport` runs before the client exists,
    the key is the one given (never the SDK's own OPENAI_API_KEY lookup), and redirects are not
    followed. Failed requests are retried by the SDK (`max_retries`, exponential backoff, honouring
    the server's Retry-After), so callers should not retry again.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None,
        timeout_s: float,
        max_retries: int,
        allow_insecure_http: bool = False,
        allow_hint: str = "--allow_insecure_http",
    ):
        check_key_transport(base_url, api_key, allow_insecure_http, allow_hint)
        openai = import_openai()
        self._openai = openai
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._request_headers = {} if api_key else {"Authorization": openai.Omit()}
        self._client = openai.OpenAI(
            base_url=self.base_url,  # explicit, so OPENAI_BASE_URL is never used
            api_key=api_key or _NO_KEY_PLACEHOLDER,  # explicit, so OPENAI_API_KEY is never sent
            max_retries=max_retries,
            timeout=timeout_s,
            # The SDK's default client follows redirects with the request's headers.
            http_client=openai.DefaultHttpxClient(timeout=timeout_s, follow_redirects=False),
        )

    def __repr__(self) -> str:  # keeps the key out of any log or traceback that prints the object
        return f"OpenAISDKJudge(base_url={self.base_url!r}, model={self.model!r})"

    def generate(self, prompt: str) -> str:
        openai = self._openai
        where = f"{self.base_url}/chat/completions"
        try:
            completion = self._client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                temperature=0,
                extra_headers=self._request_headers,
            )
        except openai.APIStatusError as error:
            status = error.status_code
            if 300 <= status < 400:
                raise JudgeRequestError(
                    f"{where}: HTTP {status} redirect to {error.response.headers.get('location')} not followed "
                    "(the request carries the API key); set the judge base URL to the final address",
                    retryable=False,
                ) from error
            detail = error.response.text[:200]
            raise JudgeRequestError(
                f"{where}: HTTP {status}: {detail}", retryable=status in RETRYABLE_STATUS
            ) from error
        except openai.APIError as error:  # timeouts, refused connections, replies that are not JSON
            retryable = isinstance(error, openai.APIConnectionError)
            raise JudgeRequestError(f"{where}: {type(error).__name__}: {error}", retryable=retryable) from error
        try:
            content = completion.choices[0].message.content
        except (AttributeError, IndexError, TypeError) as error:
            raise JudgeRequestError(
                f"{where}: reply is not a chat completion: {str(completion)[:200]}", retryable=False
            ) from error
        return content or ""  # some servers send null content for an empty reply
