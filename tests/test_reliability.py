"""Reliability of a GRPO run: bad reward samples, signals, pre-flight checks and the account of the
rows each step trained on (kept across a kill and resume and across an epoch boundary)."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.test_dataset import corrupt_digit_sum
from tests.test_trainer import COMPARED, ROOT, read_metrics, run_args
from verl.reward import RewardFunction, RewardFunctionError
from verl.trainer import sft
from verl.trainer.accounting import groups_left_out
from verl.trainer.interrupt import Interrupted, checkpoint_guard, stop_on_signals
from verl.trainer.main import main
from verl.utils.dataset import DataError
from verl.utils.tracking import Tracker

POISONED = str(ROOT / "tests" / "rewards" / "poisoned.py") + ":compute_score"


def small_train_file(
    tiny_world, path: Path, rows: int, poison: tuple[int, ...] = (), flat: tuple[int, ...] = ()
) -> Path:
    """The first `rows` rows of the digit-sum set, with `poison` and `flat` columns marking those rows
    (tests/rewards/poisoned.py fails on poisoned rows and scores every response of a flat row alike)."""
    frame = pd.read_parquet(tiny_world / "data/digit_sum/val.parquet").head(rows).copy()
    frame["poison"] = [i in poison for i in range(rows)]
    frame["flat"] = [i in flat for i in range(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path)
    return path


def read_rows(save_dir) -> dict[int, list[int]]:
    with open(Path(save_dir) / "rows.jsonl") as f:
        return {record["step"]: record["rows"] for record in map(json.loads, f)}


def read_dropped(save_dir) -> dict[int, dict[str, list[int]]]:
    """Per step, the rows it drew but left out, by reason (empty when none)."""
    with open(Path(save_dir) / "rows.jsonl") as f:
        return {record["step"]: record.get("dropped", {}) for record in map(json.loads, f)}


# ================================================================ bad samples
def sample(text: str, poison: bool = False) -> dict:
    return {
        "response": text,
        "response_length": len(text),
        "ground_truth": "7",
        "question": "what is 3+4?",
        "description_answers": None,
        "extra": {"poison": poison},
    }


@pytest.mark.parametrize("how", ["nan", "raise"])
def test_score_each_names_the_bad_samples_and_scores_the_rest(how):
    reward = RewardFunction(POISONED, {"how": how})
    scores, failures = reward.score_each([sample("12"), sample("x", poison=True), sample("a1")])
    assert scores[0] == {"overall": 1.0} and scores[2] == {"overall": 0.5} and scores[1] is None
    assert list(failures) == [1]
    assert "what is 3+4?" in failures[1]  # the question, for the user to find the sample
    assert ("overall=nan" if how == "nan" else "ValueError: cannot grade the answer '7'") in failures[1]
    # the plain call still stops at the first bad sample
    with pytest.raises(RewardFunctionError):
        reward([sample("12"), sample("x", poison=True)])


def test_on_bad_sample_is_checked_at_load(tiny_world, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(run_args(tiny_world, tmp_path, "worker.reward.on_bad_sample=skip"))
    assert exit_info.value.code == 2


def test_bad_reward_stops_the_run_naming_the_row(tiny_world, tmp_path):
    train = small_train_file(tiny_world, tmp_path / "train.parquet", 4, poison=(2,))
    args = run_args(tiny_world, tmp_path / "run", "trainer.max_steps=1", f"worker.reward.reward_function={POISONED}")
    with pytest.raises(RewardFunctionError) as error:
        main([*args, f"data.train_files={train}", "data.val_files=null"])
    message = str(error.value)
    assert "step 1: the reward of dataset row 2 (uid " in message and "overall=nan" in message
    assert "worker.reward.on_bad_sample=drop_group" in message
    assert not (tmp_path / "run" / "global_step_1").exists()


def test_drop_group_leaves_the_bad_groups_out_and_counts_them(tiny_world, tmp_path):
    """8 rows, 2 poisoned, one epoch of 2 steps: the 6 good rows are trained on, the 2 bad groups
    are counted, and no step trained on a poisoned row."""
    train = small_train_file(tiny_world, tmp_path / "train.parquet", 8, poison=(2, 5))
    save = tmp_path / "run"
    args = run_args(
        tiny_world,
        save,
        "trainer.max_steps=2",
        f"worker.reward.reward_function={POISONED}",
        "worker.reward.reward_function_kwargs={how: raise}",
        "worker.reward.on_bad_sample=drop_group",
        f"data.train_files={train}",
        "data.val_files=null",
    )
    main(args)
    metrics, rows, dropped = read_metrics(save), read_rows(save), read_dropped(save)
    assert sum(metrics[step]["reward/dropped_groups"] for step in (1, 2)) == 2
    trained = rows[1] + rows[2]
    assert sorted(trained) == [0, 1, 3, 4, 6, 7]
    assert sorted(dropped[1].get("bad_sample", []) + dropped[2].get("bad_sample", [])) == [2, 5]
    for step in (1, 2):
        assert len(rows[step]) == 4 - metrics[step]["reward/dropped_groups"]
        assert set(dropped[step]) <= {"bad_sample"}  # one worker: nothing left out for divisibility
        assert len(rows[step] + dropped[step].get("bad_sample", [])) == 4  # the step's whole batch
        assert math.isfinite(metrics[step]["reward/overall"]) and math.isfinite(metrics[step]["actor/pg_loss"])


def test_bad_validation_reward_is_dropped_counted_and_named(tiny_world, tmp_path, caplog):
    """drop_group covers validation too: the two poisoned validation rows are left out of the
    validation metrics (counted, each named in a warning) and the run completes and saves."""
    train = small_train_file(tiny_world, tmp_path / "train.parquet", 4)
    val = small_train_file(tiny_world, tmp_path / "val.parquet", 6, poison=(1, 4))
    save = tmp_path / "run"
    args = run_args(
        tiny_world,
        save,
        "trainer.max_steps=1",
        f"worker.reward.reward_function={POISONED}",
        "worker.reward.on_bad_sample=drop_group",
        f"data.train_files={train}",
        f"data.val_files={val}",
    )
    main(args)
    metrics = read_metrics(save)
    assert metrics[1]["val/dropped_bad_samples"] == 2
    assert math.isfinite(metrics[1]["val/reward/overall"])
    assert (save / "global_step_1" / "trainer_state.json").is_file()
    for row in (1, 4):
        assert f"validation at step 1: leaving {val} row {row} out of the metrics" in caplog.text


def test_bad_validation_reward_names_the_option_and_the_step_is_kept(tiny_world, tmp_path):
    """With `error`, a NaN validation reward stops the run naming the row and the option; the step's
    update, done before validation, is saved anyway (save_freq=2 would not have saved step 1), so a
    rerun with drop_group resumes after it."""
    train = small_train_file(tiny_world, tmp_path / "train.parquet", 8)
    val = small_train_file(tiny_world, tmp_path / "val.parquet", 4, poison=(2,))
    save = tmp_path / "run"
    args = run_args(
        tiny_world,
        save,
        "trainer.max_steps=2",
        "trainer.save_freq=2",
        "trainer.val_freq=1",
        f"worker.reward.reward_function={POISONED}",
        f"data.train_files={train}",
        f"data.val_files={val}",
    )
    with pytest.raises(RewardFunctionError) as error:
        main(args)
    message = str(error.value)
    assert f"validation at step 1: the reward of {val} row 2 " in message and "overall=nan" in message
    assert "worker.reward.on_bad_sample=drop_group" in message
    assert (save / "global_step_1" / "trainer_state.json").is_file()
    first = read_metrics(save)
    assert sorted(first) == [1] and "val/reward/overall" not in first[1]

    main([*args, "worker.reward.on_bad_sample=drop_group"])
    metrics = read_metrics(save)
    assert sorted(metrics) == [1, 2] and metrics[1] == first[1]  # resumed after step 1, not redone
    assert metrics[2]["val/dropped_bad_samples"] == 1


def test_corrupt_training_image_stops_before_training_or_is_skipped(tiny_world, tmp_path):
    """A corrupt image in an HF-Image parquet train file is named (file, row, column) while the data
    is checked, before any step; with data.skip_bad_samples=true the run trains on the other rows."""
    train = corrupt_digit_sum(tiny_world, tmp_path / "train.parquet", rows=5, bad=(2,))
    save = tmp_path / "run"
    args = run_args(tiny_world, save, "trainer.max_steps=1", f"data.train_files={train}", "data.val_files=null")
    with pytest.raises(DataError, match=rf"{re.escape(str(train))} row 2: bad image .* in column 'images'"):
        main(args)
    assert not (save / "global_step_1").exists()
    main([*args, "data.skip_bad_samples=true", "data.shuffle=false"])
    assert read_rows(save)[1] == [0, 1, 3, 4]


def test_each_step_accounts_for_every_row_it_drew(tiny_world, tmp_path):
    """Dynamic sampling with bad samples, data in file order (4 rows a batch, 12 rows an epoch): the
    rows each step trained on plus those it dropped (bad sample, filtered, surplus) are exactly the
    rows of the batches it drew, refills and the next epoch's first batch included."""
    train = small_train_file(tiny_world, tmp_path / "train.parquet", 12, poison=(9,), flat=(1,))
    save = tmp_path / "run"
    args = run_args(
        tiny_world,
        save,
        "trainer.max_steps=2",
        f"worker.reward.reward_function={POISONED}",
        "worker.reward.reward_function_kwargs={how: raise}",
        "worker.reward.on_bad_sample=drop_group",
        "algorithm.online_filtering=true",
        "data.shuffle=false",
        f"data.train_files={train}",
        "data.val_files=null",
    )
    main(args)
    metrics, rows, dropped = read_metrics(save), read_rows(save), read_dropped(save)
    batches_drawn = 0
    for step in (1, 2):
        drawn = 1 + int(metrics[step]["dynamic_sampling/refills"])
        batch_rows = [(4 * batch + i) % 12 for batch in range(batches_drawn, batches_drawn + drawn) for i in range(4)]
        batches_drawn += drawn
        left_out = [row for reason_rows in dropped[step].values() for row in reason_rows]
        assert sorted(rows[step] + left_out) == sorted(batch_rows), (step, rows[step], dropped[step])
        assert len(rows[step]) == 4 and set(dropped[step]) <= {"bad_sample", "filtered", "surplus"}
    # Step 1 refills (flat row 1 is filtered out of the first batch), so the run reaches poisoned row 9.
    assert batches_drawn >= 3 and 1 in dropped[1]["filtered"]
    assert [row for step in (1, 2) for row in dropped[step].get("bad_sample", [])] == [9]
    assert not {1, 9} & {row for step in (1, 2) for row in rows[step]}


def test_groups_left_out_for_bad_samples_and_for_divisibility():
    uids = np.repeat(["a", "b", "c", "d", "e"], 2)  # five groups of two samples
    bad, trimmed = groups_left_out(uids, {"b"}, world_size=4)
    assert bad.tolist() == [False, False, True, True] + [False] * 6 and not trimmed.any()  # 8 samples divide by 4
    bad, trimmed = groups_left_out(uids, {"b"}, world_size=3)
    assert trimmed.tolist() == [False] * 8 + [True, True]  # the last intact group goes: 6 samples divide by 3
    bad, trimmed = groups_left_out(uids, {"a", "b", "c", "d"}, world_size=4)
    assert not trimmed.any()  # the one group left stays, though 2 samples do not divide by 4


# ================================================================ signals
def test_a_signal_during_a_checkpoint_save_waits_for_the_save():
    events = []
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL alone; Ray's handler after a Ray test in this process
    with stop_on_signals():
        with pytest.raises(Interrupted) as stop, checkpoint_guard():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            events.append("save completed")
        events.append("stopped")
    assert events == ["save completed", "stopped"]
    assert stop.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def _start(command, log):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _interrupt_after(process, marker: Path, signum: int, log_path: Path) -> str:
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"the run did not reach {marker}:\n{log_path.read_text()[-3000:]}"
    if signum != signal.SIGKILL:
        time.sleep(0.5)  # into the next step (a tiny step takes seconds on CPU), not between steps
    status = Path(f"/proc/{process.pid}/status")
    caught = [line for line in status.read_text().splitlines() if line.startswith("Sig")] if status.exists() else []
    process.send_signal(signum)
    code = process.wait(timeout=120)
    output = log_path.read_text()
    assert code == (-signum if signum == signal.SIGKILL else 128 + signum), (caught, output[-3000:])
    return output


@pytest.mark.slow
def test_sigint_sigterm_and_kill_resume_to_the_same_rows_and_metrics(tiny_world, tmp_path):
    """12 rows, 4 per step: an epoch is 3 steps and the run 5. Interrupted by SIGINT in step 2,
    SIGTERM in step 4 and kill -9 in step 5, each time resumed with the same command: every step's
    rows and metrics equal an uninterrupted run's, each epoch sees every row exactly once, and the
    message says where the run stopped."""
    train = small_train_file(tiny_world, tmp_path / "train.parquet", 12)
    steps = [
        "trainer.total_epochs=2",
        "trainer.max_steps=5",
        "trainer.save_freq=1",
        f"data.train_files={train}",
        "data.val_files=null",
    ]
    reference_dir, crash_dir = tmp_path / "reference", tmp_path / "crash"
    main(run_args(tiny_world, reference_dir, *steps))
    command = [sys.executable, "-m", "verl.trainer.main", *run_args(tiny_world, crash_dir, *steps)]

    for signum, after_step in ((signal.SIGINT, 1), (signal.SIGTERM, 3), (signal.SIGKILL, 4)):
        log_path = tmp_path / f"run_{signum}.log"
        with open(log_path, "w") as log:
            process = _start(command, log)
            marker = crash_dir / f"global_step_{after_step}" / "trainer_state.json"
            output = _interrupt_after(process, marker, signum, log_path)
        if signum != signal.SIGKILL:
            assert re.search(r"interrupted at step \d+; rerun the same command to resume", output), output[-2000:]
            assert "Traceback" not in output
        # the last checkpoint is intact: it verifies and the resume below starts from it
        assert (crash_dir / f"global_step_{after_step}" / "actor" / "model.safetensors").is_file()
    main(run_args(tiny_world, crash_dir, *steps))

    reference, resumed = read_metrics(reference_dir), read_metrics(crash_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        for key in COMPARED:
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-7), (step, key)
    reference_rows, resumed_rows = read_rows(reference_dir), read_rows(crash_dir)
    assert resumed_rows == reference_rows
    first_epoch = [row for step in (1, 2, 3) for row in resumed_rows[step]]
    second_epoch = [row for step in (4, 5) for row in resumed_rows[step]]
    assert sorted(first_epoch) == list(range(12))  # no row skipped or repeated
    assert len(set(second_epoch)) == 8  # the next epoch starts afresh, no repeats within it


def test_rows_log_drops_replayed_steps_on_resume(tmp_path):
    first = Tracker(["file"], "p", "e", {}, str(tmp_path))
    for step in (1, 2, 3):
        first.log_rows([step, step + 10], step)
        first.log({"x": step}, step)
    resumed = Tracker(["file"], "p", "e", {}, str(tmp_path), resume=True)
    resumed.log_rows([99], 3)  # the run resumed from step 2's checkpoint
    records = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["step"], r["rows"]) for r in records] == [(1, [1, 11]), (2, [2, 12]), (3, [99])]
    assert len(records[0]["sha256"]) == 16 and records[0]["sha256"] != records[1]["sha256"]


# ================================================================ pre-flight checks
def _fails_before_loading(args) -> None:
    """The run stops with exit 2 (one line on stderr) before the tokenizer, data or models load."""
    started = time.time()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert time.time() - started < 30


def test_preflight_names_the_unwritable_checkpoint_folder(tiny_world, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    _fails_before_loading(run_args(tiny_world, blocker / "checkpoints", "trainer.max_steps=1"))
    err = capsys.readouterr().err
    assert "trainer.save_checkpoint_path" in err and str(blocker / "checkpoints") in err


def test_preflight_names_empty_data_files(tiny_world, tmp_path, capsys):
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    _fails_before_loading(run_args(tiny_world, tmp_path / "run", f"data.train_files={empty}"))
    err = capsys.readouterr().err
    assert f"config key `data.train_files`: data file {empty}" in err and "is empty (0 bytes)" in err
    assert "Traceback" not in err

    no_rows = tmp_path / "no_rows.parquet"
    pd.read_parquet(tiny_world / "data/digit_sum/val.parquet").head(0).to_parquet(no_rows)
    _fails_before_loading(run_args(tiny_world, tmp_path / "run", f"data.val_files={no_rows}"))
    err = capsys.readouterr().err
    assert "config key `data.val_files`" in err and "parquet file with no rows" in err


def test_preflight_needs_room_for_one_checkpoint(tiny_world, tmp_path, capsys):
    model = tmp_path / "huge_model"
    shutil.copytree(tiny_world / "models/qwen2_5_vl", model)
    free = shutil.disk_usage(tmp_path).free
    with open(model / "model.safetensors", "r+b") as f:  # sparse: takes no real space
        f.truncate(free // 2)
    _fails_before_loading(run_args(tiny_world, tmp_path / "run", f"worker.actor.model.model_path={model}"))
    err = capsys.readouterr().err
    assert "not enough disk space for one checkpoint under" in err and str(model) in err


def test_preflight_names_a_missing_reward_function(tiny_world, tmp_path, capsys):
    _fails_before_loading(run_args(tiny_world, tmp_path / "run", "worker.reward.reward_function=missing.py:score"))
    assert "config key `worker.reward.reward_function`: reward function file 'missing.py'" in capsys.readouterr().err


def test_sft_preflight_names_an_empty_train_file(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("\n")
    with pytest.raises(SystemExit) as exit_info:
        sft.main([f"data.train_files=[{empty}]", f"trainer.save_checkpoint_path={tmp_path / 'run'}"])
    assert exit_info.value.code == 2
    assert "config key `data.train_files`" in capsys.readouterr().err
