"""The LLM judge of Evaluation/LLM_eval.py against a real `vllm serve` (vllm_cpu tier).

The original Vision-SR1 counted every judge reply lacking the word "incorrect" as correct, so a
judge that rambles, or a server that sends back noise, inflated the accuracy. Here the judge is
the tiny world's random text Qwen2 behind vLLM's OpenAI-compatible server: its replies are noise.
Through the real CLI path (OpenAICompatibleJudge over HTTP, the resumable cache, the summary and
the accuracy table) the test checks that every free-form row the rules did not accept reaches
the server, that the server really answered each one (its replies are in the judge cache), that
none of those rows counts as correct (each is unparsed, or incorrect if a reply happened to
parse), that the accuracy with the judge equals the rules-only accuracy, and that a rerun takes
the replies from the cache instead of asking again.

Needs the environment made by `bash setup.sh --vllm-cpu` and a tiny world built by the main
environment (docs/vllm.md); elsewhere the module is skipped.
"""

import csv
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "Evaluation"))  # the scripts import their sibling modules by name

import LLM_eval  # noqa: E402
from judge import JudgeCache, build_judge_prompt, parse_verdict  # noqa: E402
from schema import JUDGE_CACHE_FILE  # noqa: E402

eval_tables = importlib.import_module("eval")  # Evaluation/eval.py; `import eval` would shadow the builtin

try:
    import vllm  # noqa: F401

    VLLM_MISSING = None
except ImportError as exc:
    VLLM_MISSING = f"vLLM is not importable ({exc}); this tier runs in .venv-vllm-cpu (bash setup.sh --vllm-cpu)"

pytestmark = [pytest.mark.vllm_cpu, pytest.mark.skipif(VLLM_MISSING is not None, reason=VLLM_MISSING or "")]

SERVED_MODEL = "tiny-judge"
STARTUP_DEADLINE_S = 300.0
# The client sends no max_tokens, so the server's default applies: without this cap vLLM would
# generate up to max-model-len, hundreds of tokens per reply on CPU.
MAX_REPLY_TOKENS = 16
# Room for 4096 tokens of the model's fp32 keys and values (2 x 4 layers x 1 KV head x 64 x 4
# bytes = 2 KiB a token); vLLM's CPU default would reserve a share of host RAM.
KV_CACHE_BYTES = 8 * 2**20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-chars:] if path.exists() else "(no log)"


class VLLMServer:
    """A `vllm serve` subprocess on 127.0.0.1 with its output in `log_path`."""

    def __init__(self, model_path: Path, log_path: Path):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log_path = log_path
        command = [
            sys.executable,
            # vllm-cpu's `vllm` console script looks up the distribution "vllm" and fails
            # (it is installed as "vllm-cpu"); this module runs the same server.
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_path),
            "--served-model-name",
            SERVED_MODEL,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
            "--enforce-eager",  # no torch.compile: up in about a minute on CPU
            "--kv-cache-memory-bytes",
            str(KV_CACHE_BYTES),
            "--override-generation-config",
            json.dumps({"max_new_tokens": MAX_REPLY_TOKENS}),
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # a complete log when the server dies
        # The legacy KV-cache variable would override --kv-cache-memory-bytes, and the rollout
        # tests of this tier switch vLLM's engine process off in the pytest process.
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        self._log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115  (closed in stop())
        # Its own session, so that stop() reaches the engine-core and worker processes too.
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def wait_until_healthy(self, deadline_s: float) -> float:
        """Seconds until /health answered 200; pytest.fail with the log tail if it died or timed out."""
        started = time.monotonic()
        while time.monotonic() - started < deadline_s:
            if self.process.poll() is not None:
                pytest.fail(
                    f"vllm serve exited with {self.process.returncode} before it was up; log tail:\n"
                    f"{log_tail(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response:
                    if response.status == 200:
                        return time.monotonic() - started
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(1.0)
        pytest.fail(f"vllm serve was not up after {deadline_s:.0f} s; log tail:\n{log_tail(self.log_path)}")

    def chat_requests(self) -> int:
        """Chat-completion requests the server answered, counted in its access log."""
        return log_tail(self.log_path, chars=10**9).count('"POST /v1/chat/completions HTTP/1.1" 200')

    def _group_alive(self) -> bool:
        self.process.poll()  # reap the server itself, or its zombie would keep the group alive
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to the server and its children, SIGKILL to whatever is left after `grace_s`."""
        try:
            if self._group_alive():
                os.killpg(self.process.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while self._group_alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            if self._group_alive():
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        except ProcessLookupError:  # the group ended between the check and the signal
            pass
        finally:
            self._log.close()


@pytest.fixture(scope="module")
def judge_server(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    log_path = tmp_path_factory.mktemp("vllm_judge") / "server.log"
    server = VLLMServer(tiny_world / "models" / "qwen2_text", log_path)
    try:
        server.wait_until_healthy(STARTUP_DEADLINE_S)
        yield server
    finally:
        server.stop()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def generation_rows() -> list[dict]:
    """Two rows the rules accept, a multiple-choice row (never judged), four free-form rows for the judge."""

    def row(row_id: str, question: str, response: str, ground_truth: str, **extra: object) -> dict:
        return {
            "id": row_id,
            "prompt": f"<image>{question}",
            "response": response,
            "ground_truth": ground_truth,
            "benchmark": "mathvista",
            **extra,
        }

    return [
        row("boxed-right", "What is 6 times 7?", "<think>6*7=42</think> \\boxed{42}", "42"),
        row("boxed-equivalent", "What fraction of the bar is shaded?", "Half of it: \\boxed{\\frac{1}{2}}", "0.5"),
        row("mcq-wrong", "Which city is the capital of France?", "\\boxed{A}", "B", choices=["London", "Paris"]),
        row("free-text", "How many legs do two spiders have?", "Each has eight legs, so sixteen in all.", "16"),
        row("off-topic", "What is the area of the square?", "The picture shows a red car on a street.", "9"),
        row("boxed-wrong", "What is 9 minus 4?", "<think>9-4</think> \\boxed{6}", "5"),
        row("empty", "How many circles are there?", "", "7"),
    ]


JUDGED_IDS = {"free-text", "off-topic", "boxed-wrong", "empty"}


def grade(input_dir: Path, output_dir: Path, *judge_args: str) -> int:
    return LLM_eval.main(["--input_dir", str(input_dir), "--output_dir", str(output_dir), *judge_args])


def openai_judge_args(base_url: str, max_retries: int) -> list[str]:
    # A generous timeout: the CPU may be shared with other test runs.
    return [
        *("--judge", "openai", "--judge_base_url", base_url, "--judge_model", SERVED_MODEL),
        *("--timeout", "120", "--max_retries", str(max_retries), "--retry_backoff", "1", "--concurrency", "2"),
    ]


def by_id(path: Path) -> dict[str | int, dict]:
    rows = read_jsonl(path)
    assert len(rows) == len({row["id"] for row in rows}), "a row was written twice"
    return {row["id"]: row for row in rows}


def test_noise_from_a_real_judge_never_counts_as_correct(
    judge_server: VLLMServer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    input_dir, output_dir = tmp_path / "raw" / "tiny-model", tmp_path / "graded" / "tiny-model"
    write_jsonl(input_dir / "mathvista.jsonl", generation_rows())
    requests_before = judge_server.chat_requests()

    assert grade(input_dir, output_dir, *openai_judge_args(judge_server.base_url, max_retries=1)) == 0
    output = capsys.readouterr()
    graded = by_id(output_dir / "mathvista.jsonl")
    assert set(graded) == {row["id"] for row in generation_rows()}

    # Exactly the free-form rows the rules did not accept were judged.
    judged = {row_id for row_id, row in graded.items() if row["judge_verdict"] != "skipped"}
    assert judged == JUDGED_IDS, output.err
    assert {row_id for row_id, row in graded.items() if row["rule_correct"]} == {"boxed-right", "boxed-equivalent"}

    # The server answered every judged row: one cache line each, with a reply it generated.
    cache_lines = read_jsonl(output_dir / JUDGE_CACHE_FILE)
    assert len(cache_lines) == len(JUDGED_IDS)
    assert all(line["judge"] == SERVED_MODEL for line in cache_lines)
    assert all(isinstance(line["reply"], str) and line["reply"] for line in cache_lines), cache_lines
    cache = JudgeCache(output_dir / JUDGE_CACHE_FILE)
    # The access log line may be written just after the client has its reply.
    deadline = time.monotonic() + 10
    while judge_server.chat_requests() - requests_before < len(JUDGED_IDS) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert judge_server.chat_requests() - requests_before == len(JUDGED_IDS)

    # Noise never counts: each judged row is unparsed, or incorrect if its reply parsed as that.
    for row_id in JUDGED_IDS:
        row = graded[row_id]
        reply = cache.get(SERVED_MODEL, build_judge_prompt(row, row["rule_answer"]))
        assert reply is not None, (row_id, output.err)
        assert row["judge_verdict"] == parse_verdict(reply), (row_id, reply)
        assert row["judge_verdict"] in ("unparsed", "incorrect"), (row_id, reply)
        assert row["final_correct"] is False, (row_id, reply)

    # The per-file summary line counts the same verdicts.
    incorrect = sum(graded[row_id]["judge_verdict"] == "incorrect" for row_id in JUDGED_IDS)
    unparsed = len(JUDGED_IDS) - incorrect
    verdicts = ", ".join(
        f"{name} {count}" for name, count in (("incorrect", incorrect), ("unparsed", unparsed)) if count
    )
    summary = f"mathvista.jsonl: graded 7 (0 already done), rules correct 2; judge: {verdicts}"
    assert summary in output.out.splitlines(), output.out

    # Accuracy with the judge is the rules-only accuracy, row by row and in the reported table.
    rules_only_dir = tmp_path / "graded-rules-only" / "tiny-model"
    assert grade(input_dir, rules_only_dir, "--judge", "none") == 0
    rules_only = by_id(rules_only_dir / "mathvista.jsonl")
    with_judge = {row_id: row["final_correct"] for row_id, row in graded.items()}
    assert with_judge == {row_id: row["final_correct"] for row_id, row in rules_only.items()}
    tables_dir = tmp_path / "tables"
    assert eval_tables.main(["--graded_dir", str(output_dir), "--out_dir", str(tables_dir)]) == 0
    with open(tables_dir / "results.csv", newline="", encoding="utf-8") as file:
        table = {(line["model"], line["benchmark"]): line for line in csv.DictReader(file)}
    line = table[("tiny-model", "mathvista")]
    expected_accuracy = f"{100 * 2 / 7:.2f}"
    assert line["n"] == "7"
    assert line["rule_accuracy"] == line["rule_judge_accuracy"] == expected_accuracy
    assert (line["unparsed"], line["errors"]) == (str(unparsed), "0")

    # A fresh grading with the cache kept takes every reply from the cache: pointed at a port with
    # no server and no retries, any request it made would fail and show up as an "error" verdict.
    cache_bytes = (output_dir / JUDGE_CACHE_FILE).read_bytes()
    (output_dir / "mathvista.jsonl").unlink()
    capsys.readouterr()
    assert grade(input_dir, output_dir, *openai_judge_args(f"http://127.0.0.1:{free_port()}/v1", max_retries=0)) == 0
    assert "judge request failed" not in capsys.readouterr().err
    assert (output_dir / JUDGE_CACHE_FILE).read_bytes() == cache_bytes
    assert by_id(output_dir / "mathvista.jsonl") == graded
