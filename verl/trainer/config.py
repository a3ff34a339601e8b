"""Every configuration of a training run, as nested dataclasses.

`examples/config.yaml` mirrors these classes. Values merge as defaults < YAML file < command line
(`key.sub=value`), see `load_config`. Unknown keys and wrong types fail in the merge, batch-size
rules in `PPOConfig.validate`; both happen before any model is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value or combination is invalid; the message names the key and the rule."""


def require(condition: bool, key: str, rule: str) -> None:
    """Raise ConfigError naming `key` and the `rule` it breaks unless `condition` holds."""
    if not condition:
        raise ConfigError(f"config key `{key}`: {rule}")


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
    """Images smaller than this many pixels are upscaled."""
    max_pixels: int | None = 4194304
    """Images larger than this many pixels are downscaled."""
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
class ModelConfig:
    model_path: str = "tiny_world/models/qwen2_5_vl"
    """HF folder or our checkpoint folder of the policy model."""
    tokenizer_path: str | None = None
    """Defaults to `model_path`."""
    trust_remote_code: bool = False
    enable_gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    freeze_vision_tower: bool = False
    """Keep the vision encoder's weights fixed."""
    attn_implementation: str = "auto"
    """auto (flash_attention_2 when installed on GPU, else sdpa), sdpa, eager or flash_attention_2."""


@dataclass
class OptimConfig:
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    strategy: str = "adamw"
    """adamw, or adamw_bf16 (bf16 optimizer states, less memory)."""
    lr_scheduler_type: str = "constant"
    """constant, warmup (linear warm-up then constant) or cosine."""
    lr_warmup_ratio: float = 0.0
    """Fraction of training steps used for warm-up (ignored when `lr_warmup_steps` >= 0)."""
    lr_warmup_steps: int = -1
    min_lr_ratio: float = 0.0
    """Cosine schedule: final lr as a fraction of `lr`."""
    training_steps: int = -1
    """Set by the trainer from the data size and epochs; do not set by hand."""


@dataclass
class FSDPConfig:
    enable_full_shard: bool = True
    """Shard parameters (True) or only gradients and optimizer states."""
    fsdp_size: int = -1
    """Ranks per shard group for hybrid sharding; -1 shards over all ranks."""
    torch_dtype: str | None = None
    """Parameter dtype: fp32 or bf16 (None: fp32 for the actor, bf16 for ref on GPU)."""
    mp_param_dtype: str = "bf16"
    """Mixed-precision compute dtype on GPU (CPU always computes in fp32)."""


@dataclass
class OffloadConfig:
    offload_params: bool = False
    """Keep parameters on CPU between stages."""
    offload_optimizer: bool = False
    """Keep optimizer states on CPU between stages."""


@dataclass
class ActorConfig:
    global_batch_size: int = 16
    """Prompts per optimizer step (x rollout.n responses); rollout_batch_size must be a multiple."""
    micro_batch_size_per_device_for_update: int = 8
    """Responses per forward/backward; gradients accumulate over micro-batches."""
    micro_batch_size_per_device_for_experience: int = 16
    """Responses per no-grad forward when computing old/ref log-probs."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    max_grad_norm: float = 1.0
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.3
    """Clip-higher: the upper clip range may differ from the lower one."""
    clip_ratio_dual: float = 3.0
    """Dual clip: bound on the loss for negative advantages (ratio c); <= 1 disables it."""
    loss_agg_mode: str = "token-mean"
    """token-mean, seq-mean-token-sum, seq-mean-token-mean or seq-mean-token-sum-norm."""
    entropy_coeff: float = 0.0
    """Entropy bonus weight (entropy is always reported)."""
    use_torch_compile: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    # Filled from `algorithm` by PPOConfig.__post_init__ so workers need only their own section.
    use_kl_loss: bool = field(default=True, metadata={"derived": True})
    kl_penalty: str = field(default="low_var_kl", metadata={"derived": True})
    kl_coef: float = field(default=1e-2, metadata={"derived": True})


@dataclass
class RolloutConfig:
    name: str = "hf"
    """Rollout engine: hf (transformers generate) or vllm."""
    n: int = 8
    """Samples per prompt (the GRPO group size)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 disables top-k."""
    seed: int = 1
    val_temperature: float = 0.0
    """Validation sampling temperature; 0 is greedy."""
    val_top_p: float = 1.0
    val_n: int = 1
    """Samples per validation prompt."""
    micro_batch_size: int = 64
    """hf engine: sequences generated at once."""
    tensor_parallel_size: int = 1
    """vllm: tensor-parallel size."""
    gpu_memory_utilization: float = 0.6
    """vllm: fraction of GPU memory for weights and KV cache."""
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    """vllm: defaults to max_prompt_length + max_response_length."""
    enforce_eager: bool = False
    enable_chunked_prefill: bool = False
    limit_images: int = 0
    """vllm: images per prompt (0: as many as the data holds)."""
    disable_tqdm: bool = True
    # Filled from `data` by PPOConfig.__post_init__.
    prompt_length: int = field(default=512, metadata={"derived": True})
    response_length: int = field(default=64, metadata={"derived": True})


@dataclass
class RefConfig:
    micro_batch_size_per_device_for_experience: int = 16
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)


@dataclass
class RewardConfig:
    reward_type: str = "batch"
    """batch: one call with every response; sequential: one call per response."""
    reward_function: str = "examples/reward_function/digit_sum.py:compute_score"
    """`path/to/file.py:function_name`."""
    reward_function_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments passed to the reward function."""
    skip_special_tokens: bool = True


@dataclass
class WorkerConfig:
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


@dataclass
class SelfRewardConfig:
    enable: str = "auto"
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


LOGGERS = ("console", "file", "wandb", "tensorboard")


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
    """Any of console, file, wandb, tensorboard."""
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
        require(self.backend in ("auto", "local", "ray"), "trainer.backend", "must be auto, local or ray")
        require(self.device in ("auto", "cpu", "cuda"), "trainer.device", "must be auto, cpu or cuda")
        require(self.nnodes > 0, "trainer.nnodes", "must be positive")
        require(self.n_gpus_per_node > 0, "trainer.n_gpus_per_node", "must be positive")
        require(
            self.backend != "local" or self.world_size == 1,
            "trainer.backend",
            f"local runs one worker; nnodes x n_gpus_per_node is {self.world_size} (use backend=ray)",
        )
        require(self.total_epochs > 0, "trainer.total_epochs", "must be positive")
        require(self.worker_setup_timeout_s > 0, "trainer.worker_setup_timeout_s", "must be positive")
        require(self.worker_call_timeout_s > 0, "trainer.worker_call_timeout_s", "must be positive")
        for name in self.logger:
            require(name in LOGGERS, "trainer.logger", f"unknown logger {name!r} ({', '.join(LOGGERS)})")


@dataclass
class TrainerConfig(RunConfig):
    val_only: bool = False
    """Only validate, writing generations to `<save_checkpoint_path>/generations_step_<N>.jsonl`."""
    val_generations_to_log: int = 4


@dataclass
class PPOConfig:
    data: DataConfig = field(default_factory=DataConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    self_reward: SelfRewardConfig = field(default_factory=SelfRewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        self.worker.actor.use_kl_loss = self.algorithm.use_kl_loss and not self.algorithm.disable_kl
        self.worker.actor.kl_penalty = self.algorithm.kl_penalty
        self.worker.actor.kl_coef = self.algorithm.kl_coef
        self.worker.rollout.prompt_length = self.data.max_prompt_length
        self.worker.rollout.response_length = self.data.max_response_length
        self.trainer.fill_derived()

    def validate(self) -> None:
        """Check rules that span keys; raises ConfigError naming the key and the rule."""
        data, actor, rollout, algo, trainer = (
            self.data,
            self.worker.actor,
            self.worker.rollout,
            self.algorithm,
            self.trainer,
        )
        world = trainer.world_size
        require(data.rollout_batch_size > 0, "data.rollout_batch_size", "must be positive")
        require(rollout.n >= 1, "worker.rollout.n", "must be at least 1")
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
            actor.micro_batch_size_per_device_for_experience > 0,
            "worker.actor.micro_batch_size_per_device_for_experience",
            "must be positive",
        )
        require(0 <= actor.clip_ratio_low < 1, "worker.actor.clip_ratio_low", "must be in [0, 1)")
        require(actor.clip_ratio_high >= 0, "worker.actor.clip_ratio_high", "must be >= 0")
        require(
            actor.loss_agg_mode
            in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
            "worker.actor.loss_agg_mode",
            "must be one of token-mean, seq-mean-token-sum, seq-mean-token-mean, seq-mean-token-sum-norm",
        )
        require(
            actor.optim.strategy in ("adamw", "adamw_bf16"),
            "worker.actor.optim.strategy",
            "must be adamw or adamw_bf16",
        )
        require(
            actor.optim.lr_scheduler_type in ("constant", "warmup", "cosine"),
            "worker.actor.optim.lr_scheduler_type",
            "must be constant, warmup or cosine",
        )
        require(algo.kl_type in ("fixed", "adaptive"), "algorithm.kl_type", "must be fixed or adaptive")
        require(
            algo.kl_penalty in ("kl", "abs", "mse", "low_var_kl", "full"),
            "algorithm.kl_penalty",
            "must be one of kl, abs, mse, low_var_kl, full",
        )
        require(
            algo.advantage_mode in ("summed", "decoupled"), "algorithm.advantage_mode", "must be summed or decoupled"
        )
        require(
            algo.adv_estimator not in ("grpo", "dr_grpo", "rloo") or rollout.n > 1,
            "worker.rollout.n",
            f"must be > 1 for the group-based estimator {algo.adv_estimator}",
        )
        trainer.check()
        require(
            self.self_reward.enable in ("auto", "true", "false"),
            "self_reward.enable",
            "must be auto, true or false",
        )
        require(
            ":" in self.worker.reward.reward_function,
            "worker.reward.reward_function",
            "must look like path/to/file.py:function_name",
        )
        require(
            self.worker.reward.reward_type in ("batch", "sequential"),
            "worker.reward.reward_type",
            "must be batch or sequential",
        )
        if data.format_prompt is not None:
            require(os.path.isfile(data.format_prompt), "data.format_prompt", f"file not found: {data.format_prompt}")


def _derived_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        if f.metadata.get("derived"):
            keys.append(prefix + f.name)
        default = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_derived_keys(type(default), prefix + f.name + "."))
    return keys


def _merge(schema_cls: type, sources: list[tuple[str, Any]]) -> Any:
    base = OmegaConf.structured(schema_cls)
    for origin, source in sources:
        try:
            base = OmegaConf.merge(base, source)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or "?"
            reason = str(exc).splitlines()[0]
            raise ConfigError(f"config key `{key}` from {origin}: {reason}") from None
    return base


def load_config(argv: list[str], schema_cls: type = PPOConfig) -> Any:
    """Build a config from `config=FILE` and `key=value` arguments (defaults < file < command line)."""
    file_args = [a for a in argv if a.startswith("config=")]
    overrides = [a for a in argv if not a.startswith("config=")]
    for arg in overrides:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r}: expected key=value or config=FILE")
    derived = set(_derived_keys(schema_cls))
    sources: list[tuple[str, Any]] = []
    for arg in file_args:
        path = arg.split("=", 1)[1]
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        sources.append((path, OmegaConf.load(path)))
    cli = OmegaConf.from_dotlist(overrides)
    sources.append(("the command line", cli))
    for origin, source in sources:
        for key in derived:
            if OmegaConf.select(source, key, default=None) is not None:
                raise ConfigError(f"config key `{key}` from {origin}: derived from other keys; do not set it")
    merged = _merge(schema_cls, sources)
    config = OmegaConf.to_object(merged)
    if hasattr(config, "validate"):
        config.validate()
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for logging and saving beside checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)  # type: ignore[return-value]
