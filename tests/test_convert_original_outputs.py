"""Evaluation/convert_original_outputs.py: files in the original Vision-SR1 release's layout (its
validation writer's rows, its judged rows, the test splits they index into) become generation and
graded rows of Evaluation/schema.py, which get_eval_result.sh tabulates."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EVALUATION_DIR = REPO_ROOT / "Evaluation"
sys.path.insert(0, str(EVALUATION_DIR))  # the scripts import their sibling modules by name

import convert_original_outputs  # noqa: E402
from schema import load_generations, load_graded  # noqa: E402

MODEL = "7B-Vision-SR1"
# The MLLM_test collection's test split: one benchmark per row (`file_name`).
MLLM_TEST = [
    {"problem": "<image>How many apples?", "answer": "12", "file_name": "mathvista"},
    {"problem": "<image>What fraction is shaded?", "answer": "3/4", "file_name": "mathvista"},
    {"problem": "<image>Which city? (A) Rome (B) Paris (C) Oslo (D) Bern", "answer": "B", "file_name": "mmmu-pro"},
    {"problem": "<image>Which gas? (A) O2 (B) N2 (C) He (D) Ar", "answer": "A", "file_name": "mmmu-pro"},
    {"problem": "<image>What is the angle?", "answer": "30", "file_name": "mathvista"},
]
MMMU_PRO_10 = [
    {"problem": "<image>Pick one of A-J", "answer": "J"},
    {"problem": "<image>Pick one of A-J", "answer": "B"},
    {"problem": "<image>Pick one of A-J", "answer": "C"},
]
# dataset_index -> (response, accuracy_output, accuracy_judgment) as the original's LLM_eval.py writes them:
# "correct"/"correct" when its rules passed (no judge asked), else the judge's reply and its verdict.
MLLM_TEST_RESPONSES = {
    0: ("<description>apples</description><think>count</think> \\boxed{12}", "correct", "correct"),
    1: (
        "<think>half of half and more</think> \\boxed{three quarters}",
        "The answer matches. Judgment: Correct",
        "correct",
    ),
    2: ("<think>north</think> \\boxed{C}", "Judgment: Incorrect", "incorrect"),
    3: ("The gas is \\boxed{A}", "correct", "correct"),
    4: ("<think>...</think> \\boxed{45}", "no verdict given", ""),
}
MMMU_PRO_10_RESPONSES = ["\\boxed{J}", "Answer: B", "\\boxed{D}"]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def chat_prompt(problem: str) -> str:
    """What the original's writer stores as `prompt`: the decoded chat-templated input."""
    return f"system\nYou are a helpful assistant.\nuser\n{problem.replace('<image>', '')}\nassistant\n"


@pytest.fixture
def original(tmp_path) -> tuple[Path, Path]:
    """(original_dir, references): a model's generations, its judged MLLM_test, and the test splits."""
    original_dir, references = tmp_path / "Raw-Outputs", tmp_path / "references"
    order = [2, 0, 4, 3, 1]  # the writer appends batches; rows follow dataset_index, not file order
    generations = [
        {"dataset_index": i, "prompt": chat_prompt(MLLM_TEST[i]["problem"]), "response": MLLM_TEST_RESPONSES[i][0]}
        for i in order
    ]
    write_jsonl(original_dir / MODEL / "MLLM_test.jsonl", generations)
    judged = [
        {
            **row,
            "gold_answer": MLLM_TEST[row["dataset_index"]]["answer"],
            "accuracy_output": MLLM_TEST_RESPONSES[row["dataset_index"]][1],
            "accuracy_judgment": MLLM_TEST_RESPONSES[row["dataset_index"]][2],
        }
        for row in generations
    ]
    write_jsonl(original_dir / "LLM-Eval-out" / MODEL / "MLLM_test.jsonl", judged)
    write_jsonl(
        original_dir / MODEL / "mmmu_pro_10options.jsonl",
        [
            {"dataset_index": i, "prompt": chat_prompt(MMMU_PRO_10[i]["problem"]), "response": response}
            for i, response in enumerate(MMMU_PRO_10_RESPONSES)
        ],
    )
    references.mkdir()
    pq.write_table(pa.Table.from_pylist(MLLM_TEST), references / "MLLM_test.parquet")
    write_jsonl(references / "mmmu_pro_10options.jsonl", MMMU_PRO_10)
    return original_dir, references


def run_convert(*args: str) -> int:
    return convert_original_outputs.main([str(arg) for arg in args])


def test_converted_rows_follow_the_schema_and_keep_the_original_judgments(original, tmp_path):
    original_dir, references = original
    out = tmp_path / "converted"
    assert run_convert("--original_dir", original_dir, "--references", references, "--output_dir", out) == 0

    assert sorted(p.name for p in (out / MODEL).iterdir()) == [
        "mathvista.jsonl",
        "mmmu-pro-10.jsonl",
        "mmmu-pro-4.jsonl",
    ]
    mathvista = {row["id"]: row for row in load_graded(out / "LLM-Eval-out" / MODEL / "mathvista.jsonl")}
    assert sorted(mathvista) == [0, 1, 4]
    assert mathvista[1]["prompt"] == MLLM_TEST[1]["problem"] and mathvista[1]["ground_truth"] == "3/4"
    assert mathvista[1]["response"] == MLLM_TEST_RESPONSES[1][0]
    assert [mathvista[i]["judge_verdict"] for i in (0, 1, 4)] == ["skipped", "correct", "unparsed"]
    assert [mathvista[i]["final_correct"] for i in (0, 1, 4)] == [True, True, False]

    mmmu_pro_10 = load_graded(out / "LLM-Eval-out" / MODEL / "mmmu-pro-10.jsonl")
    assert {row["question_type"] for row in mmmu_pro_10} == {"multiple_choice"}
    assert [row["rule_answer"] for row in mmmu_pro_10] == ["J", "B", "D"]
    assert [row["judge_verdict"] for row in mmmu_pro_10] == ["skipped"] * 3
    # The generation rows carry no grades, so LLM_eval.py can grade them again with another judge.
    generations = load_generations(out / MODEL / "mmmu-pro-4.jsonl")
    assert "rule_correct" not in generations[0] and {row["benchmark"] for row in generations} == {"mmmu-pro-4"}


def test_get_eval_result_tabulates_the_converted_outputs(original, tmp_path):
    original_dir, references = original
    out = tmp_path / "converted"
    assert run_convert("--original_dir", original_dir, "--references", references, "--output_dir", out) == 0
    env = {
        **os.environ,
        "EVAL_OUT_DIR": str(out / "LLM-Eval-out"),
        "RESULTS_DIR": str(tmp_path / "tables"),
        "PYTHON": sys.executable,
    }
    result = subprocess.run(
        ["bash", str(EVALUATION_DIR / "get_eval_result.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert f"## {MODEL}" in result.stdout
    with open(tmp_path / "tables" / "results.csv", newline="") as file:
        table = {row["benchmark"]: row for row in csv.DictReader(file)}
    # (n, rules, rules + judge, unparsed). mathvista: rules 1/3, + judge 2/3. mmmu-pro-4: 1/2.
    # mmmu-pro-10: 2/3 (multiple choice, no judge). The weighted MMMU-Pro pools 3/5.
    expected = {
        "mathvista": ("3", "33.33", "66.67", "1"),
        "mmmu-pro-4": ("2", "50.00", "50.00", "0"),
        "mmmu-pro-10": ("3", "66.67", "66.67", "0"),
        "MMMU-Pro (weighted)": ("5", "60.00", "60.00", "0"),
        "Overall (mean)": ("8", "46.67", "63.33", "1"),
    }
    for benchmark, (n, rules, final, unparsed) in expected.items():
        row = table[benchmark]
        assert (row["n"], row["rule_accuracy"], row["rule_judge_accuracy"], row["unparsed"]) == (
            n,
            rules,
            final,
            unparsed,
        )


def test_judged_rows_convert_without_references(original, tmp_path):
    original_dir, _ = original
    out = tmp_path / "converted"
    assert run_convert("--original_dir", original_dir, "--output_dir", out, "--exclude", "mmmu_pro_10options") == 0
    rows = load_graded(out / "LLM-Eval-out" / MODEL / "MLLM_test.jsonl")  # no file_name: one benchmark
    assert len(rows) == 5 and {row["ground_truth"] for row in rows} == {"12", "3/4", "B", "A", "30"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"mmmu_pro_10options\.jsonl:2: not valid JSON"),
        ('["a list"]', r"mmmu_pro_10options\.jsonl:2: a row must be a JSON object"),
        ('{"dataset_index": 1}', r"mmmu_pro_10options\.jsonl:2: field 'response' must be a string"),
        ('{"dataset_index": "one", "response": "B"}', r"mmmu_pro_10options\.jsonl:2: field 'dataset_index'"),
        (
            '{"dataset_index": 0, "response": "B"}',
            r"mmmu_pro_10options\.jsonl:2: dataset_index 0 already used on line 1",
        ),
        (
            '{"dataset_index": 9, "response": "B"}',
            r"mmmu_pro_10options\.jsonl:2: dataset_index 9 is beyond the 3 rows of .*references",
        ),
    ],
)
def test_a_malformed_row_is_named_by_file_and_line(original, tmp_path, capsys, line, message):
    original_dir, references = original
    path = original_dir / MODEL / "mmmu_pro_10options.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n" + line + "\n")
    assert run_convert("--original_dir", original_dir, "--references", references, "--output_dir", tmp_path / "o") == 1
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(convert_original_outputs.ConversionError, match=message):
        convert_original_outputs.convert(original_dir, tmp_path / "o", str(references))


def test_rows_without_ground_truth_anywhere_ask_for_references(original, tmp_path):
    original_dir, _ = original
    with pytest.raises(
        convert_original_outputs.ConversionError, match=r"mmmu_pro_10options\.jsonl:1: no 'gold_answer'.*--references"
    ):
        convert_original_outputs.convert(original_dir, tmp_path / "o")


def test_a_reference_row_without_answer_is_named(original, tmp_path):
    original_dir, references = original
    write_jsonl(
        references / "mmmu_pro_10options.jsonl", [{"problem": "p", "answer": "J"}, {"problem": "p"}, {"answer": "C"}]
    )
    with pytest.raises(
        convert_original_outputs.ConversionError, match=r"mmmu_pro_10options\.jsonl: row 1 has no 'answer'"
    ):
        convert_original_outputs.convert(original_dir, tmp_path / "o", str(references))
