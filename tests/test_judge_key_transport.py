"""The judge's API key never crosses the network in clear text: plain http to another host is refused
before any request (unless explicitly allowed), and redirects, which urllib would follow with the
key attached, are not followed."""

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Evaluation"))  # the scripts import siblings by name

import LLM_eval  # noqa: E402
from judge import (  # noqa: E402
    InsecureJudgeURLError,
    JudgeRequestError,
    OpenAICompatibleJudge,
    is_local_host,
)

KEY = "sk-test-secret"


@pytest.mark.parametrize(
    "url",
    [
        "http://judge.example.com/v1",
        "http://10.0.0.7:8000/v1",
        "http://[2001:db8::1]:8000/v1",
        "http://localhost.evil/",
    ],
)
def test_a_key_over_plain_http_to_another_host_is_refused(url):
    with pytest.raises(InsecureJudgeURLError, match="refusing to send the judge API key .* over plain http"):
        OpenAICompatibleJudge(url, "m", KEY, timeout_s=1)
    OpenAICompatibleJudge(url, "m", KEY, timeout_s=1, allow_insecure_http=True)  # explicitly allowed
    OpenAICompatibleJudge(url, "m", None, timeout_s=1)  # no key, nothing to leak


@pytest.mark.parametrize(
    "url",
    [
        "https://api.openai.com/v1",
        "http://localhost:8000/v1",
        "http://LOCALHOST:8000/v1",
        "http://127.0.0.1:8000/v1",
        "http://127.45.0.3/v1",
        "http://[::1]:8000/v1",
        "http://[::ffff:127.0.0.1]:8000/v1",
    ],
)
def test_https_and_this_machine_take_the_key(url):
    OpenAICompatibleJudge(url, "m", KEY, timeout_s=1)


def test_loopback_detection():
    assert is_local_host("localhost") and is_local_host("127.255.0.1") and is_local_host("::1")
    assert not is_local_host("128.0.0.1") and not is_local_host("example.com") and not is_local_host(None)


@pytest.mark.parametrize("url", ["localhost:8000/v1", "ftp://judge.example.com/v1", "file:///etc/passwd"])
def test_a_url_that_is_not_http_is_refused(url):
    with pytest.raises(InsecureJudgeURLError, match="must start with http:// or https://"):
        OpenAICompatibleJudge(url, "m", None, timeout_s=1)


def test_the_command_refuses_before_grading_and_says_how_to_allow(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JUDGE_API_KEY", KEY)
    args = ["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out")]
    args += ["--judge_base_url", "http://judge.example.com/v1", "--judge_model", "m"]
    assert LLM_eval.main(args) == 1
    err = capsys.readouterr().err
    assert "refusing to send the judge API key (JUDGE_API_KEY) over plain http to judge.example.com" in err
    assert "--allow_insecure_http" in err and KEY not in err
    assert not (tmp_path / "out").exists()  # nothing graded, no request made
    allowed = LLM_eval.parse_args([*args, "--allow_insecure_http"])
    judge = LLM_eval.build_judge(
        "openai", allowed.judge_base_url, allowed.judge_model, 1.0, 0, 0.0, allowed.allow_insecure_http
    )
    assert judge is not None and judge.name == "m"


class _Redirecting(BaseHTTPRequestHandler):
    """Answers the judge's POST with a redirect; records every request and its Authorization header."""

    seen: list[tuple[str, str | None]] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        self.seen.append((self.path, self.headers.get("Authorization")))
        self.send_response(302)
        self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST  # noqa: N815

    def log_message(self, *args):
        pass


def test_redirects_are_not_followed_with_the_key():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirecting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        judge = OpenAICompatibleJudge(f"http://127.0.0.1:{server.server_port}/v1", "m", KEY, timeout_s=10)
        with pytest.raises(JudgeRequestError, match="HTTP 302 redirect to .*/elsewhere not followed") as caught:
            judge.generate("question")
    finally:
        server.shutdown()
        server.server_close()
    assert not caught.value.retryable
    assert _Redirecting.seen == [("/v1/chat/completions", f"Bearer {KEY}")]  # the redirect target was never asked
