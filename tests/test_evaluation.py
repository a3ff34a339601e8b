"""The scoring half of Evaluation/: rule grading, the LLM judge against a real HTTP server,
resume and cache, the accuracy tables, and the download script's offline failure."""

import csv
import importlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
EVALUATION_DIR = REPO_ROOT / "Evaluation"
sys.path.insert(0, str(EVALUATION_DIR))  # the scripts import their sibling modules by name

import LLM_eval  # noqa: E402
from judge import JudgeCache, parse_verdict  # noqa: E402
from rule_grading import extract_choice, rule_grade  # noqa: E402
from schema import RowError, load_generations  # noqa: E402

eval_tables = importlib.import_module("eval")  # Evaluation/eval.py; `import eval` would shadow the builtin


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------- rule grading


@pytest.mark.parametrize(
    ("text", "n_choices", "expected"),
    [
        ("(B)", 4, "B"),
        ("B.", 4, "B"),
        ("B)", 4, "B"),
        ("B", 4, "B"),
        ("(C) Paris", 4, "C"),
        ("Answer: B", 4, "B"),
        ("The answer is B", 4, "B"),
        ("so the final answer is: (D).", 4, "D"),
        ("\\boxed{B}", 4, "B"),
        ("\\boxed{(B) Paris}", 4, "B"),
        ("<think>x</think> \\boxed{\\text{C}}", 4, "C"),
        ("Answer: A at first, but \\boxed{C}", 4, "C"),  # the box is the final answer
        ("The answer is A? No: the answer is C.", 4, "C"),  # the last phrase wins
        ("Answer: J", 10, "J"),
        ("A cat sits on the mat.", 4, None),  # an article, not a choice
        ("Answer: I think it is unclear", 10, None),  # a pronoun, not choice I
        ("\\boxed{E}", 4, None),  # beyond the 4 choices
        ("\\boxed{Paris}", 4, None),
        ("", 4, None),
    ],
)
def test_extract_choice(text, n_choices, expected):
    assert extract_choice(text, n_choices) == expected


def test_extract_choice_rejects_impossible_choice_counts():
    with pytest.raises(ValueError, match="n_choices"):
        extract_choice("B", 0)


def test_rule_grade_free_form_uses_the_boxed_answer():
    assert rule_grade({"id": 1, "response": "so \\boxed{\\frac{1}{2}}", "ground_truth": "0.5"}) == (
        True,
        "\\frac{1}{2}",
    )
    assert rule_grade({"id": 2, "response": "\\boxed{3}", "ground_truth": "4"}) == (False, "3")
    assert rule_grade({"id": 3, "response": "the answer is 4", "ground_truth": "4"}) == (False, None)


def test_rule_grade_multiple_choice():
    choices = ["London", "Paris", "Rome"]
    by_letter = {"id": 1, "choices": choices, "ground_truth": "B"}
    assert rule_grade({**by_letter, "response": "Answer: (B)"}) == (True, "B")
    assert rule_grade({**by_letter, "response": "\\boxed{Paris}"}) == (True, "B")  # the choice's text
    assert rule_grade({**by_letter, "response": "\\boxed{C}"}) == (False, "C")
    assert rule_grade({**by_letter, "response": "no idea"}) == (False, None)
    # Ground truth given as the choice's text, or as "(J)" without a choice list (up to 10 letters).
    assert rule_grade({"id": 2, "choices": choices, "ground_truth": "Paris", "response": "B."}) == (True, "B")
    no_list = {"id": 3, "question_type": "multiple_choice", "ground_truth": "(J)", "response": "The answer is J."}
    assert rule_grade(no_list) == (True, "J")
    with pytest.raises(ValueError, match="row id 4.*'Berlin'"):
        rule_grade({"id": 4, "choices": choices, "ground_truth": "Berlin", "response": "B"})


def test_loader_names_file_and_line_of_a_bad_row(tmp_path):
    good = {"id": 1, "prompt": "q", "response": "r", "ground_truth": "4", "benchmark": "b"}
    path = tmp_path / "b.jsonl"
    write_jsonl(path, [good, {**good, "id": 2, "ground_truth": 4}])
    with pytest.raises(RowError, match=rf"{re.escape(str(path))}:2: field 'ground_truth' must be str"):
        load_generations(path)
    write_jsonl(path, [good, {**good, "response": "other"}])
    with pytest.raises(RowError, match=r":2: id 1 already used on line 1"):
        load_generations(path)
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(RowError, match=r":2: "):
        load_generations(path)


# ---------------------------------------------------------------- verdict parsing


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("CORRECT", "correct"),
        ("incorrect", "incorrect"),
        ("  Correct.\n", "correct"),
        ("The numbers agree.\nVerdict: CORRECT", "correct"),
        ("**Verdict: INCORRECT**", "incorrect"),
        ("Maybe correct?", "unparsed"),
        ("", "unparsed"),
        ("The answer is not incorrect", "unparsed"),  # the original counted this as correct
        ("correct, but incomplete", "unparsed"),
        ("Verdict: CORRECT\nOn second thought, no.", "unparsed"),
    ],
)
def test_parse_verdict_is_strict(reply, verdict):
    assert parse_verdict(reply) == verdict


# ---------------------------------------------------------------- judge against a real server

# Scenario tag (written into the question) -> what the server does on the 1st, 2nd, ... request;
# the last action repeats. A string is the reply's content.
SCRIPTS = {
    "plain": ["CORRECT"],
    "lower": ["incorrect"],
    "verdict-line": ["Both give 42.\nVerdict: CORRECT"],
    "maybe": ["Maybe correct?"],
    "empty": [""],
    "not-incorrect": ["The answer is not incorrect"],
    "flaky": [("status", 500), "CORRECT"],
    "bad-request": [("status", 400)],
    "slow": [("sleep", 1.0)],  # longer than the client's 0.5 s timeout
}
EXPECTED_VERDICTS = {
    "plain": "correct",
    "lower": "incorrect",
    "verdict-line": "correct",
    "maybe": "unparsed",
    "empty": "unparsed",
    "not-incorrect": "unparsed",
    "flaky": "correct",
    "bad-request": "error",
    "slow": "error",
}
API_KEY = "sk-test-key-1234"


class ScriptedJudgeServer:
    """An OpenAI-style /v1/chat/completions server replying per the scenario tag in the prompt."""

    def __init__(self):
        self.hits: Counter = Counter()
        self.authorizations: list[str | None] = []
        self.prompts: dict[str, str] = {}
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.base_url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def _handler_class(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                assert self.path == "/v1/chat/completions"
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][0]["content"]
                tag = re.search(r"\[q-([a-z-]+)\]", prompt).group(1)
                with owner._lock:
                    owner.hits[tag] += 1
                    owner.authorizations.append(self.headers.get("Authorization"))
                    owner.prompts[tag] = prompt
                    script = SCRIPTS[tag]
                    action = script[min(owner.hits[tag], len(script)) - 1]
                try:
                    if isinstance(action, tuple) and action[0] == "status":
                        self.send_error(action[1])
                        return
                    if isinstance(action, tuple) and action[0] == "sleep":
                        time.sleep(action[1])
                        action = "CORRECT"
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": action}}]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def log_message(self, *args):
                pass

        return Handler

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def judge_server():
    server = ScriptedJudgeServer()
    yield server
    server.close()


def generation_rows() -> list[dict]:
    rows = [
        {
            "id": f"row-{tag}",
            "prompt": f"<image>[q-{tag}] What is 6 times 7?",
            "response": "<think>6*7</think> \\boxed{41}",  # wrong by rules, so the judge is asked
            "ground_truth": "42",
            "benchmark": "mathvista",
        }
        for tag in SCRIPTS
    ]
    rows.append({**rows[0], "id": "row-rule", "prompt": "[q-rule] 6*7?", "response": "\\boxed{42}"})
    rows.append(
        {
            **rows[0],
            "id": "row-mcq",
            "prompt": "[q-mcq] Capital of France?",
            "response": "\\boxed{A}",
            "ground_truth": "B",
            "choices": ["London", "Paris"],
        }
    )
    return rows


def run_llm_eval(input_dir: Path, output_dir: Path, base_url: str) -> int:
    return LLM_eval.main(
        [
            "--input_dir",
            str(input_dir),
            "--output_dir",
            str(output_dir),
            "--judge_base_url",
            base_url,
            "--judge_model",
            "judge-model",
            "--timeout",
            "0.5",
            "--max_retries",
            "1",
            "--retry_backoff",
            "0.01",
            "--concurrency",
            "4",
        ]
    )


def test_judge_verdicts_retries_cache_and_resume(tmp_path, judge_server, monkeypatch, capsys):
    monkeypatch.setenv("JUDGE_API_KEY", API_KEY)
    input_dir, output_dir = tmp_path / "raw" / "model", tmp_path / "graded" / "model"
    write_jsonl(input_dir / "mathvista.jsonl", generation_rows())

    assert run_llm_eval(input_dir, output_dir, judge_server.base_url) == 0
    graded = {row["id"]: row for row in read_jsonl(output_dir / "mathvista.jsonl")}
    assert len(graded) == len(generation_rows())
    for tag, verdict in EXPECTED_VERDICTS.items():
        row = graded[f"row-{tag}"]
        assert (row["judge_verdict"], row["rule_correct"], row["rule_answer"]) == (verdict, False, "41"), tag
        assert row["final_correct"] is (verdict == "correct"), tag  # unparsed and error never count
    assert graded["row-rule"]["judge_verdict"] == "skipped" and graded["row-rule"]["final_correct"] is True
    assert graded["row-mcq"]["judge_verdict"] == "skipped" and graded["row-mcq"]["final_correct"] is False
    assert graded["row-mcq"]["choices"] == ["London", "Paris"]  # original fields are kept

    first_hits = {tag: 1 for tag in SCRIPTS} | {"flaky": 2, "slow": 2}  # a retry each; 400 is not retried
    assert judge_server.hits == Counter(first_hits)
    assert set(judge_server.authorizations) == {f"Bearer {API_KEY}"}
    prompt = judge_server.prompts["plain"]
    assert "What is 6 times 7?" in prompt and "<image>" not in prompt and "42" in prompt and "41" in prompt
    output = capsys.readouterr()
    assert API_KEY not in output.out + output.err
    assert "row-slow" in output.err  # failed requests are reported by row
    # Some failed, not all: the run ends with status 0 and a count to rerun for.
    assert f"warning: 2 of {len(EXPECTED_VERDICTS)} judge requests failed (first: row id 'row-" in output.err

    verdicts = {row_id: row["judge_verdict"] for row_id, row in graded.items()}
    retried_errors = Counter({"slow": 2, "bad-request": 1})

    def output_verdicts() -> dict:
        rows = read_jsonl(output_dir / "mathvista.jsonl")
        assert len(rows) == len({row["id"] for row in rows})  # no row written twice
        return {row["id"]: row["judge_verdict"] for row in rows}

    # Rerun: finished rows are skipped, rows whose request failed are asked again. They fail again,
    # so every request of this run failed: the run says so with status 1.
    assert run_llm_eval(input_dir, output_dir, judge_server.base_url) == 1
    assert "error: all 2 judge requests failed" in capsys.readouterr().err
    assert judge_server.hits == Counter(first_hits) + retried_errors
    assert output_verdicts() == verdicts

    # A fresh output with the cache kept: only the failed requests reach the server.
    (output_dir / "mathvista.jsonl").unlink()
    assert run_llm_eval(input_dir, output_dir, judge_server.base_url) == 0
    assert judge_server.hits == Counter(first_hits) + retried_errors + retried_errors
    assert output_verdicts() == verdicts

    # Resume without the cache: finished ids are still skipped; a new row is graded.
    (output_dir / "judge_cache.jsonl").unlink()
    hits_before = judge_server.hits.copy()
    write_jsonl(input_dir / "mathvista.jsonl", [*generation_rows(), {**generation_rows()[0], "id": "row-new"}])
    assert run_llm_eval(input_dir, output_dir, judge_server.base_url) == 0
    assert judge_server.hits == hits_before + retried_errors + Counter({"plain": 1})
    assert output_verdicts() == verdicts | {"row-new": "correct"}


def test_llm_eval_fails_when_every_judge_request_fails(tmp_path):
    """As a user runs it with no judge server up: a closed local port refuses every request. The run
    must not end with status 0 as if it had graded, and must say how many failed and why."""
    input_dir, output_dir = tmp_path / "raw" / "model", tmp_path / "graded" / "model"
    rows = [row for row in generation_rows() if row["id"] in ("row-plain", "row-flaky", "row-rule")]
    write_jsonl(input_dir / "mathvista.jsonl", rows)
    url = f"http://127.0.0.1:{closed_local_port()}/v1"
    command = [sys.executable, "LLM_eval.py", "--input_dir", str(input_dir), "--output_dir", str(output_dir)]
    command += ["--judge_base_url", url, "--judge_model", "judge-model", "--max_retries", "0", "--timeout", "5"]
    result = subprocess.run(command, cwd=EVALUATION_DIR, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    # Two free-form rows asked the judge (the third is right by rules): both failed, the first is quoted.
    assert "error: all 2 judge requests failed (first: row id 'row-" in result.stderr
    assert "Connection refused" in result.stderr.split("error: all 2")[1]
    verdicts = {row["id"]: row["judge_verdict"] for row in read_jsonl(output_dir / "mathvista.jsonl")}
    assert verdicts == {"row-plain": "error", "row-flaky": "error", "row-rule": "skipped"}


def test_cache_is_keyed_by_judge_model_and_prompt(tmp_path):
    cache = JudgeCache(tmp_path / "cache.jsonl")
    cache.put("model-a", "prompt", "CORRECT")
    reloaded = JudgeCache(tmp_path / "cache.jsonl")
    assert reloaded.get("model-a", "prompt") == "CORRECT"
    assert reloaded.get("model-b", "prompt") is None
    assert reloaded.get("model-a", "other prompt") is None


def test_python_judge_hook(tmp_path):
    hook = tmp_path / "my_judge.py"
    hook.write_text("def generate(prompt):\n    return 'CORRECT' if 'seven' in prompt else 'INCORRECT'\n")
    rows = [
        {"id": 1, "prompt": "seven?", "response": "\\boxed{seven}", "ground_truth": "7", "benchmark": "mm-vet"},
        {"id": 2, "prompt": "eight?", "response": "\\boxed{9}", "ground_truth": "8", "benchmark": "mm-vet"},
    ]
    write_jsonl(tmp_path / "raw" / "mm-vet.jsonl", rows)
    argv = ["--input_dir", str(tmp_path / "raw"), "--output_dir", str(tmp_path / "out"), "--judge"]
    assert LLM_eval.main([*argv, f"python:{hook}:generate"]) == 0
    verdicts = {row["id"]: row["judge_verdict"] for row in read_jsonl(tmp_path / "out" / "mm-vet.jsonl")}
    assert verdicts == {1: "correct", 2: "incorrect"}
    assert LLM_eval.main([*argv, f"python:{hook}:missing"]) == 1


def test_openai_judge_needs_server_and_model(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("JUDGE_BASE_URL", raising=False)
    monkeypatch.delenv("JUDGE_MODEL", raising=False)
    write_jsonl(
        tmp_path / "raw" / "b.jsonl", [{"id": 1, "prompt": "", "response": "", "ground_truth": "1", "benchmark": "b"}]
    )
    assert LLM_eval.main(["--input_dir", str(tmp_path / "raw"), "--output_dir", str(tmp_path / "out")]) == 1
    assert "--judge_base_url" in capsys.readouterr().err


# ---------------------------------------------------------------- accuracy tables


def graded_row(row_id: int, benchmark: str, rule_correct: bool, verdict: str) -> dict:
    return {
        "id": row_id,
        "prompt": "q",
        "response": "r",
        "ground_truth": "a",
        "benchmark": benchmark,
        "rule_correct": rule_correct,
        "rule_answer": None,
        "judge_verdict": verdict,
        "final_correct": rule_correct or verdict == "correct",
    }


def write_graded_model(folder: Path) -> None:
    # mathvista: rules 1/4, rules+judge 3/4, one unparsed. mmmu-pro-4: 1/2. mmmu-pro-10: 3/3.
    write_jsonl(
        folder / "mathvista.jsonl",
        [
            graded_row(1, "mathvista", True, "skipped"),
            graded_row(2, "mathvista", False, "correct"),
            graded_row(3, "mathvista", False, "correct"),
            graded_row(4, "mathvista", False, "unparsed"),
        ],
    )
    write_jsonl(
        folder / "mmmu-pro-4.jsonl",
        [graded_row(1, "mmmu-pro-4", True, "skipped"), graded_row(2, "mmmu-pro-4", False, "skipped")],
    )
    write_jsonl(folder / "mmmu-pro-10.jsonl", [graded_row(i, "mmmu-pro-10", True, "skipped") for i in range(3)])
    (folder / "judge_cache.jsonl").write_text('{"key": "k", "judge": "j", "reply": "CORRECT"}\n')


def test_tables_by_hand(tmp_path, capsys):
    write_graded_model(tmp_path / "model-a")
    write_jsonl(tmp_path / "model-b" / "mathvista.jsonl", [graded_row(1, "mathvista", False, "error")])
    # The generation step could not answer 2 mathvista questions of model-a (prompts too long).
    (tmp_path / "model-a" / "generation_summary.json").write_text(json.dumps({"mathvista": {"too_long": 2}}))
    out_dir = tmp_path / "tables"
    argv = [
        "--graded_dir",
        str(tmp_path / "model-a"),
        "--mcq_dir",
        str(tmp_path / "model-b"),
        "--out_dir",
        str(out_dir),
    ]
    assert eval_tables.main(argv) == 0

    with open(out_dir / "results.csv", newline="") as file:
        table = {(row["model"], row["benchmark"]): row for row in csv.DictReader(file)}
    expected = {
        # model, benchmark: n, rules %, rules + judge %, unparsed, errors, too long (not answered)
        ("model-a", "mathvista"): ("4", "25.00", "75.00", "1", "0", "2"),
        ("model-a", "mmmu-pro-4"): ("2", "50.00", "50.00", "0", "0", "0"),
        ("model-a", "mmmu-pro-10"): ("3", "100.00", "100.00", "0", "0", "0"),
        # pooled (1+3)/(2+3), not the plain mean 75
        ("model-a", "MMMU-Pro (weighted)"): ("5", "80.00", "80.00", "0", "0", "0"),
        # mean of mathvista and the weighted aggregate: (25+80)/2, (75+80)/2
        ("model-a", "Overall (mean)"): ("9", "52.50", "77.50", "1", "0", "2"),
        ("model-b", "mathvista"): ("1", "0.00", "0.00", "0", "1", "0"),
        ("model-b", "Overall (mean)"): ("1", "0.00", "0.00", "0", "1", "0"),
    }
    assert {key: tuple(row[c] for c in eval_tables.CSV_COLUMNS[2:]) for key, row in table.items()} == expected

    markdown = (out_dir / "results.md").read_text()
    assert "| MMMU-Pro (weighted) | 5 | 80.0 | 80.0 | 0 | 0 | 0 |" in markdown
    assert "| mathvista | 4 | 25.0 | 75.0 | 1 | 0 | 2 |" in markdown
    assert "| mathvista | 75.0 | 0.0 |" in markdown  # the comparison table, models in argument order
    assert markdown in capsys.readouterr().out
    with Image.open(out_dir / "results.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 100


def test_tables_reject_ungraded_rows_and_same_named_models(tmp_path, capsys):
    write_jsonl(
        tmp_path / "raw" / "m.jsonl", [{"id": 1, "prompt": "", "response": "", "ground_truth": "1", "benchmark": "m"}]
    )
    assert eval_tables.main(["--graded_dir", str(tmp_path / "raw"), "--out_dir", str(tmp_path / "t")]) == 1
    assert "missing field 'rule_correct'" in capsys.readouterr().err
    write_graded_model(tmp_path / "a" / "model")
    write_graded_model(tmp_path / "b" / "model")
    argv = ["--graded_dir", str(tmp_path / "a" / "model"), "--graded_dir", str(tmp_path / "b" / "model")]
    assert eval_tables.main([*argv, "--out_dir", str(tmp_path / "t")]) == 1
    assert "named ['model']" in capsys.readouterr().err


def test_get_eval_result_script_tables_every_model(tmp_path):
    write_graded_model(tmp_path / "LLM-Eval-out" / "model-a")
    write_graded_model(tmp_path / "LLM-Eval-out" / "model-b")
    env = {
        **os.environ,
        "EVAL_OUT_DIR": str(tmp_path / "LLM-Eval-out"),
        "RESULTS_DIR": str(tmp_path / "tables"),
        "PYTHON": sys.executable,
    }
    result = subprocess.run(
        ["bash", str(EVALUATION_DIR / "get_eval_result.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "## model-a" in result.stdout and "## model-b" in result.stdout
    assert (tmp_path / "tables" / "results.png").is_file()


# ---------------------------------------------------------------- download script


def closed_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_download_fails_fast_and_says_what_it_needs(tmp_path):
    # A closed local port stands in for an unreachable hub (and keeps a networked machine off the real one).
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env |= {"HF_ENDPOINT": f"http://127.0.0.1:{closed_local_port()}", "HF_HOME": str(tmp_path / "hf")}
    command = [
        sys.executable,
        str(REPO_ROOT / "download_precomputed_evaluation_files.py"),
        "--local_dir",
        str(tmp_path / "raw"),
    ]
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert time.monotonic() - started < 30
    assert "huggingface.co" in result.stderr and str(tmp_path / "raw") in result.stderr
    assert "Connection refused" in result.stderr or "ConnectError" in result.stderr  # the network was tried

    # Without huggingface_hub: a stand-in package that fails to import takes its place.
    (tmp_path / "fake" / "huggingface_hub").mkdir(parents=True)
    (tmp_path / "fake" / "huggingface_hub" / "__init__.py").write_text("raise ImportError('not installed')\n")
    result = subprocess.run(
        command, env={**env, "PYTHONPATH": str(tmp_path / "fake")}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "huggingface_hub package is missing" in result.stderr
