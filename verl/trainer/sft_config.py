"""Every configuration of a supervised fine-tuning (cold-start) run, as nested dataclasses.

`examples/sft_config.yaml` mirrors these classes. Values merge as defaults < YAML file < command line
(`key.sub=value`) through the same `load_config` as the RL trainer; `SFTConfig.validate` checks the
rules that span keys before any model is loaded.

Defaults: data and model paths point at the tiny world; hyperparameters follow the original
Vision-SR1 cold start (LLaMA-Factory, full SFT, vision tower and projector frozen, lr 1e-5, 3 epochs,
cosine with 10% warm-up, cutoff 4092 tokens, images of at most 262144 pixels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from verl.trainer.config import RunConfig, check_pixel_bounds
from verl.utils.config import require, require_size
from verl.workers.config import SFTModelConfig, SFTOptimConfig

COLD_START_DIR = "tiny_world/data/cold_start"


@dataclass
class SFTDataConfig:
    train_files: list[str] = field(
        default_factory=lambda: [
            f"{COLD_START_DIR}/seethink.json",
            f"{COLD_START_DIR}/think.json",
            f"{COLD_START_DIR}/text_only.json",
        ]
    )
    """Training files, mixed: each a sharegpt (`messages` or `conversations`, optional `images`) or alpaca (`instruction`, `input`, `output`) file (.json/.jsonl/.parquet, a folder of them, or `name@split`); the format is detected per file."""
    train_ratios: list[float] = field(default_factory=list)
    """Per-file share of each epoch, in the order of `train_files`: 1.0 takes every row once, 0.5 a fresh random half, 2.0 every row twice. Empty: 1.0 for every file."""
    val_files: list[str] = field(default_factory=lambda: [f"{COLD_START_DIR}/seethink_val.json"])
    """Held-out files (same formats) for the evaluation loss; empty: no evaluation loss."""
    image_dir: str | None = None
    """Folder that relative image paths are resolved against; None: the folder of the data file (LLaMA-Factory's `dataset_dir`)."""
    max_length: int = 4092
    """Examples with more tokens (image tokens included) are dropped and counted, never truncated."""
    min_pixels: int | None = 784
    """Images smaller than this many pixels are upscaled (qwen-vl-utils' smart_resize: sides become multiples of 28). None: no bound."""
    max_pixels: int | None = 262144
    """Images larger than this many pixels are downscaled (the original cold start's `image_max_pixels`). None: no bound."""
    batch_size: int = 128
    """Examples per optimizer step (the original: 8 per device x 2 accumulation steps x 8 GPUs)."""
    shuffle: bool = True
    """Shuffle the training examples each epoch (seeded by `seed`)."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding; batches are still visited in random order). Off as in the original: where subsets differ in length, batches would each hold one subset."""
    seed: int = 1
    """Seed of the data order and of the per-file sampling."""


@dataclass
class SFTEvalConfig:
    generation_files: str | None = "tiny_world/data/digit_sum/test.parquet"
    """Prompts for the greedy-generation check, in the RL data format (question, answer, images); None: no generation check."""
    prompt_key: str = "problem"
    """Column with the question text; `<image>` marks where each image goes."""
    answer_key: str = "answer"
    """Column with the ground-truth answer."""
    image_key: str = "images"
    """Column with the list of images."""
    format_prompt: str | None = "examples/format_prompt/see_think.jinja"
    """Jinja file rendering the user turn from `content` (the question), as in RL; a missing file is an error."""
    reward_function: str = "examples/reward_function/digit_sum.py:compute_score"
    """`path/to/file.py:function_name` scoring each greedy response; every score component is reported as `gen/<name>` (digit_sum: accuracy, format, perception)."""
    reward_function_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments passed to the reward function."""
    max_prompt_length: int = 4092
    """Longer prompts (image tokens included) are left out of the check."""
    max_new_tokens: int = 256
    """Generation length limit per response."""
    batch_size: int = 64
    """Prompts generated at once."""
    generations_to_log: int = 4
    """Sample generations sent to the loggers at each evaluation."""
    stop_at: dict[str, float] = field(default_factory=dict)
    """Stop training at the first evaluation (every `trainer.val_freq` steps) where every listed `gen/<component>` of the greedy check reaches its threshold, e.g. {gen/format: 0.9, gen/accuracy: 0.3}: a measured target instead of a step count, so runs on different machines stop at a comparable model; the step count (`trainer.max_steps` / `total_epochs`) stays the cap. Empty: train to the step count."""


@dataclass
class SFTTrainerConfig(RunConfig):
    experiment_name: str = "cold_start"
    total_epochs: int = 3
    val_before_train: bool = False
    micro_batch_size: int = 8
    """Examples per forward/backward on each worker; gradients accumulate over the micro-batches of its share of `data.batch_size`."""


@dataclass
class SFTConfig:
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    model: SFTModelConfig = field(default_factory=SFTModelConfig)
    optim: SFTOptimConfig = field(default_factory=SFTOptimConfig)
    eval: SFTEvalConfig = field(default_factory=SFTEvalConfig)
    trainer: SFTTrainerConfig = field(default_factory=SFTTrainerConfig)

    def __post_init__(self) -> None:
        self.trainer.fill_derived()

    def validate(self) -> None:
        """Check rules that span keys; raises ConfigError naming the key and the rule."""
        data, model, optim, evaluation, trainer = self.data, self.model, self.optim, self.eval, self.trainer
        require(len(data.train_files) > 0, "data.train_files", "needs at least one file")
        require(
            not data.train_ratios or len(data.train_ratios) == len(data.train_files),
            "data.train_ratios",
            f"has {len(data.train_ratios)} values for {len(data.train_files)} train_files (give one per file, or none)",
        )
        require(all(r > 0 for r in data.train_ratios), "data.train_ratios", "every ratio must be positive")
        require_size(data.batch_size, "data.batch_size")
        require_size(data.max_length, "data.max_length")
        check_pixel_bounds(data.min_pixels, data.max_pixels, "data")
        require_size(trainer.micro_batch_size, "trainer.micro_batch_size")
        require_size(evaluation.max_prompt_length, "eval.max_prompt_length")
        require_size(evaluation.max_new_tokens, "eval.max_new_tokens")
        require_size(evaluation.batch_size, "eval.batch_size")
        require_size(evaluation.generations_to_log, "eval.generations_to_log", minimum=0)
        model.check("model")
        optim.check("optim")
        require(optim.max_grad_norm > 0, "optim.max_grad_norm", "must be positive")
        trainer.check()
        require(
            data.batch_size % trainer.world_size == 0,
            "data.batch_size",
            f"({data.batch_size}) must divide evenly over the {trainer.world_size} workers "
            "(trainer.nnodes x trainer.n_gpus_per_node)",
        )
        if evaluation.stop_at:
            require(
                evaluation.generation_files is not None,
                "eval.stop_at",
                "needs the greedy-generation check (set eval.generation_files)",
            )
            require(
                trainer.val_freq > 0, "eval.stop_at", "needs trainer.val_freq > 0 (how often the target is checked)"
            )
            for key, threshold in evaluation.stop_at.items():
                require(
                    isinstance(key, str) and key.startswith("gen/"),
                    "eval.stop_at",
                    f"key {key!r} must name a generation-check metric, gen/<component> (e.g. gen/accuracy)",
                )
                require(
                    isinstance(threshold, (int, float)) and not isinstance(threshold, bool),
                    "eval.stop_at",
                    f"threshold of {key!r} must be a number, got {threshold!r}",
                )
        if evaluation.generation_files is not None:
            require(
                ":" in evaluation.reward_function,
                "eval.reward_function",
                "must look like path/to/file.py:function_name",
            )
            if evaluation.format_prompt is not None:
                require(
                    os.path.isfile(evaluation.format_prompt),
                    "eval.format_prompt",
                    f"file not found: {evaluation.format_prompt}",
                )
