"""The tiny world's test split as a benchmark, end to end: generate -> grade -> tabulate,
including resuming an interrupted generation."""

import json
import subprocess
import sys
from pathlib import Path

from verl.trainer.generate import GenerateConfig, benchmark_name, default_model_name, run

ROOT = Path(__file__).resolve().parent.parent


def test_generate_grade_tabulate(tiny_world, tmp_path):
    raw = tmp_path / "Raw-Outputs"
    config = GenerateConfig(
        model_path=str(tiny_world / "models/qwen2_5_vl"),
        model_name="tiny",
        benchmarks=[str(tiny_world / "data/digit_sum/test.parquet")],
        output_dir=str(raw),
        max_new_tokens=12,
        batch_size=64,
    )
    out_dir = Path(run(config))
    rows = [json.loads(line) for line in (out_dir / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 256 and len({r["id"] for r in rows}) == 256
    assert {"id", "prompt", "response", "ground_truth", "benchmark"} <= set(rows[0])

    # Interrupted run: keep 100 finished rows and a torn line; the rerun answers only the rest,
    # and greedy answers match the first run's.
    lines = (out_dir / "test.jsonl").read_text().splitlines()
    (out_dir / "test.jsonl").write_text("\n".join(lines[:100]) + "\n" + lines[100][:20])
    run(config)
    resumed = [json.loads(line) for line in (out_dir / "test.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in resumed) == sorted(r["id"] for r in rows)
    by_id = {r["id"]: r["response"] for r in rows}
    assert all(by_id[r["id"]] == r["response"] for r in resumed)

    graded = tmp_path / "graded" / "tiny"
    subprocess.run(
        [sys.executable, "LLM_eval.py", "--input_dir", str(out_dir), "--output_dir", str(graded), "--judge", "none"],
        cwd=ROOT / "Evaluation",
        check=True,
        capture_output=True,
    )
    graded_rows = [json.loads(line) for line in (graded / "test.jsonl").read_text().splitlines()]
    assert len(graded_rows) == 256 and all(r["judge_verdict"] == "skipped" for r in graded_rows)
    results = tmp_path / "results"
    subprocess.run(
        [sys.executable, "eval.py", "--graded_dir", str(graded), "--out_dir", str(results)],
        cwd=ROOT / "Evaluation",
        check=True,
        capture_output=True,
    )
    table = (results / "results.md").read_text()
    assert "test" in table and "tiny" in table
    assert (results / "results.png").stat().st_size > 0


def test_names():
    assert benchmark_name("data/mathvista_test.parquet") == "mathvista_test"
    assert benchmark_name("hiyouga/geometry3k@test") == "hiyouga_geometry3k_test"
    assert default_model_name("checkpoints/proj/run1/global_step_40/actor") == "run1-global_step_40"
    assert default_model_name("models/Qwen2.5-VL-7B") == "Qwen2.5-VL-7B"
