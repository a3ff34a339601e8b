"""Cold-start supervised fine-tuning: `python -m verl.trainer.sft config=FILE key=value ...`.

`SFTWorker` holds the model, optimizer and lr schedule: one optimizer step per batch, a forward and
backward per micro-batch, cross-entropy on assistant tokens only, averaged over the batch's labeled
tokens. `SFTTrainer` runs the loop: batches from `SFTLoader`, evaluation (loss on held-out
conversations and a greedy-generation check scored by a reward function), and checkpoints in the RL
trainer's layout, so RL starts from one with `worker.actor.model.model_path=<...>/global_step_<N>/actor`:

    <save_checkpoint_path>/global_step_<N>/actor/              Hugging Face folder (weights, config,
                                                               generation config, tokenizer, processor)
                                                               plus training_state.pt
    <save_checkpoint_path>/global_step_<N>/eval_metrics.json   the evaluation at step N, when there was one
    <save_checkpoint_path>/global_step_<N>/trainer_state.json  written last: the checkpoint is complete
    <save_checkpoint_path>/generations_step_<N>.jsonl          every greedy generation of the check at step N

The trainer reaches the worker only through a worker group: `trainer.backend=local` hosts one in
this process (CPU or one GPU); `trainer.backend=ray` hosts one per device (`trainer.nnodes` x
`trainer.n_gpus_per_node`; CPU processes sharing the cores when there is no GPU), FSDP-sharded,
each taking an equal share of every batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from verl.models.loading import (
    load_model,
    load_tokenizer_and_processor,
    resolve_attn_implementation,
    resolve_dtype,
    vision_tower,
)
from verl.models.multimodal import batch_multimodal_inputs, reset_rope_cache
from verl.models.positions import compute_position_ids
from verl.protocol import DataProto
from verl.single_controller.dispatch import Dispatch, register
from verl.trainer.config import OptimConfig, to_dict
from verl.trainer.main import build_worker_group, run_cli
from verl.trainer.sft_config import SFTConfig, SFTModelConfig, SFTOptimConfig
from verl.utils.checkpoint import find_resume_checkpoint, save_and_prune, write_trainer_state
from verl.utils.dataset import PromptDataset, PromptDatasetConfig, PromptLoader
from verl.utils.sft_dataset import IGNORE_INDEX, ConversationEncoder, SFTDataset, SFTLoader
from verl.utils.timer import timer
from verl.utils.tracking import Tracker
from verl.workers import fsdp_utils
from verl.workers.fsdp_worker import build_lr_scheduler, resolve_device
from verl.workers.reward import RewardFunction, aggregate_reward_metrics
from verl.workers.rollout.base import SamplingParams
from verl.workers.rollout.hf_rollout import HFRollout

logger = logging.getLogger(__name__)

SHARDED_OPTIMIZER_DIR = "optimizer_sharded"
"""Sub-folder of a checkpoint written by several workers: their optimizer states (torch.distributed.checkpoint)."""


def freeze_vision_parts(model: torch.nn.Module, freeze_tower: bool, freeze_projector: bool) -> None:
    """Stop gradients into the vision encoder and/or its projector (Qwen-VL's `visual.merger`)."""
    visual = vision_tower(model)
    if visual is None:
        if freeze_tower or freeze_projector:
            logger.info("text-only model: no vision tower or projector to freeze")
        return
    projector = getattr(visual, "merger", None)
    if projector is None:
        raise ValueError(f"{type(visual).__name__} has no `merger` submodule; cannot tell the projector apart")
    if freeze_projector:
        projector.requires_grad_(False)
    if freeze_tower:
        for child in visual.children():
            if child is not projector:
                child.requires_grad_(False)


class SFTWorker:
    """The model step of SFT: owns the model, optimizer, lr schedule and a generation engine.

    The same class runs in-process (`trainer.backend=local`) and as one Ray actor per device
    (`ray`); with several workers (or on a GPU) the model is sharded with FSDP2, exactly as the RL
    worker's actor is (verl.workers.fsdp_utils).
    """

    def __init__(
        self,
        model_config: SFTModelConfig,
        optim_config: SFTOptimConfig,
        training_steps: int,
        micro_batch_size: int,
        generation_batch_size: int = 64,
        device: str = "auto",
        seed: int = 1,
    ) -> None:
        self.model_config = model_config
        self.optim_config = optim_config
        self.training_steps = training_steps
        self.micro_batch_size = micro_batch_size
        self.generation_batch_size = generation_batch_size
        self.device = resolve_device(device)
        self.seed = seed
        self.rank, self.world_size = fsdp_utils.init_distributed(self.device)
        self.sharded = dist.is_initialized()

    @register(Dispatch.ONE_TO_ALL)
    def init_model(self) -> dict[str, int]:
        cfg = self.model_config
        torch.manual_seed(self.seed)
        self.tokenizer, self.processor = load_tokenizer_and_processor(
            cfg.tokenizer_path or cfg.model_path, cfg.trust_remote_code
        )
        self.model = self._build_model()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        optim = self.optim_config
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay
        )
        schedule = OptimConfig(
            lr=optim.lr,
            lr_scheduler_type=optim.lr_scheduler_type,
            lr_warmup_ratio=optim.lr_warmup_ratio,
            lr_warmup_steps=optim.lr_warmup_steps,
            min_lr_ratio=optim.min_lr_ratio,
            training_steps=self.training_steps,
        )
        self.lr_scheduler = build_lr_scheduler(self.optimizer, schedule)
        self.rollout = HFRollout(self.model, self.tokenizer, micro_batch_size=self.generation_batch_size)
        return {
            # Sharded parameters report their full size.
            "params": sum(p.numel() for p in self.model.parameters()),
            "trainable_params": sum(p.numel() for p in self.trainable),
        }

    def _build_model(self) -> torch.nn.Module:
        cfg = self.model_config
        dtype = resolve_dtype(cfg.torch_dtype)
        attn = resolve_attn_implementation(cfg.attn_implementation, self.device)

        def prepare(model: torch.nn.Module) -> None:
            freeze_vision_parts(model, cfg.freeze_vision_tower, cfg.freeze_projector)
            if cfg.enable_gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        # Computes in the loaded dtype (model.torch_dtype); gradients are reduced in it too.
        return fsdp_utils.build_model(cfg.model_path, dtype, attn, cfg.trust_remote_code, self.device, prepare)

    # --- steps --------------------------------------------------------------------------------
    def _row_losses(self, micro: DataProto) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of a micro-batch: summed next-token cross-entropy over its labeled tokens, and
        their count."""
        input_ids = micro.batch["input_ids"].to(self.device)
        attention_mask = micro.batch["attention_mask"].to(self.device)
        multimodal = batch_multimodal_inputs(micro.non_tensor_batch["multi_modal_inputs"])
        multimodal = {key: value.to(self.device) for key, value in multimodal.items()}
        position_ids = compute_position_ids(self.model, input_ids, attention_mask, multimodal.get("image_grid_thw"))
        if position_ids.dim() == 3:  # (b, 3, L) -> Qwen-VL's (3, b, L)
            position_ids = position_ids.transpose(0, 1)
        reset_rope_cache(self.model)
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **multimodal,
        ).logits
        targets = micro.batch["labels"][:, 1:].to(self.device)
        labeled = targets != IGNORE_INDEX
        # Only labeled positions go to fp32: a full (rows, length, vocab) fp32 copy can be tens of GB.
        token_losses = F.cross_entropy(logits[:, :-1][labeled].float(), targets[labeled], reduction="none")
        row_of_token = labeled.nonzero()[:, 0]
        losses = torch.zeros(len(micro), device=token_losses.device).index_add(0, row_of_token, token_losses)
        return losses, labeled.sum(-1)

    @register(Dispatch.DP_COMPUTE)
    def train_step(self, batch: DataProto) -> DataProto:
        """One optimizer step on `batch` (this rank's share of it); the loss is the mean over all
        the batch's labeled tokens, on every rank together. Metrics in `meta_info["metrics"]`."""
        self.model.train()
        label_tokens = fsdp_utils.sum_across_ranks(float((batch.batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
        if label_tokens == 0:
            raise RuntimeError("train_step: the batch has no labeled (assistant) tokens")
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in batch.split(self.micro_batch_size):
            micro_loss = self._row_losses(micro)[0].sum()
            # Dividing by the whole batch's count makes the accumulated gradient the batch mean; data-
            # parallel reduction averages over ranks, so scale back up by their number.
            (micro_loss * (self.world_size / label_tokens)).backward()
            loss_sum += float(micro_loss.detach())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.optim_config.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        metrics = {
            "train/loss": fsdp_utils.sum_across_ranks(loss_sum) / label_tokens,
            "train/grad_norm": grad_norm,
            "train/lr": lr,
            "train/skipped_step": float(not finite),
            "train/label_tokens": label_tokens,
            "train/tokens": fsdp_utils.sum_across_ranks(float(batch.batch["attention_mask"].sum())),
        }
        return DataProto.from_dict(meta_info={"metrics": metrics})

    @register(Dispatch.DP_COMPUTE)
    @torch.no_grad()
    def eval_loss(self, batch: DataProto) -> DataProto:
        """`loss_sum` and `label_tokens` of every row of `batch` (sums, so any rows combine exactly)."""
        was_training = self.model.training
        self.model.eval()
        sums, counts = [], []
        try:
            for micro in batch.split(self.micro_batch_size):
                losses, tokens = self._row_losses(micro)
                sums.append(losses.cpu())
                counts.append(tokens.cpu())
        finally:
            self.model.train(was_training)
            if self.sharded:
                fsdp_utils.release_gathered(self.model)
        return DataProto.from_dict(
            tensors={"loss_sum": torch.cat(sums).double(), "label_tokens": torch.cat(counts).double()}
        )

    @register(Dispatch.DP_COMPUTE)
    def generate_sequences(self, prompts: DataProto) -> DataProto:
        """Sample with `prompts.meta_info["sampling"]` (a SamplingParams), as the RL worker does."""
        gathered = fsdp_utils.gathered_parameters(self.model, full_shard=True) if self.sharded else nullcontext()
        with gathered:
            return self.rollout.generate(prompts, prompts.meta_info["sampling"])

    # --- checkpoints -------------------------------------------------------------------------
    @register(Dispatch.ONE_TO_ALL)
    def save_checkpoint(self, path: str) -> None:
        """A Hugging Face folder (loadable as a model, however many workers trained it) plus the
        lr schedule and RNG in `training_state.pt`. The optimizer state goes there too from one
        worker; several write it sharded to `optimizer_sharded/`."""
        weights, optimizer_state = fsdp_utils.full_state(self.model, None if self.world_size > 1 else self.optimizer)
        if self.world_size > 1:
            fsdp_utils.save_sharded(
                os.path.join(path, SHARDED_OPTIMIZER_DIR), self.model, self.optimizer, weights=False
            )
        if self.rank != 0:
            return
        os.makedirs(path, exist_ok=True)
        # Hand over the gathered weights: a sharded model's own state dict holds only this rank's shards.
        self.model.save_pretrained(path, state_dict=weights if self.sharded else None, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        if self.processor is not None:
            self.processor.save_pretrained(path)
        fsdp_utils.write_training_state(path, optimizer_state, self.lr_scheduler)

    @register(Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, path: str) -> None:
        """Restore what `save_checkpoint` wrote, from any number of workers into any number."""
        state = fsdp_utils.read_training_state(path)
        sharded_optimizer = os.path.join(path, SHARDED_OPTIMIZER_DIR)
        weights = {}
        if self.rank == 0:  # rank 0 reads the folder and hands every rank its shards
            weights = load_model(path, next(self.model.parameters()).dtype, "sdpa").state_dict()
        if os.path.isdir(sharded_optimizer):
            fsdp_utils.load_full_state(self.model, None, weights, None)
            fsdp_utils.load_sharded(sharded_optimizer, self.model, self.optimizer, weights=False)
        else:
            fsdp_utils.load_full_state(
                self.model, self.optimizer, weights, state["optimizer"] if self.rank == 0 else {}
            )
        fsdp_utils.restore_schedule_and_rng(state, self.lr_scheduler)


class SFTTrainer:
    """The SFT loop: train steps, evaluation, checkpoints and resume, through a worker group."""

    def __init__(
        self,
        config: SFTConfig,
        tokenizer: Any,
        worker_group: Any,
        train_loader: SFTLoader,
        val_loader: SFTLoader | None = None,
        generation_loader: PromptLoader | None = None,
        reward_fn: RewardFunction | None = None,
    ) -> None:
        if (generation_loader is None) != (reward_fn is None):
            raise ValueError("SFTTrainer: the generation check needs both generation_loader and reward_fn")
        self.config = config
        self.tokenizer = tokenizer
        self.wg = worker_group
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.generation_loader = generation_loader
        self.reward_fn = reward_fn
        self.checkpoint_root = config.trainer.save_checkpoint_path
        self.global_step = 0
        self.total_steps = config.trainer.total_steps(len(train_loader))
        self.last_eval: tuple[int, dict[str, float]] | None = None

    def fit(self) -> dict[str, float]:
        """Train to `total_steps`, resuming from the latest checkpoint; returns the last step's metrics."""
        cfg = self.config.trainer
        self._resume()
        self.tracker = Tracker(
            cfg.logger,
            cfg.project_name,
            cfg.experiment_name,
            to_dict(self.config),
            self.checkpoint_root,
            resume=self.global_step > 0,
        )
        if cfg.val_before_train and self.global_step == 0:
            self.tracker.log(self.evaluate(), step=0)

        metrics: dict[str, float] = {}
        progress = tqdm(total=self.total_steps, initial=self.global_step, desc="SFT", disable=None)
        batches = self._endless_batches()
        while self.global_step < self.total_steps:
            timings: dict[str, float] = {}
            with timer("step", timings):
                with timer("data", timings):
                    batch = next(batches)
                self.global_step += 1
                with timer("update", timings):
                    # One optimizer step on exactly these rows: data-parallel ranks share them, never pad them.
                    batch.meta_info["mini_batch_size"] = len(batch)
                    metrics = self.wg.train_step(batch).meta_info["metrics"]
                is_last = self.global_step >= self.total_steps
                if (cfg.val_freq > 0 and self.global_step % cfg.val_freq == 0) or is_last:
                    with timer("evaluate", timings):
                        metrics.update(self.evaluate())
            loader = self.train_loader
            metrics["train/epoch"] = loader.epoch + loader.batches_done / len(loader)
            metrics.update({f"timing_s/{name}": seconds for name, seconds in timings.items()})
            metrics["perf/examples_per_s"] = len(batch) / timings["update"]
            self.tracker.log(metrics, step=self.global_step)
            # Saved after logging: a run killed once this checkpoint exists resumes after this step,
            # so its metrics must be written already (a resumed run drops what was logged after).
            if (cfg.save_freq > 0 and self.global_step % cfg.save_freq == 0) or is_last:
                self.save_checkpoint()
            progress.update(1)
        progress.close()
        self.tracker.finish()
        return metrics

    def _endless_batches(self):
        """Epoch after epoch; the loader's own state says where a resumed run continues."""
        while True:
            yield from self.train_loader

    # ================================================================ evaluation
    def evaluate(self) -> dict[str, float]:
        """`val/loss` on the held-out conversations and `gen/<component>` of the greedy-generation check."""
        metrics: dict[str, float] = {}
        if self.val_loader is not None:
            loss_sum, tokens = 0.0, 0.0
            self.val_loader.epoch, self.val_loader.batches_done = 0, 0
            for batch in self.val_loader:
                result = self.wg.eval_loss(batch).batch
                loss_sum += float(result["loss_sum"].sum())
                tokens += float(result["label_tokens"].sum())
            metrics["val/loss"] = loss_sum / tokens
        if self.generation_loader is not None:
            metrics.update(self._generation_check())
        self.last_eval = (self.global_step, metrics)
        return metrics

    def _generation_check(self) -> dict[str, float]:
        """Greedy responses to the check's prompts, scored by the reward function; writes them all to a file."""
        evaluation = self.config.eval
        sampling = SamplingParams(n=1, temperature=0.0, max_new_tokens=evaluation.max_new_tokens)
        scores: list[dict[str, float]] = []
        rows: list[dict[str, Any]] = []
        lengths: list[float] = []
        loader = self.generation_loader
        loader.epoch, loader.batches_done = 0, 0
        for prompts in loader:
            prompts.meta_info["sampling"] = sampling
            batch = self.wg.generate_sequences(prompts)
            response_mask = batch.batch["response_mask"]
            responses = batch.batch["responses"].masked_fill(response_mask == 0, self.tokenizer.pad_token_id)
            texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
            nt = batch.non_tensor_batch
            samples = [
                {
                    "response": texts[i],
                    "response_length": int(response_mask[i].sum()),
                    "ground_truth": nt["ground_truth"][i],
                    "question": nt["question"][i],
                    "description_answers": None,
                    "prior_answers": None,
                    "extra": nt["extra"][i],
                }
                for i in range(len(batch))
            ]
            batch_scores = self.reward_fn(samples)
            scores.extend(batch_scores)
            lengths.extend(float(sample["response_length"]) for sample in samples)
            rows.extend(
                {
                    "question": sample["question"],
                    "response": sample["response"],
                    "ground_truth": sample["ground_truth"],
                    "score": score,
                }
                for sample, score in zip(samples, batch_scores)
            )
        loader.epoch, loader.batches_done = 0, 0
        metrics = {key.replace("reward/", "gen/", 1): value for key, value in aggregate_reward_metrics(scores).items()}
        metrics["gen/response_length"] = float(np.mean(lengths))
        self.tracker.log_generations(rows[: evaluation.generations_to_log], step=self.global_step)
        os.makedirs(self.checkpoint_root, exist_ok=True)
        path = os.path.join(self.checkpoint_root, f"generations_step_{self.global_step}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return metrics

    # ================================================================ checkpoints
    def save_checkpoint(self) -> str:
        def write(folder: str) -> None:
            self.wg.save_checkpoint(os.path.join(folder, "actor"))
            if self.last_eval is not None and self.last_eval[0] == self.global_step:
                with open(os.path.join(folder, "eval_metrics.json"), "w") as f:
                    json.dump({"global_step": self.global_step, **self.last_eval[1]}, f, indent=2)
            state = {"global_step": self.global_step, "dataloader": self.train_loader.state_dict()}
            write_trainer_state(folder, state)

        return save_and_prune(self.checkpoint_root, self.global_step, self.config.trainer.save_limit, write)

    def _resume(self) -> None:
        cfg = self.config.trainer
        found = find_resume_checkpoint(self.checkpoint_root, cfg.load_checkpoint_path, cfg.find_last_checkpoint)
        if found is None:
            return
        path, state = found
        self.wg.load_checkpoint(os.path.join(path, "actor"))
        self.train_loader.load_state_dict(state["dataloader"])
        self.global_step = state["global_step"]
        logger.info("resumed from %s at step %d", path, self.global_step)


def build_trainer(config: SFTConfig) -> SFTTrainer:
    """Data, worker and trainer, built in dependency order."""

    data, model_cfg, evaluation = config.data, config.model, config.eval
    tokenizer, processor = load_tokenizer_and_processor(
        model_cfg.tokenizer_path or model_cfg.model_path, model_cfg.trust_remote_code
    )
    encoder = ConversationEncoder(tokenizer, processor, data.min_pixels, data.max_pixels)
    train_set = SFTDataset(data.train_files, encoder, data.max_length, data.image_dir)
    train_loader = SFTLoader(
        train_set,
        data.batch_size,
        tokenizer.pad_token_id,
        shuffle=data.shuffle,
        seed=data.seed,
        ratios=data.train_ratios,
        group_by_length=data.group_by_length,
    )
    val_loader = None
    if data.val_files:
        val_set = SFTDataset(data.val_files, encoder, data.max_length, data.image_dir)
        val_loader = SFTLoader(val_set, data.batch_size, tokenizer.pad_token_id, shuffle=False, drop_last=False)
    generation_loader, reward_fn = None, None
    if evaluation.generation_files is not None:
        prompt_config = PromptDatasetConfig(
            prompt_key=evaluation.prompt_key,
            answer_key=evaluation.answer_key,
            image_key=evaluation.image_key,
            format_prompt=evaluation.format_prompt,
            max_prompt_length=evaluation.max_prompt_length,
            min_pixels=data.min_pixels,
            max_pixels=data.max_pixels,
        )
        prompts = PromptDataset(evaluation.generation_files, tokenizer, processor, prompt_config)
        generation_loader = PromptLoader(
            prompts, evaluation.batch_size, False, data.seed, tokenizer.pad_token_id, drop_last=False
        )
        reward_fn = RewardFunction(evaluation.reward_function, evaluation.reward_function_kwargs)

    worker_kwargs = {
        "model_config": model_cfg,
        "optim_config": config.optim,
        "training_steps": config.trainer.total_steps(len(train_loader)),
        "micro_batch_size": config.trainer.micro_batch_size,
        "generation_batch_size": evaluation.batch_size,
        "seed": config.trainer.seed,
    }
    worker_group = build_worker_group(SFTWorker, worker_kwargs, config.trainer)
    logger.info("model parameters: %s", worker_group.init_model())
    return SFTTrainer(config, tokenizer, worker_group, train_loader, val_loader, generation_loader, reward_fn)


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run_cli(argv, SFTConfig, build_trainer)


if __name__ == "__main__":
    main()
