"""Config merging (defaults < YAML < command line) and the checks that run before any model loads."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from verl.trainer.config import PPOConfig
from verl.utils.config import ConfigError, load_config, to_dict

ROOT = Path(__file__).resolve().parent.parent


def test_precedence_defaults_yaml_cli(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("worker:\n  actor:\n    optim:\n      lr: 0.5\n      weight_decay: 0.25\n")
    config = load_config([f"config={cfg_file}", "worker.actor.optim.lr=0.125"], PPOConfig)
    assert config.worker.actor.optim.lr == 0.125  # command line wins over the file
    assert config.worker.actor.optim.weight_decay == 0.25  # file wins over defaults
    assert config.worker.actor.optim.betas == (0.9, 0.999)  # default kept
    assert isinstance(config, PPOConfig)


def test_derived_fields_follow_their_source():
    config = load_config(
        ["algorithm.kl_coef=0.5", "algorithm.use_kl_loss=false", "data.max_response_length=33"], PPOConfig
    )
    assert config.worker.actor.kl_coef == 0.5
    assert config.worker.actor.use_kl_loss is False
    assert config.worker.rollout.response_length == 33
    with pytest.raises(ConfigError, match="worker.actor.kl_coef.*derived"):
        load_config(["worker.actor.kl_coef=0.1"], PPOConfig)


@pytest.mark.parametrize(
    "args, message",
    [
        (["worker.actor.optim.lrr=1"], r"`worker\.actor\.optim\.lrr`.*Did you mean"),
        (["worker.actor.optim.lr=fast"], r"`worker\.actor\.optim\.lr`.*Float"),
        (["data.rollout_batch_size=24"], r"`data\.rollout_batch_size`.*multiple of worker\.actor\.global_batch_size"),
        (
            ["worker.actor.micro_batch_size_per_device_for_update=7"],
            r"`worker\.actor\.micro_batch_size_per_device_for_update`.*divide",
        ),
        (["worker.actor.loss_agg_mode=mean"], r"`worker\.actor\.loss_agg_mode`"),
        (["algorithm.kl_penalty=kl2"], r"`algorithm\.kl_penalty`"),
        (["worker.rollout.n=1"], r"`worker\.rollout\.n`.*group"),
        (["trainer.logger=[console,mlflow]"], r"`trainer\.logger`.*mlflow"),
        (["trainer.n_gpus_per_node=2", "trainer.backend=local"], r"`trainer\.backend`"),
        (
            ["worker.rollout.name=vllm", "worker.rollout.tensor_parallel_size=4", "trainer.n_gpus_per_node=2"],
            r"`worker\.rollout\.tensor_parallel_size`.*divide the number of workers.*= 2",
        ),
        (["worker.rollout.tensor_parallel_size=2"], r"`worker\.rollout\.tensor_parallel_size`.*only the vllm engine"),
        (["trainer.worker_call_timeout_s=0"], r"`trainer\.worker_call_timeout_s`.*positive"),
        (["data.format_prompt=/no/such/file.jinja"], r"`data\.format_prompt`.*not found"),
        (["worker.reward.reward_function=reward.py"], r"`worker\.reward\.reward_function`"),
        (["oops"], r"key=value"),
    ],
)
def test_bad_config_names_key_and_rule(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(args, PPOConfig)


def test_missing_yaml_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([f"config={tmp_path / 'missing.yaml'}"], PPOConfig)


def test_unknown_key_in_yaml_names_file(tmp_path):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("trainer:\n  total_epoch: 3\n")
    with pytest.raises(ConfigError, match=r"trainer\.total_epoch.*bad\.yaml"):
        load_config([f"config={cfg_file}"], PPOConfig)


def _keys(tree, prefix=""):
    keys = set()
    for key, value in tree.items():
        if isinstance(value, dict) and value and key not in ("reward_function_kwargs", "decoupled_weights"):
            keys |= _keys(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


def test_reference_yaml_mirrors_dataclasses():
    reference = yaml.safe_load((ROOT / "examples" / "config.yaml").read_text())
    derived = {
        "worker.actor.use_kl_loss",
        "worker.actor.kl_penalty",
        "worker.actor.kl_coef",
        "worker.rollout.prompt_length",
        "worker.rollout.response_length",
    }
    assert _keys(reference) == _keys(to_dict(PPOConfig())) - derived
    # and it loads as a config file
    load_config([f"config={ROOT / 'examples' / 'config.yaml'}"], PPOConfig)


@pytest.mark.parametrize("schema, reference", [("train", "config.yaml"), ("generate", "generate_config.yaml")])
def test_reference_yaml_is_generated_from_the_code(schema, reference):
    printed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "print_reference_config.py"), schema],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert printed.strip() == (ROOT / "examples" / reference).read_text().strip(), (
        f"examples/{reference} is stale: python scripts/print_reference_config.py {schema} > examples/{reference}"
    )


# Every enumerated key, with a bad value: the message names the key, the value and the registry's
# choices (so the list in the message is the one the code dispatches on).
@pytest.mark.parametrize(
    "key, bad, choice",
    [
        ("algorithm.adv_estimator", "ppo_gae", "reinforce_plus_plus"),
        ("worker.actor.policy_loss", "vanilla", "gspo"),
        ("worker.actor.loss_agg_mode", "mean", "seq-mean-token-sum-norm"),
        ("algorithm.kl_penalty", "kl2", "low_var_kl"),
        ("algorithm.kl_type", "pid", "adaptive"),
        ("algorithm.advantage_mode", "split", "decoupled"),
        ("worker.rollout.name", "sglang", "vllm"),
        ("trainer.logger", "[console,mlflow]", "tensorboard"),
        ("worker.actor.optim.strategy", "sgd", "adamw_bf16"),
        ("worker.actor.optim.lr_scheduler_type", "linear", "cosine"),
        ("worker.actor.model.attn_implementation", "flash", "flash_attention_2"),
        ("worker.actor.fsdp.torch_dtype", "fp8", "bf16"),
        ("worker.ref.fsdp.mp_param_dtype", "fp8", "bf16"),
        ("worker.reward.reward_type", "parallel", "sequential"),
        ("self_reward.enable", "maybe", "auto"),
        ("trainer.backend", "slurm", "ray"),
        ("trainer.device", "tpu", "cuda"),
    ],
)
def test_each_enumerated_key_is_checked_against_its_registry(key, bad, choice):
    with pytest.raises(ConfigError) as raised:
        load_config([f"{key}={bad}"], PPOConfig)
    message = str(raised.value)
    shown_bad = bad.strip("[]").split(",")[-1]
    assert f"`{key}`" in message and shown_bad in message and choice in message, message


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["algorithm.kl_penalty=full", "algorithm.use_kl_loss=false"],
            r"`algorithm\.kl_penalty`: full needs whole distributions.*use_kl_loss=true",
        ),
        (
            ["algorithm.kl_type=adaptive", "algorithm.use_kl_loss=true"],
            r"`algorithm\.kl_type`: adaptive .* would be ignored with algorithm\.use_kl_loss=true",
        ),
        (["algorithm.advantage_mode=decoupled"], r"`algorithm\.decoupled_weights`.*at least one"),
    ],
)
def test_combinations_that_cannot_work_fail_at_load(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(args, PPOConfig)


def test_registered_choices_are_reachable():
    """`gspo` (registered in core_algos) is selected by `worker.actor.policy_loss`, and the actor
    uses what the key names; `full` KL and adaptive KL load where they can work."""
    from verl.algorithms import core_algos
    from verl.workers.actor.dp_actor import DataParallelActor

    config = load_config(["worker.actor.policy_loss=gspo"], PPOConfig)
    actor = DataParallelActor(config.worker.actor, model=None)
    assert actor.policy_loss is core_algos.compute_gspo_policy_loss
    load_config(["algorithm.kl_penalty=full", "algorithm.use_kl_loss=true"], PPOConfig)
    load_config(["algorithm.kl_type=adaptive", "algorithm.use_kl_loss=false"], PPOConfig)


def test_reward_component_keys_are_checked_before_models_load(tiny_world, capsys):
    """Decoupled weights and the dynamic-sampling filter name reward components: a name the reward
    function does not return stops the CLI (exit 2) after a probe call, before any worker starts."""
    from verl.trainer.main import main

    data = tiny_world / "data" / "digit_sum"
    base = [
        f"worker.actor.model.model_path={tiny_world / 'models' / 'qwen2_5_vl'}",
        f"data.train_files={data / 'train.parquet'}",
        "data.val_files=null",
        "trainer.logger=[console]",
    ]
    with pytest.raises(SystemExit) as raised:
        main([*base, "algorithm.advantage_mode=decoupled", "algorithm.decoupled_weights={accuracy: 1.0, vision: 1.0}"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "`algorithm.decoupled_weights`" in err and "['vision']" in err and "accuracy" in err
    with pytest.raises(SystemExit):
        main([*base, "algorithm.online_filtering=true", "algorithm.filter_key=acc"])
    assert "`algorithm.filter_key`" in capsys.readouterr().err
