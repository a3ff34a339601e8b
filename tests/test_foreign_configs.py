"""Configs written for EasyR1 or the original Vision-SR1 load unchanged: each of their keys is ours,
a documented alias of ours (FOREIGN_KEYS in verl/trainer/config.py), or reported, all together, with
what to use instead. The layouts in tests/data/foreign_configs hold every key of their reference
configs (EasyR1's examples/config.yaml; the original's train_examples/*_config.yaml)."""

from __future__ import annotations

import json
import textwrap
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import pytest
import yaml

from verl.reward import RewardFunction
from verl.trainer.config import FOREIGN_KEYS, PPOConfig
from verl.trainer.main import check_ppo_config
from verl.utils.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = ROOT / "tests" / "data" / "foreign_configs"
EASYR1 = f"config={LAYOUTS / 'easyr1_layout.yaml'}"
VISION_SR1 = f"config={LAYOUTS / 'vision_sr1_layout.yaml'}"


def _leaf_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            keys.extend(_leaf_keys(value, f"{prefix}{key}."))
        else:
            keys.append(prefix + key)
    return keys


def _is_schema_key(cls: type, key: str) -> bool:
    head, _, rest = key.partition(".")
    names = {f.name for f in fields(cls)}
    if head not in names:
        return False
    if not rest:
        return True
    hint = get_type_hints(cls)[head]
    inner = next((t for t in getattr(hint, "__args__", (hint,)) if is_dataclass(t)), hint)
    return is_dataclass(inner) and _is_schema_key(inner, rest)


@pytest.mark.parametrize("layout", ["easyr1_layout.yaml", "vision_sr1_layout.yaml"])
def test_every_key_of_their_layouts_is_ours_or_a_documented_foreign_key(layout):
    tree = yaml.safe_load((LAYOUTS / layout).read_text())
    unknown = [
        key
        for key in _leaf_keys(tree)
        if not _is_schema_key(PPOConfig, key) and not any(key == f or key.startswith(f + ".") for f in FOREIGN_KEYS)
    ]
    assert unknown == []


def test_easyr1_layout_loads_unchanged_and_resolves(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config([EASYR1], PPOConfig)
    rollout, actor, ref = config.worker.rollout, config.worker.actor, config.worker.ref
    # val_override_config -> our validation sampling keys
    assert (rollout.val_temperature, rollout.val_top_p, rollout.val_n) == (0.6, 0.95, 2)
    # enable_cpu_offload: false on the actor leaves its offload keys; true on the ref puts its parameters on CPU
    assert (actor.offload.offload_params, actor.offload.offload_optimizer) == (False, False)
    assert ref.offload.offload_params is True
    # max_try_make_batch: 5 generation batches = 4 refills
    assert config.algorithm.max_refills == 4
    assert config.algorithm.online_filtering is True
    assert config.trainer.logger == ["file", "swanlab"]
    assert config.worker.reward.reward_type is None  # the file's REWARD_TYPE decides, as in EasyR1
    assert (config.data.seed, config.algorithm.kl_coef, actor.max_grad_norm) == (3, 2e-2, 0.5)


def test_vision_sr1_layout_loads_with_val_reward_and_response_path(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_config([VISION_SR1], PPOConfig)
    assert config.worker.val_reward is not None
    assert config.worker.val_reward.reward_function.endswith("digit_sum.py:compute_score")
    assert config.trainer.response_path == "./responses/SelfReward.jsonl"
    assert (config.worker.rollout.val_temperature, config.worker.rollout.val_n) == (0.0, 1)
    assert config.worker.actor.offload.offload_params and config.worker.actor.offload.offload_optimizer
    assert (config.worker.rollout.max_num_batched_tokens, config.worker.rollout.max_model_len) == (15000, 8192)
    check_ppo_config(config)  # both reward functions load


def test_unavailable_features_are_reported_together_with_what_to_use(monkeypatch):
    monkeypatch.chdir(ROOT)
    args = [
        EASYR1,
        "worker.actor.ulysses_size=2",
        "trainer.save_model_only=true",
        "algorithm.filter_low=0.2",
    ]
    with pytest.raises(ConfigError) as error:
        load_config(args, PPOConfig)
    message = str(error.value)
    assert message.startswith("3 config key(s)")
    for key, hint in [
        ("worker.actor.ulysses_size", "enable_gradient_checkpointing"),
        ("trainer.save_model_only", "model_merger.py"),
        ("algorithm.filter_low", "not all equal"),
    ]:
        line = next(line for line in message.splitlines() if f"`{key}`" in line)
        assert hint in line and "from the command line" in line


def test_their_token_budget_and_lora_keys_are_ours():
    """EasyR1's dynamic batching, token budget and LoRA keys have the same names and meaning here."""
    config = load_config(
        [
            EASYR1,
            "worker.actor.dynamic_batching=true",
            "worker.actor.max_token_len_per_gpu=8192",
            "worker.actor.model.lora.rank=8",
            "worker.actor.model.lora.alpha=16",
        ],
        PPOConfig,
    )
    actor = config.worker.actor
    assert actor.dynamic_batching and actor.max_token_len_per_gpu == 8192
    assert (actor.model.lora.rank, actor.model.lora.alpha, actor.model.lora.target_modules) == (8, 16, "all-linear")


def test_enable_cpu_offload_is_read_not_hinted_to_full_shard():
    config = load_config(["worker.actor.fsdp.enable_cpu_offload=true"], PPOConfig)
    assert config.worker.actor.offload.offload_params and config.worker.actor.offload.offload_optimizer
    assert config.worker.actor.fsdp.enable_full_shard is True  # untouched


def test_an_alias_and_our_key_disagreeing_is_an_error():
    with pytest.raises(ConfigError, match=r"`trainer\.max_try_make_batch`.*`algorithm\.max_refills`"):
        load_config(["trainer.max_try_make_batch=5", "algorithm.max_refills=1"], PPOConfig)
    with pytest.raises(ConfigError, match=r"worker\.rollout\.val_override_config"):
        load_config(["worker.rollout.val_override_config={temperature: 0.5, top_k: 3}"], PPOConfig)


def test_val_reward_that_does_not_load_names_its_key():
    config = load_config(["worker.val_reward.reward_function=/no/such.py:compute_score"], PPOConfig)
    with pytest.raises(ConfigError, match=r"`worker\.val_reward\.reward_function`"):
        check_ppo_config(config)


def _write(tmp_path: Path, source: str) -> str:
    path = tmp_path / "r1v_like.py"
    path.write_text(textwrap.dedent(source))
    return str(path)


def test_module_reward_type_constant_is_honoured(tmp_path):
    spec = _write(
        tmp_path,
        """
        REWARD_TYPE = "sequential"

        def compute_score(reward_input, format_weight=0.5):
            return {"overall": format_weight * len(reward_input["response"])}
        """,
    )
    reward = RewardFunction(f"{spec}:compute_score")
    assert (reward.reward_type, reward.style) == ("sequential", "sequential")
    samples = [{"response": r, "response_length": 1, "ground_truth": "", "question": "", "extra": {}} for r in "ab"]
    assert reward(samples) == [{"overall": 0.5}, {"overall": 0.5}]
    with pytest.raises(Exception, match="REWARD_TYPE='sequential'"):
        RewardFunction(f"{spec}:compute_score", reward_type="batch")


def test_readme_table_lists_every_foreign_key():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Coming from EasyR1 / Vision-SR1", 1)[1].split("\n## ", 1)[0]
    missing = []
    for key in FOREIGN_KEYS:
        head, _, last = key.rpartition(".")
        braced = head.replace("worker.actor.", "worker.{actor,ref}.").replace("worker.ref.", "worker.{actor,ref}.")
        if f"`{key}`" not in section and f"`{braced}.{last}`" not in section:
            missing.append(key)
    assert missing == []


def test_val_reward_scores_validation_and_response_path_receives_it(tiny_world, tmp_path):
    """The original's accuracy-only validation: worker.val_reward scores every validation answer,
    trainer.response_path receives the val_only generations, and the run draws its curves."""
    from test_trainer import read_metrics, run_args

    from verl.trainer.main import main

    val_reward = tmp_path / "validation.py"
    val_reward.write_text(
        "REWARD_TYPE = 'sequential'\n\n"
        "def compute_score(reward_input):\n"
        "    return {'overall': 0.25, 'accuracy': 0.25}\n"
    )
    responses = tmp_path / "responses" / "val.jsonl"
    main(
        run_args(
            tiny_world,
            tmp_path,
            "trainer.val_only=true",
            f"worker.val_reward.reward_function={val_reward}:compute_score",
            f"trainer.response_path={responses}",
        )
    )
    rows = [json.loads(line) for line in responses.read_text().splitlines()]
    assert len(rows) == 128 and all(row["score"] == {"overall": 0.25, "accuracy": 0.25} for row in rows)
    assert not (tmp_path / "generations_step_0.jsonl").exists()
    assert read_metrics(tmp_path)[0]["val/reward/accuracy"] == 0.25
    assert (tmp_path / "reward_curves.png").is_file()
