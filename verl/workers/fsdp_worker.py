"""One worker per device holding the actor (trained), its rollout engine and the reference model.

The controller talks to it only through a worker group (verl.single_controller); the same class
runs in-process (`trainer.backend=local`) and as a Ray actor.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict

import torch

from verl.models.loading import (
    load_model,
    load_tokenizer_and_processor,
    resolve_attn_implementation,
    resolve_dtype,
    vision_tower,
)
from verl.protocol import DataProto
from verl.trainer.config import OptimConfig, WorkerConfig
from verl.workers.actor.dp_actor import DataParallelActor
from verl.workers.rollout import get_rollout_engine
from verl.workers.rollout.base import SamplingParams

logger = logging.getLogger(__name__)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """constant, warmup (linear, then constant) or cosine (after the warm-up) schedules."""
    total = max(config.training_steps, 1)
    warmup = config.lr_warmup_steps if config.lr_warmup_steps >= 0 else int(config.lr_warmup_ratio * total)

    def factor(step: int) -> float:
        if config.lr_scheduler_type != "constant" and step < warmup:
            return (step + 1) / (warmup + 1)
        if config.lr_scheduler_type == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible")
    return torch.device(name)


class ActorRolloutRefWorker:
    """Roles: actor + rollout always; reference when `need_ref` (KL on)."""

    def __init__(self, config: WorkerConfig, device: str = "auto", need_ref: bool = True, seed: int = 1) -> None:
        self.config = config
        self.device = resolve_device(device)
        self.need_ref = need_ref
        self.seed = seed

    # --- setup -------------------------------------------------------------------------------
    def init_model(self) -> dict[str, int]:
        model_cfg = self.config.actor.model
        torch.manual_seed(self.seed)
        self.tokenizer, self.processor = load_tokenizer_and_processor(
            model_cfg.tokenizer_path or model_cfg.model_path, model_cfg.trust_remote_code
        )
        attn = resolve_attn_implementation(model_cfg.attn_implementation, self.device)
        on_gpu = self.device.type == "cuda"
        actor_dtype = resolve_dtype(self.config.actor.fsdp.torch_dtype, torch.float32)
        self.model = load_model(model_cfg.model_path, actor_dtype, attn, model_cfg.trust_remote_code).to(self.device)
        if model_cfg.freeze_vision_tower:
            tower = vision_tower(self.model)
            if tower is None:
                raise ValueError("worker.actor.model.freeze_vision_tower=true but the model has no vision tower")
            tower.requires_grad_(False)
        if model_cfg.enable_gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.ref_model = None
        if self.need_ref:
            ref_dtype = resolve_dtype(self.config.ref.fsdp.torch_dtype, torch.bfloat16 if on_gpu else torch.float32)
            self.ref_model = load_model(model_cfg.model_path, ref_dtype, attn, model_cfg.trust_remote_code)
            self.ref_model.to(self.device).eval().requires_grad_(False)
        optim_cfg = self.config.actor.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay
        )
        self.lr_scheduler = build_lr_scheduler(self.optimizer, optim_cfg)
        self.actor = DataParallelActor(
            self.config.actor,
            self.model,
            self.optimizer,
            ref_model=self.ref_model if self.config.actor.kl_penalty == "full" else None,
        )
        self.ref_actor = DataParallelActor(self.config.actor, self.ref_model) if self.ref_model is not None else None
        rollout_cfg = self.config.rollout
        self.rollout = get_rollout_engine(rollout_cfg.name)(
            model=self.model, tokenizer=self.tokenizer, processor=self.processor, config=rollout_cfg,
            micro_batch_size=rollout_cfg.micro_batch_size,
        )
        return {
            "actor_params": sum(p.numel() for p in self.model.parameters()),
            "trainable_params": sum(p.numel() for p in params),
        }

    # --- stages ----------------------------------------------------------------------------
    def generate_sequences(self, prompts: DataProto) -> DataProto:
        """Sample with `prompts.meta_info["sampling"]` (a SamplingParams)."""
        sampling: SamplingParams = prompts.meta_info["sampling"]
        self.rollout.wake()
        self.rollout.sync_weights(self.model)
        try:
            return self.rollout.generate(prompts, sampling)
        finally:
            self.rollout.sleep()

    def compute_log_probs(self, data: DataProto) -> DataProto:
        log_probs, entropy = self.actor.compute_log_probs(
            data,
            data.meta_info["temperature"],
            self.config.actor.micro_batch_size_per_device_for_experience,
            with_entropy=True,
        )
        return DataProto.from_dict(tensors={"old_log_probs": log_probs, "entropy": entropy})

    def compute_ref_log_probs(self, data: DataProto) -> DataProto:
        if self.ref_actor is None:
            raise RuntimeError("compute_ref_log_probs called on a worker without the reference role")
        log_probs, _ = self.ref_actor.compute_log_probs(
            data, data.meta_info["temperature"], self.config.ref.micro_batch_size_per_device_for_experience
        )
        return DataProto.from_dict(tensors={"ref_log_probs": log_probs})

    def update_actor(self, data: DataProto) -> DataProto:
        metrics = self.actor.update_policy(data, data.meta_info["temperature"], data.meta_info["mini_batch_size"])
        metrics["actor/lr"] = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        return DataProto.from_dict(meta_info={"metrics": metrics})

    # --- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, path: str) -> None:
        """Write an HF folder (loadable as a model) plus optimizer, scheduler and RNG state into `path`."""
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        if self.processor is not None:
            self.processor.save_pretrained(path)
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            os.path.join(path, "training_state.pt"),
        )
        with open(os.path.join(path, "worker_config.json"), "w") as f:
            json.dump(asdict(self.config), f, indent=2, default=str)

    def load_checkpoint(self, path: str) -> None:
        """Restore the weights, optimizer, scheduler and RNG saved by `save_checkpoint`."""
        loaded = load_model(path, next(self.model.parameters()).dtype, "sdpa")
        self.model.load_state_dict(loaded.state_dict())
        del loaded
        state = torch.load(os.path.join(path, "training_state.pt"), weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
