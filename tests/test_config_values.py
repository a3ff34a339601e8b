"""Values a user writes the way YAML reads them, and sizes that cannot run, through the real entry
points: `self_reward.enable=true` (a YAML boolean) means the word "true"; a batch size of -8 or 0
stops the command at load, naming the key and the rule, before anything starts."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import pytest

from verl.trainer import generate
from verl.trainer.config import PPOConfig
from verl.trainer.main import main
from verl.trainer.sft_config import SFTConfig
from verl.utils.config import ConfigError, load_config, to_dict

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "examples" / "config.yaml"


def _resolved(config: Any) -> dict[str, Any]:
    """The config as --check-config prints it (JSON: tuples become lists)."""
    return json.loads(json.dumps(to_dict(config)))


# --- ITEM 1: a YAML boolean for a key whose choices are auto / true / false ----------------------
def test_enable_true_on_the_command_line_is_accepted(tmp_path):
    """Exactly what the user ran: the boolean YAML makes of `true` is the word "true"."""
    result = subprocess.run(
        [sys.executable, "-m", "verl.trainer.main", f"config={REFERENCE}", "self_reward.enable=true", "--check-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    # The same config as the quoted word gives (YAML keeps 'true' a string).
    assert printed == _resolved(load_config([f"config={REFERENCE}", "self_reward.enable='true'"], PPOConfig))
    assert printed["self_reward"]["enable"] == "true"
    assert "self-reward stage on" in result.stderr


@pytest.mark.parametrize("written, word", [("true", "true"), ("false", "false"), ("'true'", "true"), ("auto", "auto")])
def test_enable_in_a_yaml_file_is_accepted(written, word, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    override = tmp_path / "self_reward.yaml"
    override.write_text(f"self_reward:\n  enable: {written}\n")
    assert main(["--check-config", f"config={REFERENCE}", f"config={override}"]) == {}
    printed = json.loads(capsys.readouterr().out)
    assert printed["self_reward"]["enable"] == word
    assert printed == _resolved(load_config([f"config={REFERENCE}", f"self_reward.enable='{word}'"], PPOConfig))


def _str_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_str_keys(type(default), f"{prefix}{f.name}."))
        elif isinstance(default, str) and not f.metadata.get("derived"):
            keys.append(prefix + f.name)
    return keys


def _load(schema: type, args: list[str]) -> Any:
    config = load_config(args, schema)
    if schema is generate.GenerateConfig:
        generate.check_config(config)  # the generate command's own checks (it has no validate())
    return config


@pytest.mark.parametrize("schema", [PPOConfig, SFTConfig, generate.GenerateConfig])
def test_no_word_key_rejects_a_yaml_boolean_it_lists(schema):
    """Every str key, given `true` and `false`: none may answer that "True" is not one of choices
    that include "true" (a choice key not declared with `choice_field` would)."""
    for key in _str_keys(schema):
        for value in ("true", "false"):
            try:
                _load(schema, [f"{key}={value}"])
            except ConfigError as exc:
                message = str(exc)
                choices = message.partition("not one of")[2]
                assert not (value in choices and f"'{value.title()}'" in message), message


# --- ITEM 3: sizes are checked at load -----------------------------------------------------------
@pytest.mark.parametrize("value", [-8, 0])
def test_global_batch_size_stops_the_run_before_anything_starts(value, tmp_path, capsys, monkeypatch):
    """Without --check-config, too: exit 2 naming the key and the rule; nothing is created."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as raised:
        main([f"config={REFERENCE}", f"worker.actor.global_batch_size={value}"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert f"config key `worker.actor.global_batch_size`: must be positive; got {value}" in err
    assert list(tmp_path.iterdir()) == []  # no checkpoint or log folder: the run never started


@pytest.mark.parametrize("value", [-8, 0])
def test_global_batch_size_fails_check_config(value, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as raised:
        main(["--check-config", f"config={REFERENCE}", f"worker.actor.global_batch_size={value}"])
    assert raised.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "`worker.actor.global_batch_size`: must be positive" in err


ADAPTIVE_KL = ["algorithm.kl_type=adaptive", "algorithm.use_kl_loss=false"]

# (schema, key, a value that cannot run, other keys it needs to matter)
BAD_SIZES = [
    (PPOConfig, "data.rollout_batch_size", 0, []),
    (PPOConfig, "data.val_batch_size", 0, []),
    (PPOConfig, "data.val_batch_size", -2, []),
    (PPOConfig, "data.max_prompt_length", 0, []),
    (PPOConfig, "data.max_response_length", -1, []),
    (PPOConfig, "data.min_pixels", 0, []),
    (PPOConfig, "data.max_pixels", -1, []),
    (PPOConfig, "data.min_pixels", 8388608, []),  # above max_pixels
    (PPOConfig, "worker.actor.global_batch_size", -8, []),
    (PPOConfig, "worker.actor.global_batch_size", 0, []),
    (PPOConfig, "worker.actor.micro_batch_size_per_device_for_update", 0, []),
    (PPOConfig, "worker.actor.micro_batch_size_per_device_for_experience", 0, []),
    (PPOConfig, "worker.actor.ppo_epochs", 0, []),
    (PPOConfig, "worker.actor.logprob_chunk_size", -1, []),
    (PPOConfig, "worker.actor.max_token_len_per_gpu", 0, []),
    (PPOConfig, "worker.actor.model.lora.rank", -1, []),
    (PPOConfig, "worker.actor.optim.lr_warmup_steps", -2, []),
    (PPOConfig, "worker.actor.fsdp.fsdp_size", 0, []),
    (PPOConfig, "worker.actor.fsdp.fsdp_size", 3, ["trainer.n_gpus_per_node=4"]),  # does not divide 4 workers
    (PPOConfig, "worker.ref.fsdp.fsdp_size", -2, []),
    (PPOConfig, "worker.ref.micro_batch_size_per_device_for_experience", 0, []),
    (PPOConfig, "worker.rollout.n", 0, []),
    (PPOConfig, "worker.rollout.val_n", 0, []),
    (PPOConfig, "worker.rollout.top_k", 0, []),
    (PPOConfig, "worker.rollout.micro_batch_size", 0, []),
    (PPOConfig, "worker.rollout.tensor_parallel_size", 0, []),
    (PPOConfig, "worker.rollout.max_num_batched_tokens", 0, []),
    (PPOConfig, "worker.rollout.max_model_len", 0, []),
    (PPOConfig, "worker.rollout.limit_images", -1, []),
    (PPOConfig, "self_reward.n", 0, []),
    (PPOConfig, "self_reward.max_response_length", 0, []),
    (PPOConfig, "algorithm.max_refills", -1, []),
    (PPOConfig, "algorithm.kl_horizon", 0, ADAPTIVE_KL),
    (PPOConfig, "algorithm.kl_target", 0, ADAPTIVE_KL),
    (PPOConfig, "trainer.nnodes", 0, []),
    (PPOConfig, "trainer.n_gpus_per_node", 0, []),
    (PPOConfig, "trainer.total_epochs", 0, []),
    (PPOConfig, "trainer.max_steps", 0, []),
    (PPOConfig, "trainer.val_freq", 0, []),
    (PPOConfig, "trainer.save_freq", -2, []),
    (PPOConfig, "trainer.save_limit", 0, []),
    (PPOConfig, "trainer.torch_threads", 0, []),
    (PPOConfig, "trainer.val_generations_to_log", -1, []),
    (SFTConfig, "data.batch_size", 0, []),
    (SFTConfig, "data.max_length", 0, []),
    (SFTConfig, "data.min_pixels", 0, []),
    (SFTConfig, "trainer.micro_batch_size", 0, []),
    (SFTConfig, "trainer.val_freq", -5, []),
    (SFTConfig, "trainer.save_limit", 0, []),
    (SFTConfig, "optim.lr_warmup_steps", -5, []),
    (SFTConfig, "eval.max_prompt_length", 0, []),
    (SFTConfig, "eval.max_new_tokens", 0, []),
    (SFTConfig, "eval.batch_size", -1, []),
    (SFTConfig, "eval.generations_to_log", -1, []),
    (generate.GenerateConfig, "max_prompt_length", 0, []),
    (generate.GenerateConfig, "max_new_tokens", 0, []),
    (generate.GenerateConfig, "batch_size", -1, []),
    (generate.GenerateConfig, "num_shards", 0, []),
    (generate.GenerateConfig, "data_parallel_size", -1, []),
    (generate.GenerateConfig, "min_pixels", 0, []),
    (generate.GenerateConfig, "max_pixels", -1, []),
]


@pytest.mark.parametrize(
    "schema, key, bad, extra", BAD_SIZES, ids=[f"{s.__name__}:{k}={v}" for s, k, v, _ in BAD_SIZES]
)
def test_each_size_key_is_checked_at_load(schema, key, bad, extra):
    with pytest.raises(ConfigError) as raised:
        _load(schema, [*extra, f"{key}={bad}"])
    message = str(raised.value)
    assert f"config key `{key}`: " in message and "must" in message, message


# The values the docstrings give a meaning to (all / off / no bound / default) still load.
SENTINELS = [
    (PPOConfig, "data.val_batch_size", "-1"),
    (PPOConfig, "data.min_pixels", "null"),
    (PPOConfig, "data.max_pixels", "null"),
    (PPOConfig, "worker.actor.logprob_chunk_size", "0"),
    (PPOConfig, "worker.actor.model.lora.rank", "0"),
    (PPOConfig, "worker.actor.optim.lr_warmup_steps", "-1"),
    (PPOConfig, "worker.actor.optim.lr_warmup_steps", "0"),
    (PPOConfig, "worker.actor.fsdp.fsdp_size", "-1"),
    (PPOConfig, "worker.rollout.top_k", "-1"),
    (PPOConfig, "worker.rollout.max_model_len", "null"),
    (PPOConfig, "worker.rollout.limit_images", "0"),
    (PPOConfig, "self_reward.max_response_length", "null"),
    (PPOConfig, "algorithm.max_refills", "0"),
    (PPOConfig, "trainer.max_steps", "null"),
    (PPOConfig, "trainer.val_freq", "-1"),
    (PPOConfig, "trainer.save_freq", "-1"),
    (PPOConfig, "trainer.save_limit", "-1"),
    (PPOConfig, "trainer.val_generations_to_log", "0"),
    (SFTConfig, "trainer.val_freq", "-1"),
    (SFTConfig, "data.max_pixels", "null"),
    (generate.GenerateConfig, "data_parallel_size", "0"),
    (generate.GenerateConfig, "min_pixels", "null"),
]


@pytest.mark.parametrize("schema, key, value", SENTINELS, ids=[f"{s.__name__}:{k}={v}" for s, k, v in SENTINELS])
def test_documented_sentinels_are_accepted(schema, key, value):
    _load(schema, [f"{key}={value}"])
