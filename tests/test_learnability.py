"""GRPO learns: from a random-init tiny model, a reward it earns only now and then rises clearly.

The reward is the share of digit characters in the response (tests/rewards/digit_density.py); a
random policy over the 526-token vocabulary scores about 0.01.
"""

import json
from pathlib import Path

from verl.trainer.main import main

ROOT = Path(__file__).resolve().parent.parent


def test_grpo_raises_a_rare_reward(tiny_world, tmp_path):
    main(
        [
            f"data.train_files={tiny_world / 'data/digit_sum/train.parquet'}",
            "data.val_files=null",
            f"worker.actor.model.model_path={tiny_world / 'models/qwen2_5_vl'}",
            "data.format_prompt=examples/format_prompt/see_think.jinja",
            "data.rollout_batch_size=8",
            "worker.actor.global_batch_size=8",
            "worker.actor.micro_batch_size_per_device_for_update=64",
            "worker.actor.micro_batch_size_per_device_for_experience=64",
            "worker.rollout.n=8",
            "data.max_response_length=16",
            "worker.actor.optim.lr=3e-3",
            f"worker.reward.reward_function={ROOT / 'tests/rewards/digit_density.py'}:compute_score",
            "algorithm.disable_kl=true",
            "trainer.logger=[file]",
            f"trainer.save_checkpoint_path={tmp_path}",
            "trainer.max_steps=25",
        ]
    )
    rewards = [json.loads(line)["reward/overall"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rewards) == 25
    start, end = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert start < 0.1, rewards
    assert end > 0.5 and end > 5 * start, rewards
