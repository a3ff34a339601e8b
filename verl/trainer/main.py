"""Entry point: `python -m verl.trainer.main config=FILE key=value ...`.

Merges the config (defaults < YAML < command line), checks it, then builds data, reward function,
workers and the trainer, and runs `fit()`.

With `--check-config` it stops after the checks that need no model weights, data or devices (the
config's keys and rules, the reward function, the rollout engine's name, the self-reward template,
and, when the model folder is here, the paths its family takes, read from its config.json) and
prints the resolved config as JSON: a multi-hour GPU run can be checked in seconds on any machine.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from verl.trainer.config import PPOConfig, RunConfig, reward_keys_rule
from verl.trainer.interrupt import Interrupted, stop_on_signals
from verl.utils.cli_help import handle_help
from verl.utils.config import ConfigError, load_config, to_dict

if TYPE_CHECKING:
    from verl.utils.checkpoint import RunLock

logger = logging.getLogger("verl")

CHECK_CONFIG_FLAG = "--check-config"
USAGE = (
    "usage: python -m verl.trainer.main [config=FILE.yaml ...] [key.sub=value ...] [--check-config] [-h]\n"
    "       vision-sr1-train ...  (the same, once the package is installed)"
)


def configure_threads(torch_threads: int | None) -> None:
    """Sane CPU threading: spinning OpenMP threads make small CPU runs erratic."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)


def build_trainer(config: PPOConfig):
    """Everything `fit()` needs, built in dependency order; returns the trainer. Everything that can
    be checked without a model (data, reward function, reward keys) is checked before any loads."""
    from verl.models.loading import load_tokenizer_and_processor
    from verl.trainer.ppo_trainer import PPOTrainer
    from verl.utils.dataset import PromptDataset, PromptDatasetConfig, PromptLoader
    from verl.workers.fsdp_worker import ActorRolloutRefWorker

    data = config.data
    reward_cfg = config.worker.reward
    model_cfg = config.worker.actor.model
    preflight(
        config.trainer.save_checkpoint_path,
        None if config.trainer.val_only else model_cfg.model_path,
        {"data.train_files": [data.train_files], "data.val_files": [data.val_files] if data.val_files else []},
    )
    # From the model's config.json only: a path its family refuses stops the run before any weights load.
    config.worker.actor.check_family("worker.actor")
    reward_fn = load_reward_function(
        "worker.reward.reward_function",
        reward_cfg.reward_function,
        reward_cfg.reward_function_kwargs,
        reward_cfg.reward_type,
    )
    val_reward_fn = build_val_reward(config)

    # The driver tokenizes data itself; workers load their own copy of the same files.
    tokenizer, processor = load_tokenizer_and_processor(
        model_cfg.tokenizer_path or model_cfg.model_path, model_cfg.trust_remote_code
    )
    dataset_cfg = PromptDatasetConfig(
        prompt_key=data.prompt_key,
        answer_key=data.answer_key,
        image_key=data.image_key,
        image_dir=data.image_dir,
        format_prompt=data.format_prompt,
        override_chat_template=data.override_chat_template,
        max_prompt_length=data.max_prompt_length,
        min_pixels=data.min_pixels,
        max_pixels=data.max_pixels,
        filter_overlong_prompts=data.filter_overlong_prompts,
        skip_bad_samples=data.skip_bad_samples,
    )
    train_set = PromptDataset(data.train_files, tokenizer, processor, dataset_cfg)
    train_loader = PromptLoader(train_set, data.rollout_batch_size, data.shuffle, data.seed, tokenizer.pad_token_id)
    val_loader = None
    if data.val_files:
        val_set = PromptDataset(data.val_files, tokenizer, processor, dataset_cfg)
        val_batch = len(val_set) if data.val_batch_size <= 0 else data.val_batch_size
        val_loader = PromptLoader(val_set, val_batch, False, data.seed, tokenizer.pad_token_id, drop_last=False)
    if config.algorithm.advantage_mode == "decoupled" or config.algorithm.online_filtering:
        check_reward_keys(config, reward_fn, train_set[0])

    # The lr schedule's length.
    config.worker.actor.optim.training_steps = config.trainer.total_steps(len(train_loader))

    worker_kwargs = {"config": config.worker, "need_ref": not config.algorithm.disable_kl, "seed": config.trainer.seed}
    worker_group = build_worker_group(ActorRolloutRefWorker, worker_kwargs, config.trainer)
    logger.info("model parameters: %s", worker_group.init_model())
    return PPOTrainer(config, tokenizer, worker_group, train_loader, val_loader, reward_fn, val_reward_fn)


def build_val_reward(config: PPOConfig) -> Any:
    """The reward function scoring validation (`worker.val_reward`), or None to use the training one."""
    val_cfg = config.worker.val_reward
    if val_cfg is None:
        return None
    return load_reward_function(
        "worker.val_reward.reward_function",
        val_cfg.reward_function,
        val_cfg.reward_function_kwargs,
        val_cfg.reward_type,
    )


def preflight(checkpoint_root: str, model_path: str | None, data: dict[str, list[str]]) -> None:
    """What would otherwise fail only after the models load (or after the first step), checked
    first: the checkpoint and log folder is writable, it has room for one checkpoint of the model at
    `model_path` (None: nothing will be saved), and every data file (by config key) is readable and
    holds rows. Raises ConfigError naming the key and the path."""
    from verl.utils.dataset import DataError, local_data_files
    from verl.utils.preflight import PreflightError, check_checkpoint_space, check_data_files, check_writable_folder

    try:
        check_writable_folder(checkpoint_root)  # the trackers' files (metrics.jsonl, ...) go here too
        if model_path is not None and check_checkpoint_space(checkpoint_root, model_path) is None:
            logger.info("disk space for checkpoints not checked: %s is not a local model folder", model_path)
    except PreflightError as exc:
        raise ConfigError(f"config key `trainer.save_checkpoint_path`: {exc}") from None
    for key, specs in data.items():
        for spec in specs:
            try:
                check_data_files(spec, local_data_files(spec))
            except (PreflightError, DataError) as exc:
                raise ConfigError(f"config key `{key}`: {exc}") from None


def load_reward_function(key: str, spec: str, kwargs: dict[str, Any], reward_type: str = "batch") -> Any:
    """The reward function, or a ConfigError naming `key` when it cannot be loaded."""
    from verl.reward import RewardFunction, RewardFunctionError

    try:
        return RewardFunction(spec, kwargs, reward_type)
    except RewardFunctionError as exc:
        raise ConfigError(f"config key `{key}`: {exc}") from None


def check_reward_keys(config: PPOConfig, reward_fn: Any, first_row: dict[str, Any]) -> None:
    """Score an empty response to the first training row and check that the keys the config names
    (decoupled weights, the dynamic-sampling filter) are among the reward's components."""
    probe = {
        "response": "",
        "response_length": 0,
        "ground_truth": first_row["ground_truth"],
        "question": first_row["question"],
        "description_answers": [] if reward_fn.needs_description_answers else None,
        "extra": first_row["extra"],
    }
    (score,) = reward_fn([probe])
    reward_keys_rule(config, set(score))


def check_ppo_config(config: PPOConfig) -> str:
    """What a GRPO run would find wrong before its first step, found without loading model weights,
    data or devices: the reward functions load and fit their arguments, the self-reward stage has
    its template, and the model's family takes the actor's paths (read from its config.json when
    `worker.actor.model.model_path` is a folder here; a hub id or a folder of another machine is
    checked when the run starts). Same constructors as `build_trainer`, so the checks cannot drift
    from the run. Returns a one-line summary; raises ConfigError naming the key."""
    import re

    from jinja2 import TemplateError

    from verl.trainer.self_reward import SelfRewardStage

    model_path = config.worker.actor.model.model_path
    family = None
    if os.path.isfile(os.path.join(model_path, "config.json")):
        family = config.worker.actor.check_family("worker.actor")
    # The rollout engine's name is checked at load against the engine registry (RolloutConfig.check).
    reward_cfg = config.worker.reward
    reward_fn = load_reward_function(
        "worker.reward.reward_function",
        reward_cfg.reward_function,
        reward_cfg.reward_function_kwargs,
        reward_cfg.reward_type,
    )
    build_val_reward(config)
    try:
        # The stage keeps the tokenizer only for later prompts; its checks need none.
        stage = SelfRewardStage(config.self_reward, None, reward_fn.needs_description_answers)
    except (OSError, ValueError, re.error, TemplateError) as exc:
        raise ConfigError(f"config key `self_reward`: {exc}") from None
    run = config.trainer
    return (
        f"{run.worker_backend} backend, {run.nnodes} node(s) x {run.n_gpus_per_node} worker(s), "
        f"model family {family.name if family else 'not checked (no model folder here)'}, "
        f"rollout {config.worker.rollout.name}, reward {reward_cfg.reward_function}, "
        f"self-reward stage {'on' if stage.active else 'off'}"
    )


def build_worker_group(worker_cls: type, worker_kwargs: dict[str, Any], run: RunConfig) -> Any:
    """One `worker_cls` in this process (backend local), or one Ray actor per device on every node
    (ray); `worker_kwargs` plus the device build each."""
    if run.worker_backend == "local":
        from verl.single_controller.local import LocalWorkerGroup

        return LocalWorkerGroup(worker_cls(device=run.device, **worker_kwargs))

    from verl.single_controller.ray import start_worker_group

    return start_worker_group(
        worker_cls,
        worker_kwargs,
        run.nnodes,
        run.n_gpus_per_node,
        run.device,
        run.torch_threads,
        setup_timeout_s=run.worker_setup_timeout_s,
        call_timeout_s=run.worker_call_timeout_s,
    )


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")  # never imported: nothing touched Ray
    return ray is not None and ray.is_initialized()


@contextmanager
def stop_ray_started_here() -> Iterator[None]:
    """Shut Ray down on the way out (its workers, and a local Ray instance) if this block started
    it; a caller's own Ray session is left alone."""
    caller_uses_ray = _ray_connected()
    try:
        yield
    finally:
        if _ray_connected() and not caller_uses_ray:
            sys.modules["ray"].shutdown()


def run_cli(
    argv: list[str] | None,
    schema_cls: type,
    build: Callable[[Any], Any],
    check: Callable[[Any], str] | None = None,
    usage: str | None = None,
    description: str = "",
    reference_yaml: str = "",
) -> dict[str, float]:
    """The command line of a trainer: config from `argv` (exit 2 naming the bad key), threads,
    `build(config).fit()`, and Ray shut down afterwards if this run started it.

    With `--check-config` among the arguments: the config is loaded and validated, `check(config)`
    runs the trainer's other model-free checks, the resolved config is printed as JSON on stdout
    and the summary `check` returns is logged; nothing is trained and nothing is written.

    With `usage`: `-h`/`--help` prints it with `description` and the config reference (exit 0), and
    no arguments at all print it instead of training (exit 2)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if usage is not None:
        handle_help(argv, usage, description, schema_cls, reference_yaml)
    check_only = CHECK_CONFIG_FLAG in argv
    argv = [arg for arg in argv if arg != CHECK_CONFIG_FLAG]
    try:
        config = load_config(argv, schema_cls)
        summary = check(config) if check_only and check is not None else ""
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if check_only:
        print(json.dumps(to_dict(config), indent=2))
        logger.info("config OK%s", f": {summary}" if summary else "")
        return {}
    configure_threads(config.trainer.torch_threads)
    logger.info("config:\n%s", json.dumps(to_dict(config), indent=2))
    # Before anything loads: a second run into this folder stops here, not after minutes of loading.
    run_lock = lock_run_folder(config.trainer.save_checkpoint_path)
    trainer = None
    try:
        # Ray (its workers too) is shut down on every way out, an interruption included; the lock
        # is released after that, once no worker of this run can write into the folder.
        with run_lock, stop_on_signals(), stop_ray_started_here():
            try:
                trainer = build(config)
            except ConfigError as exc:  # found by a check that needs the data or the reward function
                print(f"error: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            return trainer.fit()
    except Interrupted as stop:
        report_interruption(stop, trainer, config.trainer.save_checkpoint_path)
        raise SystemExit(stop.exit_code) from None


def lock_run_folder(folder: str) -> RunLock:
    """Hold `trainer.save_checkpoint_path` for this run (this driver process; Ray's workers never
    take it): exit 1 naming the other run and the folder when a live run holds it, exit 2 when the
    folder cannot be created. Returns the lock (a context manager that releases it)."""
    from verl.utils.checkpoint import RunFolderBusyError, acquire_run_lock

    try:
        return acquire_run_lock(folder)
    except RunFolderBusyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as exc:
        print(f"error: config key `trainer.save_checkpoint_path`: cannot lock {folder}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def report_interruption(stop: Interrupted, trainer: Any, checkpoint_root: str) -> None:
    """Tell the user where the run stopped and how to go on; the step in progress is abandoned and
    a rerun redoes it from the last checkpoint."""
    from verl.utils.checkpoint import list_checkpoints

    if trainer is not None and trainer.tracker is not None:
        trainer.tracker.finish()
    step = trainer.global_step if trainer is not None else 0
    saved = list_checkpoints(checkpoint_root) if os.path.isdir(checkpoint_root) else []
    last = saved[-1][1] if saved else None
    print(
        f"\n{stop}: interrupted at step {step}; rerun the same command to resume "
        f"(last checkpoint: {last or 'none, the rerun starts from step 1'})",
        file=sys.stderr,
        flush=True,
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run_cli(argv, PPOConfig, build_trainer, check_ppo_config, USAGE, __doc__ or "", "examples/config.yaml")


def cli() -> None:
    """Console entry point `vision-sr1-train` (its exit status is not the metrics `main` returns)."""
    main()


if __name__ == "__main__":
    main()
