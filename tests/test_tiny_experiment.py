"""scripts/tiny_experiment.py: its seed interval and its held-out evaluation (on the random-init tiny model)."""

import importlib.util
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("tiny_experiment", ROOT / "scripts" / "tiny_experiment.py")
tiny_experiment = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny_experiment)


def test_t_interval_uses_student_t_over_seeds():
    mean, low, high = tiny_experiment.t_interval([0.2, 0.4])
    # Two seeds: t(0.975, 1 df) = 12.706, sd = 0.1414, half-width = 12.706 * 0.1414 / sqrt(2) = 1.2706.
    assert mean == pytest.approx(0.3)
    assert (low, high) == pytest.approx((0.3 - 1.2706, 0.3 + 1.2706), abs=1e-3)
    values = [0.1, 0.2, 0.3, 0.5]
    mean, low, high = tiny_experiment.t_interval(values)
    half = 3.182 * statistics.stdev(values) / 2
    assert (low, high) == pytest.approx((mean - half, mean + half))
    assert tiny_experiment.t_interval([0.5]) is None


def test_new_variants_ask_for_the_counterfactual_baseline():
    for name in ("self_reward_gain", "self_reward_gain_consistency"):
        extra = tiny_experiment.VARIANTS[name]["extra"]
        assert "self_reward.counterfactual_baseline=true" in extra
        assert any("visual_reward: gain" in item for item in extra)
    assert any(
        "consistency_weight" in item for item in tiny_experiment.VARIANTS["self_reward_gain_consistency"]["extra"]
    )


def test_evaluate_reports_consistency_and_prior_accuracy(tiny_world):
    metrics = tiny_experiment.evaluate(
        str(tiny_world / "models" / "qwen2_5_vl"), tiny_world, tiny_experiment.SEE_THINK, limit=4
    )
    assert set(tiny_experiment.METRICS) <= set(metrics)
    for key in tiny_experiment.METRICS:
        assert 0.0 <= metrics[key] <= 1.0, key


def test_evaluate_on_digit_mix_reports_each_kind_of_question(tiny_world):
    metrics = tiny_experiment.evaluate(
        str(tiny_world / "models" / "qwen2_5_vl"), tiny_world, tiny_experiment.SEE_THINK, limit=8, task="digit_mix"
    )
    for kind in tiny_experiment.KINDS:
        for key in tiny_experiment.KIND_METRICS:
            assert 0.0 <= metrics[f"{kind}_{key}"] <= 1.0, (kind, key)
    # A right answer with a wrong description is a right answer: the rate never exceeds the accuracy.
    assert metrics["right_answer_wrong_description"] <= metrics["answer_accuracy"]


def test_paired_differences_are_taken_seed_by_seed():
    import argparse

    def run(accuracy: float) -> dict:
        return {"answer_accuracy": accuracy}

    results = {
        "see_think": {1: run(0.2), 2: run(0.5), 3: run(0.3)},
        "self_reward": {1: run(0.3), 2: run(0.6), 3: run(0.3)},
    }
    args = argparse.Namespace(baseline=None, variants=["see_think", "self_reward"], seeds=[1, 2, 3])
    lines = tiny_experiment.paired_lines(results, args, ["answer_accuracy"])
    row = next(line for line in lines if line.startswith("| self_reward |"))
    # Differences 0.1, 0.1, 0.0: mean 0.067, t(2 df) = 4.303, sd 0.0577, half-width 0.143; ahead in 2 of 3.
    assert "+0.067 [-0.077, +0.210] 2/3" in row


def test_val_curve_reads_the_validation_steps_of_a_run(tmp_path):
    lines = [
        '{"step": 0, "val/reward/accuracy": 0.3, "val/reward/description_accuracy": 0.25}',
        '{"step": 1, "reward/accuracy": 0.2}',
        '{"step": 10, "val/reward/accuracy": 0.4}',
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    curve = tiny_experiment.val_curve(tmp_path)
    assert curve == {
        "0": {"val/reward/accuracy": 0.3, "val/reward/description_accuracy": 0.25},
        "10": {"val/reward/accuracy": 0.4},
    }
