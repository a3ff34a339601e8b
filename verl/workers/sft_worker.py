"""The SFT worker: the model step of supervised fine-tuning (cold start).

One optimizer step per batch, a forward and backward per micro-batch, cross-entropy on assistant
tokens only, averaged over the batch's labeled tokens (over every rank together). The same class
runs in-process (`trainer.backend=local`) and as one Ray actor per device (`ray`), FSDP2-sharded
with several workers (or on a GPU) exactly as the RL actor is; it shares the RL worker's optimizer
and schedule builders, its optimizer step (`clip_and_step`) and its checkpoint layout
(verl/workers/checkpoint.py). The loop is verl/trainer/sft.py.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

from verl.models.loading import (
    freeze_vision_parts,
    load_tokenizer_and_processor,
    resolve_attn_implementation,
    resolve_dtype,
)
from verl.models.multimodal import batch_multimodal_inputs, reset_rope_cache
from verl.models.positions import compute_position_ids
from verl.protocol import DataProto
from verl.single_controller.dispatch import Dispatch, register
from verl.utils.device import resolve_device
from verl.utils.sft_dataset import IGNORE_INDEX
from verl.workers import checkpoint, fsdp_utils, lora
from verl.workers.config import SFTModelConfig, SFTOptimConfig
from verl.workers.optimizer import build_lr_scheduler, build_optimizer, clip_and_step
from verl.workers.rollout.hf_rollout import HFRollout

logger = logging.getLogger(__name__)


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
        micro_batch_size: int,
        generation_batch_size: int = 64,
        device: str = "auto",
        seed: int = 1,
    ) -> None:
        self.model_config = model_config
        self.optim_config = optim_config
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
        self.peft_model = None
        self.model = self._build_model()
        if cfg.lora.adapter_path:
            lora.load_adapter(cfg.lora.adapter_path, self.model, cfg.lora)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.trainable, self.optim_config)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, self.optim_config)
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
            if cfg.lora.enabled:  # every base weight frozen, the vision parts included; only adapters train
                self.peft_model = lora.apply_lora(model, cfg.lora)
            freezing = cfg.freeze_vision_tower or cfg.freeze_projector
            if not freeze_vision_parts(model, cfg.freeze_vision_tower, cfg.freeze_projector) and freezing:
                logger.info("text-only model: no vision tower or projector to freeze")
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
        grad_norm, stepped = clip_and_step(self.trainable, self.optimizer, self.optim_config.max_grad_norm)
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        metrics = {
            "train/loss": fsdp_utils.sum_across_ranks(loss_sum) / label_tokens,
            "train/grad_norm": grad_norm,
            "train/lr": lr,
            "train/skipped_step": float(not stepped),
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
        """The shared worker layout (verl/workers/checkpoint.py), however many workers trained."""
        checkpoint.save_checkpoint(
            path, self.model, self.optimizer, self.lr_scheduler, self.tokenizer, self.processor, self.peft_model
        )

    @register(Dispatch.ONE_TO_ALL)
    def load_checkpoint(self, path: str) -> None:
        """Restore what `save_checkpoint` wrote, from any number of workers into any number."""
        checkpoint.load_checkpoint(path, self.model, self.optimizer, self.lr_scheduler)
