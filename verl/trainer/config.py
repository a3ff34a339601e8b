"""The RL trainer's configuration: data, algorithm, self-reward and run control, composing the
worker layer's configs (verl/workers/config.py) under `worker.*`.

`examples/config.yaml` mirrors these classes. Values merge as defaults < YAML file < command line
(`key.sub=value`, see verl.utils.config.load_config). Unknown keys and wrong types fail in the merge;
every enumerated value and every rule spanning keys in `PPOConfig.validate`, before any model is
loaded, naming the key and (for enumerations) the choices of the registry the code dispatches on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from verl.algorithms.core_algos import ADV_ESTIMATORS, KL_CONTROLLERS, KL_MODES
from verl.utils.checkpoint import CHECKSUMS, ON_DAMAGED
from verl.utils.config import ForeignKey, choice_field, no_op, require, require_choice, require_size
from verl.utils.device import DEVICES
from verl.utils.tracking import LOGGERS
from verl.workers.config import WorkerConfig

ADVANTAGE_MODES = ("summed", "decoupled")
BACKENDS = ("auto", "local", "ray")
SELF_REWARD_MODES = ("auto", "true", "false")


@dataclass
class DataConfig:
    train_files: str = "tiny_world/data/digit_sum/train.parquet"
    """Training data: a parquet/json/jsonl file, a folder of them, or `name@split` (HF datasets cache)."""
    val_files: str | None = "tiny_world/data/digit_sum/val.parquet"
    """Validation data, same forms as `train_files`; null for none."""
    prompt_key: str = "problem"
    """Column with the question text; `<image>` marks where each image goes."""
    answer_key: str = "answer"
    """Column with the ground-truth answer handed to the reward function."""
    image_key: str = "images"
    """Column with a list of images (bytes, paths or `{"bytes"|"path": ...}`); absent means text-only."""
    image_dir: str | None = None
    """Folder that relative image paths are resolved against."""
    format_prompt: str | None = None
    """Jinja file rendering the user turn from `content` (the question); a missing file is an error."""
    override_chat_template: str | None = None
    """Jinja chat template to use instead of the tokenizer's."""
    max_prompt_length: int = 512
    """Prompts with more tokens (image tokens included) are filtered out, never truncated."""
    max_response_length: int = 64
    """Maximum number of generated tokens per response."""
    rollout_batch_size: int = 16
    """Prompts per training step (each sampled `worker.rollout.n` times)."""
    val_batch_size: int = -1
    """Prompts per validation generation batch; -1 means the whole validation set at once."""
    shuffle: bool = True
    """Shuffle the training data each epoch (seeded by `seed`)."""
    seed: int = 1
    """Seed of the data order."""
    min_pixels: int | None = 784
    """Images smaller than this many pixels are upscaled (qwen-vl-utils' smart_resize: sides become multiples of 28). None: no bound."""
    max_pixels: int | None = 4194304
    """Images larger than this many pixels are downscaled. None: no bound."""
    filter_overlong_prompts: bool = True
    """Drop over-long prompts (with a logged count); False makes an over-long prompt an error."""
    skip_bad_samples: bool = False
    """Skip (and count) rows with a missing or corrupt image instead of failing on them."""


@dataclass
class AlgorithmConfig:
    adv_estimator: str = "grpo"
    """Advantage estimator: grpo, dr_grpo, rloo, reinforce_plus_plus, remax."""
    gamma: float = 1.0
    """Discount for estimators that use returns (reinforce_plus_plus)."""
    norm_adv_by_std_in_grpo: bool = True
    """Divide GRPO advantages by the group's reward std (dr_grpo sets this off)."""
    disable_kl: bool = False
    """No reference model and no KL at all."""
    use_kl_loss: bool = True
    """KL as a loss term (True) or as a per-token reward penalty (False)."""
    kl_penalty: str = "low_var_kl"
    """KL estimator: kl, abs, mse, low_var_kl, full."""
    kl_coef: float = 1e-2
    """Initial KL coefficient."""
    kl_type: str = "fixed"
    """KL coefficient controller: fixed or adaptive."""
    kl_target: float = 0.1
    """Adaptive controller: target KL."""
    kl_horizon: float = 10000.0
    """Adaptive controller: horizon in samples."""
    online_filtering: bool = False
    """DAPO dynamic sampling: drop groups whose `filter_key` rewards are all equal and refill."""
    filter_key: str = "overall"
    """Reward component that decides whether a group is informative."""
    max_refills: int = 3
    """Dynamic sampling: at most this many extra rollout batches per step."""
    advantage_mode: str = "summed"
    """summed: one advantage from the overall reward; decoupled: each component normalised in its group, then weighted."""
    decoupled_weights: dict[str, float] = field(default_factory=dict)
    """Decoupled mode: weight of each reward component (e.g. {accuracy: 0.9, format: 0.1, visual: 1.0})."""


@dataclass
class SelfRewardConfig:
    enable: str = choice_field("auto", SELF_REWARD_MODES)
    """auto: run when the reward function asks for description answers; true / false force it."""
    prompt_template: str = "examples/format_prompt/perception_prompt.jinja"
    """Jinja template of the text-only prompt, given `description` and `question`."""
    description_tag: str = "description"
    """Tag whose content is the description; ignored when `description_regex` is set."""
    description_regex: str | None = None
    """Regex with one group capturing the description (overrides the tag)."""
    n: int = 1
    """Text-only answers generated per response."""
    temperature: float | None = None
    """None: the rollout's temperature."""
    top_p: float | None = None
    max_response_length: int | None = None
    """None: data.max_response_length."""
    deny_answer_leak: bool = False
    """Give no visual credit to a description that already states the ground-truth answer."""
    during_validation: bool = True
    """Also run on validation batches (measures perception accuracy on held-out data)."""
    counterfactual_baseline: bool = False
    """Also ask each prompt's question once with no description (`n` answers, same generate call) and give the reward function these `prior_answers`: the baseline of a visual reward that descriptions steering toward the answer prior cannot win (see_think_self_reward.py: visual_reward=gain)."""
    dedupe: bool = True
    """Generate each distinct text-only prompt (description and question, or question alone) once and give its `n` answers to every response that asks it. Greedy, the answers are exactly those of separate prompts; sampled, each response still gets `n` draws from the same distribution (same expected reward), but equal descriptions get equal answers instead of independent draws. false: one prompt per response."""

    def check(self, prefix: str = "self_reward") -> None:
        require_choice(self.enable, SELF_REWARD_MODES, f"{prefix}.enable")
        require_size(self.n, f"{prefix}.n")
        require_size(self.max_response_length, f"{prefix}.max_response_length", null="data.max_response_length")
        require(
            self.temperature is None or self.temperature >= 0,
            f"{prefix}.temperature",
            "must be >= 0 (0 is greedy), or null",
        )
        require(self.top_p is None or 0 < self.top_p <= 1, f"{prefix}.top_p", "must be in (0, 1], or null")


@dataclass
class RunConfig:
    """What every trainer run has, RL and SFT alike: names, workers, length, logging, checkpoints."""

    project_name: str = "vision_sr1"
    experiment_name: str = "tiny_world"
    backend: str = "auto"
    """local: one worker in this process (CPU or one GPU). ray: one FSDP worker per device, nnodes x n_gpus_per_node of them (on CPU: processes sharing the cores). auto: ray when there is more than one."""
    device: str = "auto"
    """auto, cpu or cuda."""
    nnodes: int = 1
    """Nodes of the Ray cluster (backend=ray)."""
    n_gpus_per_node: int = 1
    """Workers per node: one per GPU, or CPU processes when device=cpu."""
    total_epochs: int = 1
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides total_epochs when smaller)."""
    logger: list[str] = field(default_factory=lambda: ["console", "file"])
    """Any of console, file, wandb, tensorboard, swanlab (the last three need their packages)."""
    val_freq: int = -1
    """Evaluate on the validation data every N steps; -1: only at the end."""
    val_before_train: bool = True
    """Also evaluate the starting model (step 0)."""
    save_freq: int = -1
    """Save every N steps; -1: only at the end."""
    save_limit: int = -1
    """Keep at most this many checkpoints; -1 keeps all."""
    save_checkpoint_path: str | None = None
    """Default: checkpoints/<project_name>/<experiment_name>."""
    load_checkpoint_path: str | None = None
    """Resume from this `global_step_N` folder (default: the latest one under save_checkpoint_path)."""
    find_last_checkpoint: bool = True
    """Resume from the latest complete checkpoint under save_checkpoint_path when there is one."""
    seed: int = 1
    """Seed of model init, sampling and everything else random."""
    torch_threads: int | None = None
    """CPU threads for torch; None leaves torch's default."""
    worker_setup_timeout_s: float = 300.0
    """backend=ray: the longest placing the workers, starting them and joining their process group may take."""
    worker_call_timeout_s: float = 3600.0
    """backend=ray: the longest one worker-group call (a whole generation, a whole update) may take; past it the run stops with an error naming the late workers."""
    checkpoint_checksum: str = "sha256"
    """What each checkpoint's manifest.json records of its files, verified on resume: sha256 (size and SHA-256; finds truncated, missing and corrupted files) or size (sizes only: no hashing, for very large models; finds truncated and missing files)."""
    resume_on_damaged: str = "fallback"
    """When the newest checkpoint fails verification on resume: fallback (warn naming the file and problem, resume from the newest intact checkpoint, or from scratch when there is none) or error (stop). A damaged load_checkpoint_path always stops the run."""

    def fill_derived(self) -> None:
        """Set save_checkpoint_path from the names when it was not given. Called from the whole
        config's __post_init__: this class's own would also run when the schema's defaults are
        built, before the file and command line set the names."""
        if self.save_checkpoint_path is None:
            self.save_checkpoint_path = os.path.join("checkpoints", self.project_name, self.experiment_name)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.n_gpus_per_node

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run: total_epochs epochs, capped by max_steps."""
        steps = batches_per_epoch * self.total_epochs
        return steps if self.max_steps is None else min(steps, self.max_steps)

    @property
    def worker_backend(self) -> str:
        """`backend` with auto resolved: local or ray."""
        if self.backend == "auto":
            return "ray" if self.world_size > 1 else "local"
        return self.backend

    def check(self) -> None:
        """The rules of these keys; raises ConfigError naming the key (as `trainer.<key>`)."""
        require_choice(self.backend, BACKENDS, "trainer.backend")
        require_choice(self.device, DEVICES, "trainer.device")
        require_size(self.nnodes, "trainer.nnodes")
        require_size(self.n_gpus_per_node, "trainer.n_gpus_per_node")
        require(
            self.backend != "local" or self.world_size == 1,
            "trainer.backend",
            f"local runs one worker; nnodes x n_gpus_per_node is {self.world_size} (use backend=ray)",
        )
        require_size(self.total_epochs, "trainer.total_epochs")
        require_size(self.max_steps, "trainer.max_steps", null="total_epochs decides")
        # The loops read any value <= 0 as "off"; only the documented -1 is taken, so a typo such as
        # 0 or -5 is reported rather than silently meaning "only at the end" / "keep all".
        require_size(self.val_freq, "trainer.val_freq", sentinel=(-1, "only at the end"))
        require_size(self.save_freq, "trainer.save_freq", sentinel=(-1, "only at the end"))
        require_size(self.save_limit, "trainer.save_limit", sentinel=(-1, "keep all"))
        require_size(self.torch_threads, "trainer.torch_threads", null="torch's default")
        require(self.worker_setup_timeout_s > 0, "trainer.worker_setup_timeout_s", "must be positive")
        require(self.worker_call_timeout_s > 0, "trainer.worker_call_timeout_s", "must be positive")
        for name in self.logger:
            require_choice(name, sorted(LOGGERS), "trainer.logger")
        require_choice(self.checkpoint_checksum, CHECKSUMS, "trainer.checkpoint_checksum")
        require_choice(self.resume_on_damaged, ON_DAMAGED, "trainer.resume_on_damaged")


@dataclass
class TrainerConfig(RunConfig):
    val_only: bool = False
    """Only validate, writing generations to `response_path` (default `<save_checkpoint_path>/generations_step_<N>.jsonl`)."""
    response_path: str | None = None
    """val_only: the JSONL file the validation generations are written to (as the original Vision-SR1's key)."""
    val_generations_to_log: int = 4


@dataclass
class PPOConfig:
    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    self_reward: SelfRewardConfig = field(default_factory=SelfRewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    @classmethod
    def foreign_keys(cls) -> dict[str, ForeignKey]:
        """Keys of EasyR1's and the original Vision-SR1's configs that are not ours (see FOREIGN_KEYS)."""
        return FOREIGN_KEYS

    def __post_init__(self) -> None:
        self.worker.actor.use_kl_loss = self.algorithm.use_kl_loss and not self.algorithm.disable_kl
        self.worker.actor.kl_penalty = self.algorithm.kl_penalty
        self.worker.actor.kl_coef = self.algorithm.kl_coef
        self.worker.rollout.prompt_length = self.data.max_prompt_length
        self.worker.rollout.response_length = self.data.max_response_length
        self.trainer.fill_derived()

    def validate(self) -> None:
        """Check every key's value and the rules that span keys; raises ConfigError naming the key."""
        data, actor, rollout, trainer = self.data, self.worker.actor, self.worker.rollout, self.trainer
        self.worker.check("worker")
        trainer.check()
        require_size(trainer.val_generations_to_log, "trainer.val_generations_to_log", minimum=0)
        self.self_reward.check()
        world = trainer.world_size
        require_size(data.rollout_batch_size, "data.rollout_batch_size")
        require_size(data.val_batch_size, "data.val_batch_size", sentinel=(-1, "the whole validation set"))
        require_size(data.max_prompt_length, "data.max_prompt_length")
        require_size(data.max_response_length, "data.max_response_length")
        check_pixel_bounds(data.min_pixels, data.max_pixels, "data")
        require(
            data.rollout_batch_size % actor.global_batch_size == 0,
            "data.rollout_batch_size",
            f"must be a multiple of worker.actor.global_batch_size ({data.rollout_batch_size} % "
            f"{actor.global_batch_size} != 0)",
        )
        per_device = actor.global_batch_size * rollout.n
        require(
            per_device % world == 0,
            "worker.actor.global_batch_size",
            f"global_batch_size x rollout.n ({per_device}) must divide evenly over {world} devices",
        )
        require(
            (per_device // world) % actor.micro_batch_size_per_device_for_update == 0,
            "worker.actor.micro_batch_size_per_device_for_update",
            f"must divide the per-device update batch global_batch_size x n / devices = {per_device // world}",
        )
        require(
            world % rollout.tensor_parallel_size == 0,
            "worker.rollout.tensor_parallel_size",
            f"must divide the number of workers nnodes x n_gpus_per_node = {world} (each group of "
            f"{rollout.tensor_parallel_size} consecutive workers shares one engine)",
        )
        for role, fsdp in (("actor", actor.fsdp), ("ref", self.worker.ref.fsdp)):
            # Checked again when the device mesh is built, but only once the workers have started.
            require(
                fsdp.fsdp_size <= 0 or fsdp.fsdp_size >= world or world % fsdp.fsdp_size == 0,
                f"worker.{role}.fsdp.fsdp_size",
                f"({fsdp.fsdp_size}) must divide the number of workers nnodes x n_gpus_per_node = {world}",
            )
        self._check_algorithm()
        if data.format_prompt is not None:
            require(os.path.isfile(data.format_prompt), "data.format_prompt", f"file not found: {data.format_prompt}")

    def _check_algorithm(self) -> None:
        algo, rollout = self.algorithm, self.worker.rollout
        require_choice(algo.adv_estimator, sorted(ADV_ESTIMATORS), "algorithm.adv_estimator")
        require(
            algo.adv_estimator not in ("grpo", "dr_grpo", "rloo") or rollout.n > 1,
            "worker.rollout.n",
            f"must be > 1 for the group-based estimator {algo.adv_estimator}",
        )
        require_choice(algo.advantage_mode, ADVANTAGE_MODES, "algorithm.advantage_mode")
        if algo.advantage_mode == "decoupled":
            require(
                len(algo.decoupled_weights) > 0,
                "algorithm.decoupled_weights",
                "advantage_mode=decoupled needs at least one component weight, e.g. {accuracy: 0.9, format: 0.1}",
            )
        require_choice(algo.kl_penalty, KL_MODES, "algorithm.kl_penalty")
        require_choice(algo.kl_type, KL_CONTROLLERS, "algorithm.kl_type")
        kl_on = not algo.disable_kl
        require(
            not (kl_on and algo.kl_penalty == "full" and not algo.use_kl_loss),
            "algorithm.kl_penalty",
            "full needs whole distributions, which only the actor update has: use it with algorithm.use_kl_loss=true "
            "(the reward penalty sees only the sampled tokens' log-probs)",
        )
        require(
            not (kl_on and algo.kl_type == "adaptive" and algo.use_kl_loss),
            "algorithm.kl_type",
            "adaptive steers the KL penalty in the reward and would be ignored with algorithm.use_kl_loss=true "
            "(set use_kl_loss=false, or kl_type=fixed)",
        )
        require_size(algo.max_refills, "algorithm.max_refills", minimum=0)
        if kl_on and algo.kl_type == "adaptive":
            # The controller divides by both; it is built only after the models load.
            require(algo.kl_target > 0, "algorithm.kl_target", f"must be positive; got {algo.kl_target}")
            require(algo.kl_horizon > 0, "algorithm.kl_horizon", f"must be positive; got {algo.kl_horizon}")


def check_pixel_bounds(min_pixels: int | None, max_pixels: int | None, prefix: str) -> None:
    """Image pixel bounds (RL and SFT data): each positive or null, and min not above max (the
    resize could then satisfy only one of them)."""
    require_size(min_pixels, f"{prefix}.min_pixels", null="no bound")
    require_size(max_pixels, f"{prefix}.max_pixels", null="no bound")
    require(
        min_pixels is None or max_pixels is None or min_pixels <= max_pixels,
        f"{prefix}.min_pixels",
        f"({min_pixels}) must not exceed {prefix}.max_pixels ({max_pixels})",
    )


def reward_keys_rule(config: PPOConfig, reward_keys: set[str]) -> None:
    """The keys that name reward components (decoupled weights, the dynamic-sampling filter) must be
    keys the reward function returns; checked on a probe call before any model loads."""
    algo = config.algorithm
    if algo.advantage_mode == "decoupled":
        unknown = sorted(set(algo.decoupled_weights) - reward_keys)
        require(
            not unknown,
            "algorithm.decoupled_weights",
            f"{unknown} are not keys the reward function returns (it returns {sorted(reward_keys)})",
        )
    if algo.online_filtering:
        require(
            algo.filter_key in reward_keys,
            "algorithm.filter_key",
            f"{algo.filter_key!r} is not a key the reward function returns (it returns {sorted(reward_keys)})",
        )


# --- configs written for EasyR1 or the original Vision-SR1 ---------------------------------------
def _falsy(value: object, source: object) -> bool:
    return not value


def _filter_window_edge(default: float) -> Callable[[object, object], bool]:
    def accepts(value: object, config: object) -> bool:
        from omegaconf import OmegaConf

        return not OmegaConf.select(config, "algorithm.online_filtering", default=False) or value == default

    return accepts


def _val_override(value: object) -> dict[str, object]:
    names = {"temperature": "val_temperature", "top_p": "val_top_p", "n": "val_n"}
    return {f"worker.rollout.{names[k]}": v for k, v in dict(value).items()}  # type: ignore[call-overload]


def _val_override_known(value: object, source: object) -> bool:
    return isinstance(value, dict) and set(value) <= {"temperature", "top_p", "n"}


def _cpu_offload(prefix: str, optimizer: bool) -> ForeignKey:
    def to(value: object) -> dict[str, object]:
        if not value:
            return {}
        keys = {f"{prefix}.offload.offload_params": True}
        if optimizer:
            keys[f"{prefix}.offload.offload_optimizer"] = True
        return keys

    return ForeignKey(
        f"true keeps the parameters{' and optimizer states' if optimizer else ''} on CPU outside compute: "
        f"sets `{prefix}.offload.offload_params`{' and `offload_optimizer`' if optimizer else ''} (false: no effect)",
        to=to,
        wins=True,
    )


_RANK0_INIT = (
    "every rank reads the checkpoint itself, then FSDP shards it: the same weights (more host memory "
    "while loading a large model)"
)
_SEQUENCE_PARALLEL = no_op(
    "1 (no sequence parallelism) is what this code does; sequence parallelism is not available "
    "(long sequences: worker.actor.model.enable_gradient_checkpointing and a smaller micro batch)",
    accepts=lambda value, source: value in (1, None),
)

FOREIGN_KEYS: dict[str, ForeignKey] = {
    # EasyR1 examples/config.yaml
    "data.video_key": no_op(
        "video inputs are not available: the column is not read (rows are trained on their text and images)"
    ),
    "data.video_fps": no_op("video inputs are not available: not read"),
    "data.mini_rollout_batch_size": no_op(
        "null (generate the whole rollout batch at once) is what this code does; smaller generation chunks: "
        "worker.rollout.micro_batch_size (hf engine) or worker.rollout.max_num_batched_tokens (vllm)",
        accepts=_falsy,
    ),
    "data.max_input_length": no_op("unused by the original Vision-SR1 too; the limit is data.max_prompt_length"),
    "algorithm.filter_low": no_op(
        "dynamic sampling keeps the groups whose `filter_key` scores are not all equal; for 0/1 scores (groups "
        "under 100 samples) that is the default (0.01, 0.99) window; other windows are not available",
        accepts=_filter_window_edge(0.01),
    ),
    "algorithm.filter_high": no_op(
        "see algorithm.filter_low: only the default 0.99 (or online_filtering off)",
        accepts=_filter_window_edge(0.99),
    ),
    "worker.actor.ulysses_size": _SEQUENCE_PARALLEL,
    "worker.actor.ulysses_sequence_parallel_size": _SEQUENCE_PARALLEL,
    "worker.actor.fsdp.enable_cpu_offload": _cpu_offload("worker.actor", optimizer=True),
    "worker.ref.fsdp.enable_cpu_offload": _cpu_offload("worker.ref", optimizer=False),
    "worker.actor.fsdp.enable_rank0_init": no_op(_RANK0_INIT),
    "worker.ref.fsdp.enable_rank0_init": no_op(_RANK0_INIT),
    "worker.rollout.val_override_config": ForeignKey(
        "validation sampling: temperature, top_p and n set worker.rollout.val_temperature, val_top_p and val_n "
        "(other keys are not available)",
        to=_val_override,
        accepts=_val_override_known,
    ),
    "trainer.max_try_make_batch": ForeignKey(
        "dynamic sampling's generation batches per step: sets algorithm.max_refills to this minus 1 (when the "
        "last one still lacks groups, the step trains on those kept instead of stopping); no limit (<= 0) is "
        "not available",
        to=lambda value: {"algorithm.max_refills": int(value) - 1},  # type: ignore[call-overload]
        accepts=lambda value, source: isinstance(value, int) and value > 0,
    ),
    "trainer.save_model_only": no_op(
        "false (checkpoints hold the optimizer, to resume) is what this code does; the model alone: "
        "scripts/model_merger.py on a checkpoint, and trainer.save_limit to bound the disk used",
        accepts=_falsy,
    ),
}
