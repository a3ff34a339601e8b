"""Tracker and its loggers, each writing to a temporary directory and read back."""

import glob
import json
import os
import sys

import numpy as np
import pytest
import torch

from verl.utils.tracking import LOGGERS, Tracker

ROWS = [
    {"input": "2+2?", "output": "<answer>4</answer>", "ground_truth": "4", "score": 1.0},
    {"input": "3|4", "output": "line 1\nline 2", "ground_truth": "7", "score": 0.0},
]


def make_tracker(loggers, output_dir, resume=False) -> Tracker:
    return Tracker(
        loggers, project="proj", experiment="exp", config={"lr": 1e-6}, output_dir=str(output_dir), resume=resume
    )


def read_jsonl(path) -> list[dict]:
    with open(path) as file:
        return [json.loads(line) for line in file]


def test_registry_holds_the_five_loggers():
    assert sorted(LOGGERS) == ["console", "file", "swanlab", "tensorboard", "wandb"]


def test_unknown_logger_lists_valid_names(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"unknown logger\(s\) \['mlflow'\]; valid names: \['console', 'file', 'swanlab', 'tensorboard', 'wandb'\]",
    ):
        make_tracker(["console", "mlflow"], tmp_path)


def test_console_prints_one_sorted_line_with_4_significant_digits(tmp_path, capsys):
    tracker = make_tracker(["console"], tmp_path)
    tracker.log({"reward/mean": 0.123456, "actor/loss": np.float32(2.0), "actor/lr": torch.tensor(1e-6)}, step=3)
    assert capsys.readouterr().out == "step 3: actor/loss=2 actor/lr=1e-06 reward/mean=0.1235\n"


def test_non_numeric_metric_names_the_key(tmp_path):
    tracker = make_tracker(["console"], tmp_path)
    with pytest.raises(TypeError, match="metric 'response' at step 1 is not a number"):
        tracker.log({"loss": 1.0, "response": "text"}, step=1)


def test_generation_rows_must_share_keys(tmp_path):
    tracker = make_tracker(["file"], tmp_path)
    with pytest.raises(ValueError, match=r"row 1 has keys \['input'\]"):
        tracker.log_generations([ROWS[0], {"input": "x"}], step=1)


def test_file_logger_writes_each_line_immediately(tmp_path):
    tracker = make_tracker(["file"], tmp_path)
    tracker.log({"loss": 0.5}, step=1)
    tracker.log({"loss": np.float64(0.25), "reward": 1}, step=2)
    tracker.log_generations(ROWS, step=2)
    # Read before finish(): a crash at this point must lose nothing.
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 0.5},
        {"step": 2, "loss": 0.25, "reward": 1.0},
    ]
    assert read_jsonl(tmp_path / "generations.jsonl") == [{"step": 2, **row} for row in ROWS]
    tracker.finish()


def test_file_logger_resume_drops_replayed_steps(tmp_path):
    crashed = make_tracker(["file"], tmp_path)
    for step in (1, 2, 3):
        crashed.log({"loss": float(step)}, step=step)
        crashed.log_generations(ROWS[:1], step=step)
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"step": 4, "lo')  # torn by the crash

    resumed = make_tracker(["file"], tmp_path, resume=True)
    resumed.log({"loss": 20.0}, step=2)
    resumed.log({"loss": 30.0}, step=3)
    resumed.log_generations(ROWS[1:], step=3)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 20.0},
        {"step": 3, "loss": 30.0},
    ]
    assert [(row["step"], row["input"]) for row in read_jsonl(tmp_path / "generations.jsonl")] == [
        (1, "2+2?"),
        (3, "3|4"),
    ]
    assert not os.path.exists(tmp_path / "metrics.jsonl.tmp")


def test_file_logger_without_resume_appends(tmp_path):
    make_tracker(["file"], tmp_path).log({"loss": 1.0}, step=1)
    make_tracker(["file"], tmp_path).log({"loss": 2.0}, step=1)
    assert [row["loss"] for row in read_jsonl(tmp_path / "metrics.jsonl")] == [1.0, 2.0]


def read_tensorboard(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events


def test_tensorboard_scalars_and_generations_read_back(tmp_path):
    tracker = make_tracker(["tensorboard"], tmp_path)
    tracker.log({"actor/loss": 0.5, "reward": 1.0}, step=1)
    tracker.log({"actor/loss": 0.25, "reward": 0.75}, step=2)
    tracker.log_generations(ROWS, step=2)
    tracker.finish()
    events = read_tensorboard(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("actor/loss")] == [(1, 0.5), (2, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("reward")] == [(1, 1.0), (2, 0.75)]
    (text_event,) = events.Tensors("generations/text_summary")
    table = text_event.tensor_proto.string_val[0].decode()
    assert table.splitlines()[0] == "| input | output | ground_truth | score |"
    assert "| 3\\|4 | line 1<br>line 2 | 7 | 0.0 |" in table.splitlines()


def test_tensorboard_resume_purges_replayed_steps(tmp_path):
    crashed = make_tracker(["tensorboard"], tmp_path)
    for step in (1, 2, 3):
        crashed.log({"loss": float(step)}, step=step)
    crashed.finish()
    resumed = make_tracker(["tensorboard"], tmp_path, resume=True)
    for step in (2, 3):
        resumed.log({"loss": 10.0 * step}, step=step)
    resumed.finish()
    assert [(e.step, e.value) for e in read_tensorboard(tmp_path / "tensorboard").Scalars("loss")] == [
        (1, 1.0),
        (2, 20.0),
        (3, 30.0),
    ]


def test_wandb_offline_run_and_resume_reuses_the_run(tmp_path, monkeypatch):
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "config"),
        "WANDB_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_DATA_DIR": str(tmp_path / "data"),
    }.items():
        monkeypatch.setenv(name, value)
    output_dir = tmp_path / "out"
    tracker = make_tracker(["wandb"], output_dir)
    tracker.log({"loss": 0.5}, step=1)
    tracker.log_generations(ROWS, step=1)
    tracker.finish()
    run_id = (output_dir / "wandb_run_id.txt").read_text()
    (run_dir,) = glob.glob(str(output_dir / "wandb" / f"offline-run-*-{run_id}"))
    assert os.path.getsize(os.path.join(run_dir, f"run-{run_id}.wandb")) > 0
    (table_path,) = glob.glob(os.path.join(run_dir, "files", "media", "table", "generations_*.table.json"))
    with open(table_path) as file:
        table = json.load(file)
    assert table["columns"] == list(ROWS[0])
    assert table["data"] == [list(row.values()) for row in ROWS]

    resumed = make_tracker(["wandb"], output_dir, resume=True)
    resumed.log({"loss": 0.25}, step=2)
    resumed.finish()
    assert (output_dir / "wandb_run_id.txt").read_text() == run_id
    assert all(path.endswith(f"-{run_id}") for path in glob.glob(str(output_dir / "wandb" / "offline-run-*")))


@pytest.mark.parametrize("package", ["wandb", "tensorboard"])
def test_missing_package_says_what_to_install(tmp_path, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail as if not installed
    with pytest.raises(
        ImportError, match=f"the '{package}' logger needs the '{package}' package: pip install {package}"
    ):
        make_tracker([package], tmp_path)


def test_file_logger_draws_the_curves_when_the_run_finishes(tmp_path):
    from PIL import Image

    from verl.utils.plot_metrics import plot, read_metrics

    tracker = make_tracker(["file"], tmp_path)
    for step in range(1, 5):
        tracker.log({"reward/overall": 0.1 * step, "reward/accuracy": 0.2 * step, "actor/pg_loss": -0.1}, step)
    tracker.log({"val/reward/overall": 0.5, "val/reward/accuracy": 0.75}, step=4)
    assert not (tmp_path / "reward_curves.png").exists()
    tracker.finish()
    with Image.open(tmp_path / "reward_curves.png") as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 100
    drawn = plot({"run": read_metrics(tmp_path)}, tmp_path / "again.png")
    assert drawn == ["training rewards", "validation rewards / accuracy", "losses"]


def test_swanlab_logger_without_the_package_says_how_to_install(tmp_path):
    try:
        import swanlab  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install swanlab"):
            make_tracker(["swanlab"], tmp_path)
    else:
        pytest.skip("swanlab is installed here")
