"""The one checkpoint layout of every worker (RL actor and SFT), whatever the number of workers:

    <folder>/                 a Hugging Face folder: config, generation config, weights (safetensors,
                              gathered on rank 0), tokenizer and processor; `from_pretrained` loads it
    <folder>/optimizer/       the optimizer state, every rank writing its own shards
                              (torch.distributed.checkpoint); reads back into any number of workers
    <folder>/training_state.pt  the lr schedule and rank 0's RNG state (tensors and numbers only)

With LoRA the frozen base weights are not copied: in place of the weights the folder holds the
adapter in peft's format (`adapter_config.json`, whose `base_model_name_or_path` names the base
model, and `adapter_model.safetensors`), beside the config, tokenizer and processor;
`optimizer/` then holds only the adapters' optimizer state. `PeftModel.from_pretrained(base, folder)`
loads it; scripts/model_merger.py merges it into a full Hugging Face folder.

Written by `save_checkpoint` on every rank together (the gathers and the sharded save are
collectives); read back by `load_checkpoint` on every rank together.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from verl.models.loading import load_model
from verl.workers import fsdp_utils, lora

if TYPE_CHECKING:
    from peft import PeftModel

OPTIMIZER_DIR = "optimizer"
"""Sub-folder with the optimizer state's shards (torch.distributed.checkpoint)."""
TRAINING_STATE = "training_state.pt"
"""File with the lr schedule and the RNG state."""
OLD_SHARDED_DIR = "sharded"
"""Where an earlier layout kept sharded weights and optimizer state together."""


def save_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    tokenizer: Any,
    processor: Any | None,
    peft_model: PeftModel | None = None,
) -> None:
    """Write `path` in the layout above (the adapter only when `peft_model`, LoRA, is given); call
    on every rank."""
    weights = lora.adapter_state(model) if peft_model is not None else fsdp_utils.full_state(model)[0]
    fsdp_utils.save_sharded(os.path.join(path, OPTIMIZER_DIR), model, optimizer, weights=False)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    os.makedirs(path, exist_ok=True)
    if peft_model is not None:
        lora.save_adapter(path, peft_model, weights)
        model.config.save_pretrained(path)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(path)
    else:
        # A sharded model's own state dict holds only this rank's shards: hand over the gathered weights.
        model.save_pretrained(path, state_dict=weights if dist.is_initialized() else None, safe_serialization=True)
    tokenizer.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    state = {
        "lr_scheduler": lr_scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    torch.save(state, os.path.join(path, TRAINING_STATE))


def load_checkpoint(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Restore weights, optimizer, lr schedule and RNG from a `save_checkpoint` folder written by any
    number of workers; call on every rank. The RNG is restored last, so nothing loaded afterwards
    draws from it."""
    require_complete(path)
    # Tensors, numbers and plain containers only: nothing in a checkpoint folder may run code.
    state = torch.load(os.path.join(path, TRAINING_STATE), weights_only=True)
    with_adapters = any(lora.is_lora_param(name) for name, _ in model.named_parameters())
    if with_adapters != lora.has_adapter(path):
        saved, ours = ("a LoRA adapter", "no adapters") if not with_adapters else ("full weights", "LoRA adapters")
        raise ValueError(
            f"checkpoint {path} holds {saved} but the model has {ours}: set worker.actor.model.lora "
            "(model.lora for SFT) as the run that saved it did"
        )
    if with_adapters:  # the frozen base weights are the ones the model was built from
        lora.load_adapter(path, model)
    else:
        weights = {}
        if not dist.is_initialized() or dist.get_rank() == 0:  # rank 0 reads the folder and hands out the shards
            weights = load_model(path, next(model.parameters()).dtype, "sdpa").state_dict()
        fsdp_utils.load_full_state(model, None, weights, None)
    fsdp_utils.load_sharded(os.path.join(path, OPTIMIZER_DIR), model, optimizer, weights=False)
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def require_complete(path: str) -> None:
    """Raise, naming the folder and the missing part, unless `path` is a checkpoint in this layout."""
    if os.path.isdir(os.path.join(path, OLD_SHARDED_DIR)):
        raise ValueError(
            f"{path}: written in an earlier checkpoint layout (`{OLD_SHARDED_DIR}/`); this version cannot resume "
            "from it. Merge its weights (scripts/model_merger.py) and start a new run from them."
        )
    for required in (TRAINING_STATE, OPTIMIZER_DIR, "config.json"):
        if not os.path.exists(os.path.join(path, required)):
            raise FileNotFoundError(f"checkpoint {path}: `{required}` is missing")
