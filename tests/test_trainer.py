"""End-to-end GRPO runs on the tiny world (local backend): train, validate, save, crash, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from verl.trainer.main import main

ROOT = Path(__file__).resolve().parent.parent
REWARD = str(ROOT / "tests" / "rewards" / "digit_density.py") + ":compute_score"


def run_args(tiny_world, save_dir, *extra):
    val = tiny_world / "data/digit_sum/val.parquet"
    return [
        f"data.train_files={val}",
        f"data.val_files={val}",
        "data.val_batch_size=64",
        f"worker.actor.model.model_path={tiny_world / 'models/qwen2_5_vl'}",
        "data.format_prompt=examples/format_prompt/see_think.jinja",
        "data.rollout_batch_size=4",
        "worker.actor.global_batch_size=4",
        "worker.actor.micro_batch_size_per_device_for_update=8",
        "worker.rollout.n=4",
        "data.max_response_length=16",
        "worker.actor.optim.lr=1e-3",
        f"worker.reward.reward_function={REWARD}",
        "trainer.logger=[file]",
        f"trainer.save_checkpoint_path={save_dir}",
        "trainer.val_before_train=false",
        *extra,
    ]


def read_metrics(save_dir):
    with open(Path(save_dir) / "metrics.jsonl") as f:
        return {row["step"]: row for row in map(json.loads, f)}


COMPARED = ["reward/overall", "actor/pg_loss", "actor/grad_norm", "actor/kl_loss", "response_length/mean"]


def test_train_validate_save_and_limit(tiny_world, tmp_path):
    last = main(run_args(tiny_world, tmp_path, "trainer.max_steps=3", "trainer.save_freq=1", "trainer.save_limit=2"))
    metrics = read_metrics(tmp_path)
    assert sorted(metrics) == [1, 2, 3]
    for key in ("reward/overall", "actor/grad_norm", "actor/lr", "actor/entropy", "timing_s/gen", "perf/tokens_per_s"):
        assert key in metrics[1], key
    # Shared-prompt forwards (the default) with whole groups per micro-batch: each prompt once.
    assert metrics[1]["perf/prompt_forwards_per_group"] == 1.0
    assert "val/reward/overall" in metrics[3] and "val/reward/overall" in last
    # save_limit=2 keeps the newest two; each is a loadable HF folder with the trainer state
    kept = sorted(p.name for p in tmp_path.glob("global_step_*"))
    assert kept == ["global_step_2", "global_step_3"]
    actor = tmp_path / "global_step_3" / "actor"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training_state.pt"):
        assert (actor / name).is_file(), name
    state = json.loads((tmp_path / "global_step_3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["dataloader"]["batches_done"] == 3
    assert (tmp_path / "latest_global_step.txt").read_text() == "3"


def test_val_only_writes_generations(tiny_world, tmp_path):
    main(run_args(tiny_world, tmp_path, "trainer.val_only=true"))
    rows = [json.loads(line) for line in (tmp_path / "generations_step_0.jsonl").read_text().splitlines()]
    assert len(rows) == 128
    assert {"question", "response", "ground_truth", "score"} <= set(rows[0])


def test_killed_run_resumes_to_the_same_metrics(tiny_world, tmp_path):
    steps = ["trainer.max_steps=4", "trainer.save_freq=2"]
    reference_dir, crash_dir = tmp_path / "reference", tmp_path / "crash"
    main(run_args(tiny_world, reference_dir, *steps))
    reference = read_metrics(reference_dir)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "verl.trainer.main", *run_args(tiny_world, crash_dir, *steps)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = crash_dir / "global_step_2" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run did not reach its first checkpoint"
    process.send_signal(signal.SIGKILL)  # mid step 3
    process.wait()
    assert not (crash_dir / "global_step_4").exists()

    main(run_args(tiny_world, crash_dir, *steps))
    resumed = read_metrics(crash_dir)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in COMPARED:
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-7), (step, key)
    # the rewards actually varied, so the comparison was not between zeros
    assert reference[3]["actor/grad_norm"] > 0


def test_self_reward_stage_runs_only_when_the_reward_needs_it(tiny_world, tmp_path):
    self_reward = "examples/reward_function/see_think_self_reward.py:compute_score"
    main(
        run_args(
            tiny_world,
            tmp_path / "on",
            "trainer.max_steps=1",
            f"worker.reward.reward_function={self_reward}",
            "algorithm.advantage_mode=decoupled",
            "algorithm.decoupled_weights={accuracy: 0.9, format: 0.1, visual: 1.0}",
        )
    )
    on = read_metrics(tmp_path / "on")[1]
    assert "timing_s/self_reward" in on and "self_reward/description_rate" in on
    assert {"reward/accuracy", "reward/format", "reward/visual"} <= set(on)
    # the question-alone baseline is off unless asked for
    assert on["self_reward/prior_passes"] == 0 and "reward/prior_accuracy" not in on
    main(run_args(tiny_world, tmp_path / "off", "trainer.max_steps=1"))
    off = read_metrics(tmp_path / "off")[1]
    assert "timing_s/self_reward" not in off and not any(k.startswith("self_reward/") for k in off)
