"""The worker layer's configs: model, optimizer, FSDP, offload, actor, rollout, reference, reward.

The RL trainer's config composes them under `worker.*` (verl/trainer/config.py) and the SFT
trainer's under `model.*` and `optim.*` (verl/trainer/sft_config.py); the workers receive only
these. Each class checks its own keys (`check(prefix)`) against the registries the code
dispatches on, so a value the code cannot run fails at load, naming the key and the choices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from verl.algorithms.core_algos import LOSS_AGG_MODES, POLICY_LOSSES
from verl.models.families import FamilyPathError, ModelFamily, family_of_path
from verl.models.loading import ATTN_IMPLEMENTATIONS, DTYPES
from verl.reward.function import BAD_SAMPLE_POLICIES, REWARD_TYPES
from verl.utils.config import ConfigError, require, require_choice, require_size
from verl.workers.optimizer import LR_SCHEDULES, OPTIMIZERS
from verl.workers.rollout import ROLLOUT_ENGINES


@dataclass
class LoRAConfig:
    """Low-rank adapters (peft) on the language model; the base weights stay frozen (EasyR1's names)."""

    rank: int = 0
    """Adapter rank; 0 turns LoRA off (full fine-tuning)."""
    alpha: float = 16.0
    """Scale numerator: each adapter adds (alpha / rank) * B @ A to its layer's weight."""
    dropout: float = 0.0
    """Dropout on the adapters' inputs while training."""
    target_modules: str = "all-linear"
    """Layers that get adapters: all-linear (every linear layer except the output head), or a regex
    matched in full against module names (peft's `target_modules`)."""
    exclude_modules: str | None = ".*visual.*"
    """Regex of module names kept without adapters (peft's `exclude_modules`, matched in full); the
    default leaves out Qwen-VL's vision tower and its projector (`model.visual.*`); null excludes nothing."""
    adapter_path: str | None = None
    """Start from a saved adapter: a checkpoint's actor folder (RL or SFT) or any peft adapter folder
    (adapter_config.json + adapter_model.safetensors) made for this base model, rank and alpha. The RL
    reference policy stays `model_path` without adapters; for the adapted model as reference (e.g. a
    LoRA cold start), merge it first (scripts/model_merger.py) and use the merged folder as model_path."""

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def check(self, prefix: str) -> None:
        require_size(self.rank, f"{prefix}.rank", sentinel=(0, "LoRA off"))
        require(self.alpha > 0, f"{prefix}.alpha", "must be positive")
        require(0 <= self.dropout < 1, f"{prefix}.dropout", "must be in [0, 1)")
        require(bool(self.target_modules), f"{prefix}.target_modules", "must name the layers to adapt")
        if self.adapter_path is not None:
            require(self.enabled, f"{prefix}.adapter_path", f"needs {prefix}.rank > 0")
            require(
                os.path.isfile(os.path.join(self.adapter_path, "adapter_config.json")),
                f"{prefix}.adapter_path",
                f"{self.adapter_path} holds no adapter_config.json (expected a LoRA checkpoint or peft adapter folder)",
            )


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
    """Keep the vision encoder's weights fixed (RL: the whole encoder, its projector included, as in EasyR1)."""
    attn_implementation: str = "auto"
    """auto (flash_attention_2 when installed on GPU, else sdpa), sdpa, eager or flash_attention_2."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA training (rank > 0): only the adapters train; the RL reference policy is the same model with
    its adapters switched off."""

    def check(self, prefix: str) -> None:
        require_choice(self.attn_implementation, ATTN_IMPLEMENTATIONS, f"{prefix}.attn_implementation")
        require(
            not os.path.isfile(os.path.join(self.model_path, "adapter_config.json")),
            f"{prefix}.model_path",
            f"{self.model_path} is a LoRA checkpoint (an adapter, no full weights): set model_path to its base model and "
            f"{prefix}.lora.adapter_path to this folder, or merge it first (scripts/model_merger.py)",
        )
        self.lora.check(f"{prefix}.lora")


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

    def check(self, prefix: str) -> None:
        require(self.lr >= 0, f"{prefix}.lr", "must be >= 0")
        require_choice(self.strategy, OPTIMIZERS, f"{prefix}.strategy")
        require_choice(self.lr_scheduler_type, LR_SCHEDULES, f"{prefix}.lr_scheduler_type")
        require(0 <= self.lr_warmup_ratio <= 1, f"{prefix}.lr_warmup_ratio", "must be in [0, 1]")
        require(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", "must be in [0, 1]")
        require_size(self.lr_warmup_steps, f"{prefix}.lr_warmup_steps", minimum=0, sentinel=(-1, "use lr_warmup_ratio"))


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

    def check(self, prefix: str) -> None:
        require_size(self.fsdp_size, f"{prefix}.fsdp_size", sentinel=(-1, "shard over all ranks"))
        if self.torch_dtype is not None:
            require_choice(self.torch_dtype, DTYPES, f"{prefix}.torch_dtype")
        require_choice(self.mp_param_dtype, DTYPES, f"{prefix}.mp_param_dtype")


@dataclass
class OffloadConfig:
    offload_params: bool = False
    """Keep parameters on CPU between stages."""
    offload_optimizer: bool = False
    """Keep optimizer states on CPU between stages."""
    offload_during_generation: bool = False
    """GPU only: while the rollout engine generates, these weights (the actor's with its gradients and optimizer states) wait on CPU, so the engine's KV cache gets their memory; back when a stage needs them. The actor's key is ignored with the hf engine (it generates with the actor's own module)."""


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
    policy_loss: str = "ppo"
    """ppo (token-level ratio) or gspo (sequence-level ratio; use small clip ratios, e.g. 3e-4 / 4e-4)."""
    loss_agg_mode: str = "token-mean"
    """token-mean, seq-mean-token-sum, seq-mean-token-mean or seq-mean-token-sum-norm."""
    entropy_coeff: float = 0.0
    """Entropy bonus weight (entropy is always reported)."""
    use_torch_compile: bool = False
    logprob_chunk_size: int = 256
    """Response tokens per chunk of the LM head when computing log-probs and entropy (old, ref and
    update): the full-vocabulary fp32 logits of a micro-batch are never built, so memory stays flat
    in the response length. 0: the plain full-logits path. algorithm.kl_penalty=full always takes
    the full-logits path in the update (its KL needs whole distributions)."""
    skip_old_log_prob_when_on_policy: bool = True
    """When the old policy is the current one (ppo_epochs=1 and global_batch_size equal to
    data.rollout_batch_size: one optimizer step per rollout batch), skip the separate old-log-prob
    pass and use the detached log-probs of the update's own forward (ratio exactly 1). Falls back to
    the separate pass when something before the update needs old log-probs (the KL penalty in the
    reward: algorithm.use_kl_loss=false with KL on)."""
    padding_free: bool = False
    """Pack each micro-batch's real tokens into one sequence with no padding (old/ref log-probs and
    update); the values and the gradient are those of the padded path. Pays off with
    model.attn_implementation=flash_attention_2 (variable-length kernels on GPU); with sdpa or eager
    the rows share one block-diagonal mask whose cost grows with the square of the micro-batch's
    token count, so keep it off there or bound micro-batches by dynamic_batching. Refused at config
    load for Qwen3.5, whose delta-net layers would carry state across packed rows."""
    shared_prompt: bool | None = None
    """Encode each GRPO group's prompt (vision tower included) once per micro-batch and run its
    responses against the prompt's key/value cache, in the old/ref log-prob passes and in the
    update (the update only without gradient checkpointing, which drops caches, and not for Qwen3.5,
    whose cache updates its delta-net state in place where autograd cannot follow). Values and
    gradients equal the plain path's. Costs a key/value cache of rows x (prompt + response) tokens
    for every layer. Not together with padding_free. null (default): on unless padding_free is.
    Groups are kept whole across workers and micro-batches: micro-batches hold as many whole groups
    as fit (a group larger than the micro-batch size or token budget runs alone), and the workers
    each get whole groups when global_batch_size is a multiple of the number of workers (else the
    groups are cut into equal pieces, with a warning); perf/prompt_forwards_per_group shows it."""
    dynamic_batching: bool = False
    """Form micro-batches (old/ref log-probs and update) by a token budget per device,
    `max_token_len_per_gpu`, instead of a fixed row count; consecutive rows, so the results and the
    gradient are those of the fixed-size path."""
    max_token_len_per_gpu: int = 16384
    """dynamic_batching: the most real (unpadded) prompt + response tokens per micro-batch per device;
    a longer row runs alone."""
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    # Filled from `algorithm` by PPOConfig.__post_init__ so workers need only their own section.
    use_kl_loss: bool = field(default=True, metadata={"derived": True})
    kl_penalty: str = field(default="low_var_kl", metadata={"derived": True})
    kl_coef: float = field(default=1e-2, metadata={"derived": True})

    @property
    def shares_prompts(self) -> bool:
        """Whether forwards run each group's prompt once (`shared_prompt`, resolved)."""
        return self.shared_prompt if self.shared_prompt is not None else not self.padding_free

    def check(self, prefix: str) -> None:
        # Checked here, before the trainer's divisibility rules divide by it (0: ZeroDivisionError;
        # negative: a split into no parts only after a whole rollout).
        require_size(self.global_batch_size, f"{prefix}.global_batch_size")
        require_size(self.ppo_epochs, f"{prefix}.ppo_epochs")
        require(self.max_grad_norm > 0, f"{prefix}.max_grad_norm", "must be positive")
        require_size(self.micro_batch_size_per_device_for_update, f"{prefix}.micro_batch_size_per_device_for_update")
        require_size(
            self.micro_batch_size_per_device_for_experience, f"{prefix}.micro_batch_size_per_device_for_experience"
        )
        require_size(self.logprob_chunk_size, f"{prefix}.logprob_chunk_size", sentinel=(0, "full logits"))
        require_size(self.max_token_len_per_gpu, f"{prefix}.max_token_len_per_gpu")
        require(
            not (self.shared_prompt is True and self.padding_free),
            f"{prefix}.shared_prompt",
            f"cannot be combined with {prefix}.padding_free yet; turn one of them off",
        )
        require(0 <= self.clip_ratio_low < 1, f"{prefix}.clip_ratio_low", "must be in [0, 1)")
        require(self.clip_ratio_high >= 0, f"{prefix}.clip_ratio_high", "must be >= 0")
        require_choice(self.policy_loss, POLICY_LOSSES, f"{prefix}.policy_loss")
        require_choice(self.loss_agg_mode, LOSS_AGG_MODES, f"{prefix}.loss_agg_mode")
        self.model.check(f"{prefix}.model")
        require(
            not (self.model.lora.enabled and self.use_kl_loss and self.kl_penalty == "full"),
            "algorithm.kl_penalty",
            "full (a second forward inside the update) is not available with LoRA "
            f"({prefix}.model.lora.rank > 0); use low_var_kl, kl, abs or mse",
        )
        self.optim.check(f"{prefix}.optim")
        self.fsdp.check(f"{prefix}.fsdp")

    def check_family(self, prefix: str) -> ModelFamily:
        """The check that reads the model's config.json (never its weights): the model's family
        (verl/models/families/) takes every path this config turns on. Returns the family; raises
        ConfigError naming the family and the key (`{prefix}.padding_free`, ...)."""
        model_key = f"{prefix}.model.model_path"
        try:
            family = family_of_path(self.model.model_path, self.model.trust_remote_code)
        except FamilyPathError as exc:  # a vision-language model no family describes
            raise ConfigError(f"config key `{model_key}`: {exc}") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config key `{model_key}`: cannot read the model's config.json: {exc}") from None
        try:
            # The reference pass runs with the actor's config, so these keys cover it too.
            family.check_paths(key_prefix=prefix, padding_free=self.padding_free, shared_prompt=self.shares_prompts)
        except FamilyPathError as exc:
            raise ConfigError(str(exc)) from None
        return family


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
    """vllm: workers per engine. >1: each group of that many consecutive workers runs one engine together (SPMD, vLLM's external launcher) and samples the same prompts; must divide the number of workers."""
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

    def check(self, prefix: str) -> None:
        require_choice(self.name, sorted(ROLLOUT_ENGINES), f"{prefix}.name")
        require_size(self.n, f"{prefix}.n")
        require_size(self.val_n, f"{prefix}.val_n")
        require(self.temperature >= 0, f"{prefix}.temperature", "must be >= 0 (0 is greedy)")
        require(0 < self.top_p <= 1, f"{prefix}.top_p", "must be in (0, 1]")
        require(self.val_temperature >= 0, f"{prefix}.val_temperature", "must be >= 0 (0 is greedy)")
        require(0 < self.val_top_p <= 1, f"{prefix}.val_top_p", "must be in (0, 1]")
        require_size(self.top_k, f"{prefix}.top_k", sentinel=(-1, "no top-k"))
        require_size(self.micro_batch_size, f"{prefix}.micro_batch_size")
        require_size(self.tensor_parallel_size, f"{prefix}.tensor_parallel_size")
        require_size(self.max_num_batched_tokens, f"{prefix}.max_num_batched_tokens")
        require_size(self.max_model_len, f"{prefix}.max_model_len", null="prompt + response length")
        require_size(self.limit_images, f"{prefix}.limit_images", sentinel=(0, "as many as the data holds"))
        require(
            self.tensor_parallel_size == 1 or self.name == "vllm",
            f"{prefix}.tensor_parallel_size",
            f"only the vllm engine shards a model over workers; {prefix}.name={self.name} needs 1",
        )
        require(0 < self.gpu_memory_utilization <= 1, f"{prefix}.gpu_memory_utilization", "must be in (0, 1]")


@dataclass
class RefConfig:
    micro_batch_size_per_device_for_experience: int = 16
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)

    def check(self, prefix: str) -> None:
        require_size(
            self.micro_batch_size_per_device_for_experience, f"{prefix}.micro_batch_size_per_device_for_experience"
        )
        self.fsdp.check(f"{prefix}.fsdp")


@dataclass
class RewardConfig:
    reward_type: str | None = None
    """batch: one call with every response; sequential: one call per response; null: the file's `REWARD_TYPE` constant, else batch."""
    reward_function: str = "examples/reward_function/digit_sum.py:compute_score"
    """`path/to/file.py:function_name`."""
    reward_function_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments passed to the reward function."""
    skip_special_tokens: bool = True
    on_bad_sample: str = "error"
    """A sample whose reward fails (the function raises on it, or returns a non-finite or
    non-numeric value): `error` stops the run naming the sample (row index, uid, question, value);
    `drop_group` leaves a training sample's whole group out of the step (counted in
    `reward/dropped_groups`) and a validation sample out of the validation metrics (counted in
    `val/dropped_bad_samples`). Never trained on either way."""

    def check(self, prefix: str) -> None:
        require_choice(self.on_bad_sample, BAD_SAMPLE_POLICIES, f"{prefix}.on_bad_sample")
        require(
            ":" in self.reward_function, f"{prefix}.reward_function", "must look like path/to/file.py:function_name"
        )
        if self.reward_type is not None:
            require_choice(self.reward_type, REWARD_TYPES, f"{prefix}.reward_type")


@dataclass
class WorkerConfig:
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ref: RefConfig = field(default_factory=RefConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    val_reward: RewardConfig | None = None
    """The reward scoring validation (e.g. accuracy only, as the original Vision-SR1's validation.py); null: `reward`."""

    def check(self, prefix: str = "worker") -> None:
        self.actor.check(f"{prefix}.actor")
        self.rollout.check(f"{prefix}.rollout")
        self.ref.check(f"{prefix}.ref")
        self.reward.check(f"{prefix}.reward")
        if self.val_reward is not None:
            self.val_reward.check(f"{prefix}.val_reward")


# --- the SFT worker ------------------------------------------------------------------------------
@dataclass
class SFTModelConfig(ModelConfig):
    torch_dtype: str = "fp32"
    """Parameter (and optimizer-state) dtype: fp32 or bf16."""
    freeze_vision_tower: bool = True
    """Keep the vision encoder (patch embedding and blocks) fixed, as the original cold start did."""
    freeze_projector: bool = True
    """Keep the vision-to-language projectors fixed (Qwen-VL's patch merger; Qwen3-VL's deepstack
    mergers too), as the original cold start did."""

    def check(self, prefix: str) -> None:
        super().check(prefix)
        require_choice(self.torch_dtype, ("fp32", "bf16"), f"{prefix}.torch_dtype")


@dataclass
class SFTOptimConfig(OptimConfig):
    lr: float = 1e-5
    weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"
    """constant, warmup (linear warm-up then constant) or cosine (after the warm-up)."""
    lr_warmup_ratio: float = 0.1
    """Fraction of training steps used for warm-up (ignored when `lr_warmup_steps` >= 0)."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this global norm; a step with a non-finite norm is skipped."""
