"""The openai-SDK judge (`--judge openai-sdk`) and the LLM-judge reward function
(examples/reward_function/llm_judge.py), both graded against a real local /v1/chat/completions
server: verdicts, the cache, retries on server errors, the API key's transport rules, and the
message when the optional openai package is missing."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "Evaluation"))  # the scripts import their sibling modules by name

import LLM_eval  # noqa: E402

from verl.reward import RewardFunction, RewardFunctionError, aggregate_reward_metrics  # noqa: E402
from verl.utils.llm_judge import (  # noqa: E402
    OPENAI_MISSING_MESSAGE,
    InsecureJudgeURLError,
    JudgeRequestError,
    OpenAISDKJudge,
)

needs_openai = pytest.mark.skipif(
    importlib.util.find_spec("openai") is None,
    reason="the openai package is not installed (optional: pip install 'vision-sr1[judge]'; requirements/dev.txt has it)",
)

KEY = "sk-sdk-test-secret"
REWARD_SPEC = f"{REPO_ROOT / 'examples' / 'reward_function' / 'llm_judge.py'}:compute_score"
INSTALL_HINT = "pip install 'vision-sr1[judge]'"


class ChatCompletionsServer:
    """An OpenAI-style /v1/chat/completions server on 127.0.0.1 that answers by the `[q-<tag>]` in
    the prompt, following `scripts[tag]`: one action per request, the last one repeated. An action
    is a reply text, ("status", code) or ("redirect", location). Records every request."""

    def __init__(self, scripts: dict[str, list]):
        self.scripts = scripts
        self.hits: Counter = Counter()
        self.authorizations: list[str | None] = []
        self.paths: list[str] = []
        self.bodies: list[dict] = []
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def _handler_class(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                tag = re.search(r"\[q-([a-z-]+)\]", body["messages"][0]["content"]).group(1)
                with owner._lock:
                    owner.hits[tag] += 1
                    owner.authorizations.append(self.headers.get("Authorization"))
                    owner.paths.append(self.path)
                    owner.bodies.append(body)
                    script = owner.scripts[tag]
                    action = script[min(owner.hits[tag], len(script)) - 1]
                if isinstance(action, tuple) and action[0] == "status":
                    payload = json.dumps({"error": {"message": f"scripted {action[1]}"}}).encode()
                    self.send_response(action[1])
                    self.send_header("retry-after-ms", "1")  # the SDK waits this long before its retry
                elif isinstance(action, tuple) and action[0] == "redirect":
                    payload = b""
                    self.send_response(307)
                    self.send_header("Location", action[1])
                else:
                    completion = {
                        "id": "chatcmpl-test",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": action}}
                        ],
                    }
                    payload = json.dumps(completion).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        return Handler

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(scripts: dict[str, list]) -> ChatCompletionsServer:
        servers.append(ChatCompletionsServer(scripts))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(autouse=True)
def no_openai_environment(monkeypatch):
    """The SDK reads these when not given explicitly; the judge must never use them."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "JUDGE_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- the grading command's SDK judge

GRADING_SCRIPTS = {
    "yes": ["CORRECT"],
    "no": ["INCORRECT"],
    "maybe": ["Maybe correct?"],
    "flaky": [("status", 500), "Verdict: CORRECT"],
    "down": [("status", 503)],
    "bad-request": [("status", 400)],
}


def grade_with_sdk(server: ChatCompletionsServer, input_dir: Path, output_dir: Path, max_retries: int = 1) -> int:
    args = ["--input_dir", str(input_dir), "--output_dir", str(output_dir), "--judge", "openai-sdk"]
    args += ["--judge_base_url", server.base_url, "--judge_model", "judge-model", "--timeout", "5"]
    return LLM_eval.main([*args, "--max_retries", str(max_retries), "--concurrency", "3"])


@needs_openai
def test_sdk_judge_grades_retries_and_caches(tmp_path, serve, monkeypatch, capsys):
    monkeypatch.setenv("JUDGE_API_KEY", KEY)
    server = serve(GRADING_SCRIPTS)
    rows = [
        {"id": tag, "prompt": f"<image>[q-{tag}] 6*7?", "response": "\\boxed{41}", "ground_truth": "42"}
        for tag in GRADING_SCRIPTS
    ]
    rows.append({"id": "rule", "prompt": "[q-rule] 6*7?", "response": "\\boxed{42}", "ground_truth": "42"})
    input_dir, output_dir = tmp_path / "raw", tmp_path / "graded"
    write_jsonl(input_dir / "mathvista.jsonl", [{**row, "benchmark": "mathvista"} for row in rows])

    assert grade_with_sdk(server, input_dir, output_dir) == 0
    verdicts = {row["id"]: row["judge_verdict"] for row in read_jsonl(output_dir / "mathvista.jsonl")}
    assert verdicts == {
        "yes": "correct",
        "no": "incorrect",
        "maybe": "unparsed",
        "flaky": "correct",
        "down": "error",
        "bad-request": "error",
        "rule": "skipped",
    }
    # The SDK retried each server error once (--max_retries 1), but not the 400; the rules' row was never sent.
    assert server.hits == Counter({"yes": 1, "no": 1, "maybe": 1, "flaky": 2, "down": 2, "bad-request": 1})
    assert set(server.paths) == {"/v1/chat/completions"}
    assert set(server.authorizations) == {f"Bearer {KEY}"}
    assert {body["model"] for body in server.bodies} == {"judge-model"}
    output = capsys.readouterr()
    assert KEY not in output.out + output.err
    assert "HTTP 503" in output.err and "HTTP 400" in output.err

    # A fresh output folder: cached replies are reused, only the failed requests are asked again.
    (output_dir / "mathvista.jsonl").unlink()
    hits_before = server.hits.copy()
    assert grade_with_sdk(server, input_dir, output_dir) == 0
    assert server.hits - hits_before == Counter({"down": 2, "bad-request": 1})


@needs_openai
def test_sdk_judge_without_retries_fails_on_the_first_server_error(serve):
    server = serve({"flaky": [("status", 500), "CORRECT"]})
    judge = LLM_eval.build_judge("openai-sdk", server.base_url, "m", 5.0, 0, 0.0)
    with pytest.raises(JudgeRequestError, match="HTTP 500"):
        judge.ask("[q-flaky] question")
    assert server.hits == Counter({"flaky": 1})
    assert judge.ask("[q-flaky] question") == "CORRECT"  # the stdlib Judge does not retry on top of the SDK


@needs_openai
@pytest.mark.parametrize("url", ["http://judge.example.com/v1", "http://10.0.0.7:8000/v1", "http://[2001:db8::1]/v1"])
def test_sdk_judge_refuses_the_key_over_plain_http_to_another_host(url, tmp_path, monkeypatch, capsys):
    with pytest.raises(InsecureJudgeURLError, match="refusing to send the judge API key .* over plain http"):
        OpenAISDKJudge(url, "m", KEY, timeout_s=1, max_retries=0)
    OpenAISDKJudge(url, "m", KEY, timeout_s=1, max_retries=0, allow_insecure_http=True)  # explicitly allowed
    OpenAISDKJudge(url, "m", None, timeout_s=1, max_retries=0)  # no key, nothing to leak

    monkeypatch.setenv("JUDGE_API_KEY", KEY)
    args = ["--input_dir", str(tmp_path / "in"), "--output_dir", str(tmp_path / "out"), "--judge", "openai-sdk"]
    assert LLM_eval.main([*args, "--judge_base_url", url, "--judge_model", "m"]) == 1
    err = capsys.readouterr().err
    assert (
        "refusing to send the judge API key (JUDGE_API_KEY) over plain http" in err and "--allow_insecure_http" in err
    )
    assert KEY not in err and not (tmp_path / "out").exists()


@needs_openai
def test_sdk_judge_never_sends_the_sdks_own_environment_key(serve, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-openai-env")
    server = serve({"yes": ["CORRECT"]})
    judge = LLM_eval.build_judge("openai-sdk", server.base_url, "m", 5.0, 0, 0.0)
    assert judge.ask("[q-yes] question") == "CORRECT"
    assert server.authorizations == [None]  # not the SDK's OPENAI_API_KEY, and no placeholder either


@needs_openai
def test_sdk_judge_does_not_follow_redirects(serve):
    target = serve({"moved": ["CORRECT"]})
    server = serve({"moved": [("redirect", f"{target.base_url}/chat/completions")]})
    judge = OpenAISDKJudge(server.base_url, "m", KEY, timeout_s=5, max_retries=2)
    with pytest.raises(JudgeRequestError, match="HTTP 307 redirect to .* not followed") as caught:
        judge.generate("[q-moved] question")
    assert not caught.value.retryable
    assert server.hits == Counter({"moved": 1}) and target.hits == Counter()  # the target never saw the key
    assert KEY not in repr(judge)


# ---------------------------------------------------------------- the missing optional dependency


def run_without_openai(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where `import openai` fails, as it does when the package
    is not installed (a None entry in sys.modules makes the import raise ImportError)."""
    script = tmp_path / "without_openai.py"
    preamble = f"import sys\nsys.modules['openai'] = None\nsys.path[:0] = [{str(REPO_ROOT)!r}, {str(REPO_ROOT / 'Evaluation')!r}]\n"
    script.write_text(preamble + textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=os.environ.copy()
    )


def test_missing_openai_says_how_to_install_it(tmp_path):
    result = run_without_openai(
        f"""
        import LLM_eval
        from verl.reward import RewardFunction, RewardFunctionError

        # The default stdlib judge needs nothing more.
        assert LLM_eval.build_judge("openai", "http://localhost:1/v1", "m", 1.0, 0, 0.0) is not None
        args = ["--input_dir", "in", "--output_dir", "out", "--judge", "openai-sdk"]
        code = LLM_eval.main([*args, "--judge_base_url", "http://localhost:1/v1", "--judge_model", "m"])
        print("exit code", code)
        try:
            RewardFunction({REWARD_SPEC!r})
        except RewardFunctionError as error:
            print("reward:", error)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "exit code 1" in result.stdout
    assert f"error: {OPENAI_MISSING_MESSAGE}" in result.stderr and INSTALL_HINT in OPENAI_MISSING_MESSAGE
    reward_line = next(line for line in result.stdout.splitlines() if line.startswith("reward:"))
    assert "llm_judge.py" in reward_line and INSTALL_HINT in reward_line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the LLM-judge reward function

BOXED_41 = "<description>six rows of seven</description> <think>6*7</think> \\boxed{41}"
BOXED_42 = "<description>six rows of seven</description> <think>6*7</think> \\boxed{42}"


def reward_input(tag: str, response: str, ground_truth: str = "42") -> dict:
    return {
        "response": response,
        "response_length": len(response.split()),
        "ground_truth": ground_truth,
        "question": f"[q-{tag}] How many dots are there?",
        "description_answers": None,
        "extra": {},
    }


@pytest.fixture
def reward_env(monkeypatch):
    def configure(server: ChatCompletionsServer, key: str | None = KEY) -> None:
        monkeypatch.setenv("REWARD_JUDGE_BASE_URL", server.base_url)
        monkeypatch.setenv("REWARD_JUDGE_MODEL", "reward-judge")
        if key:
            monkeypatch.setenv("JUDGE_API_KEY", key)

    return configure


@needs_openai
def test_reward_asks_the_judge_where_the_rules_fail(serve, reward_env, capsys):
    server = serve(
        {
            "yes": ["CORRECT"],
            "no": ["INCORRECT"],
            "maybe": ["It might be right."],
            "flaky": [("status", 502), "Verdict: CORRECT"],
            "bad-request": [("status", 400)],
            "rule": ["INCORRECT"],  # never asked: the rules accept it
        }
    )
    reward_env(server)
    reward = RewardFunction(REWARD_SPEC, {"max_retries": 1, "max_workers": 3})
    samples = [
        reward_input("yes", BOXED_41.replace("41", "forty-two")),
        reward_input("no", BOXED_41),
        reward_input("maybe", BOXED_41),
        reward_input("flaky", BOXED_41),
        reward_input("bad-request", BOXED_41),
        reward_input("rule", BOXED_42),
    ]
    scores = reward(samples)
    assert [score["accuracy"] for score in scores] == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    assert [score["judge_asked"] for score in scores] == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert [score["judge_unparsed"] for score in scores] == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert [score["judge_failed"] for score in scores] == [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert scores[0]["rule_accuracy"] == 0.0 and scores[0]["overall"] == pytest.approx(0.9 + 0.1)
    assert server.hits == Counter({"yes": 1, "no": 1, "maybe": 1, "flaky": 2, "bad-request": 1})
    assert set(server.authorizations) == {f"Bearer {KEY}"}
    assert {body["model"] for body in server.bodies} == {"reward-judge"}
    assert "forty-two" in json.dumps(server.bodies)  # the judge sees the boxed answer
    metrics = aggregate_reward_metrics(scores)
    assert metrics["reward/judge_unparsed"] == pytest.approx(1 / 6)
    assert metrics["reward/judge_failed"] == pytest.approx(1 / 6)
    assert "1 of 5 judge requests failed" in capsys.readouterr().err


@needs_openai
def test_reward_falls_back_to_the_rules_on_an_unparsed_reply(serve, reward_env):
    server = serve({"right": ["Looks fine to me"], "wrong": ["INCORRECT"]})
    reward_env(server, key=None)
    reward = RewardFunction(REWARD_SPEC, {"judge_every_response": True, "accuracy_weight": 1.0, "format_weight": 0.0})
    right, wrong = reward([reward_input("right", BOXED_42), reward_input("wrong", BOXED_42)])
    assert (right["accuracy"], right["judge_unparsed"], right["judge_asked"]) == (1.0, 1.0, 1.0)  # the rules' grade
    assert (wrong["accuracy"], wrong["rule_accuracy"], wrong["overall"]) == (0.0, 1.0, 0.0)  # the judge overrules
    assert set(server.authorizations) == {None}  # no key, no Authorization header


@needs_openai
def test_reward_raises_when_every_request_fails(serve, reward_env):
    server = serve({"down": [("status", 500)]})
    reward_env(server)
    reward = RewardFunction(REWARD_SPEC, {"max_retries": 2})
    with pytest.raises(RewardFunctionError, match=r"every judge request of this batch failed \(1\).*HTTP 500"):
        reward([reward_input("down", BOXED_41)])
    assert server.hits == Counter({"down": 3})  # the first try and two retries


@needs_openai
def test_reward_needs_its_environment_variables(monkeypatch):
    monkeypatch.delenv("REWARD_JUDGE_BASE_URL", raising=False)
    monkeypatch.setenv("REWARD_JUDGE_MODEL", "m")
    reward = RewardFunction(REWARD_SPEC)
    assert reward([reward_input("rule", BOXED_42)])[0]["accuracy"] == 1.0  # nothing to ask, nothing needed
    with pytest.raises(RewardFunctionError, match="needs REWARD_JUDGE_BASE_URL set in the environment"):
        reward([reward_input("no", BOXED_41)])


@needs_openai
def test_reward_refuses_the_key_over_plain_http_to_another_host(monkeypatch):
    monkeypatch.setenv("REWARD_JUDGE_BASE_URL", "http://judge.example.com/v1")
    monkeypatch.setenv("REWARD_JUDGE_MODEL", "m")
    monkeypatch.setenv("JUDGE_API_KEY", KEY)
    with pytest.raises(RewardFunctionError, match="over plain http to judge.example.com.*allow_insecure_http=True"):
        RewardFunction(REWARD_SPEC)([reward_input("no", BOXED_41)])
