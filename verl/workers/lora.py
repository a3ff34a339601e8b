"""LoRA (peft) for the RL actor and the SFT model: adapters, the reference policy, merged weights, files.

peft injects its layers into the Hugging Face model in place (`get_peft_model`), so the workers keep
computing with the model itself (Qwen-VL positions, the vision tower, `generate`) and FSDP2 shards
it as usual; the returned `PeftModel` wrapper is kept only for what peft does on the whole model:
switching the adapters off (`disable_adapter()`, the reference policy) and the adapter's config.

Names: inside the model an adapted layer `x` holds `x.base_layer.weight` (frozen) and
`x.lora_A.default.weight` / `x.lora_B.default.weight` (trained). The peft file format drops the
adapter name and prefixes `base_model.model.`; `merged_weights` yields the base model's own names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from verl.models.loading import vision_tower

if TYPE_CHECKING:
    from peft import PeftModel

    from verl.workers.config import LoRAConfig

ADAPTER = "default"
"""peft's name for the one adapter."""
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""Prefix of every key in peft's adapter files (the PeftModel -> LoraModel -> model path)."""


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def apply_lora(model: torch.nn.Module, cfg: LoRAConfig) -> PeftModel:
    """Inject adapters into `model` in place (its base weights frozen, the adapters trainable) and
    return peft's wrapper around it. Works on a meta-device model too (sharded loading)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    # A text-only model has no vision tower to leave out; peft would warn that nothing was excluded.
    exclude = cfg.exclude_modules if vision_tower(model) is not None else None
    peft_config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        exclude_modules=exclude,
        bias="none",
    )
    peft_model = get_peft_model(model, peft_config, adapter_name=ADAPTER)
    other = sorted(
        {type(m).__name__ for m in model.modules() if isinstance(m, BaseTunerLayer) and not isinstance(m, LoraLinear)}
    )
    if other:
        raise ValueError(
            f"lora.target_modules={cfg.target_modules!r} (worker.actor.model.lora or model.lora for SFT) adapts non-linear layers ({other}); "
            "only linear layers are supported (their merged weights are what the rollout engines receive)"
        )
    return peft_model


@contextmanager
def adapters_disabled(peft_model: PeftModel) -> Iterator[None]:
    """The base model (the reference policy): the same weights with every adapter switched off.

    peft also clears the adapters' requires_grad while they are off; FSDP2 fixes each gathered
    parameter's requires_grad when it first gathers it, so it is set back at once (this context runs
    under no_grad, where it changes nothing) and a first gather here cannot freeze the adapters.
    """
    with peft_model.disable_adapter():
        adapters = [p for name, p in peft_model.named_parameters() if is_lora_param(name)]
        for param in adapters:
            param.requires_grad_(True)
        yield


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter; a collective when sharded."""
    tensor = param.detach()
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def merged_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight under the base model's names, adapted layers merged: W + (alpha / rank) * B @ A.

    Gathers one parameter at a time (every rank must iterate together when sharded). The merge is
    computed in fp32 and returned in the weight's dtype.
    """
    for name, param in model.named_parameters():
        if is_lora_param(name):
            continue
        tensor = _full(param)
        if ".base_layer." not in name:
            yield name, tensor
            continue
        prefix, _, leaf = name.rpartition(".base_layer.")
        if leaf == "weight":
            layer = model.get_submodule(prefix)
            a, b = _full(layer.lora_A[ADAPTER].weight), _full(layer.lora_B[ADAPTER].weight)
            delta = (b.float() @ a.float()) * layer.scaling[ADAPTER]
            if layer.fan_in_fan_out:
                delta = delta.T
            tensor = (tensor.float() + delta.to(tensor.device)).to(tensor.dtype)
        yield f"{prefix}.{leaf}", tensor


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' full weights on the CPU in peft's file naming; call on every rank together."""
    state = {}
    for name, param in model.named_parameters():
        if is_lora_param(name):
            state[PEFT_PREFIX + name.replace(f".{ADAPTER}.", ".")] = _full(param).cpu().contiguous()
    return state


def save_adapter(path: str, peft_model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Write `adapter_config.json` (with the base model's path) and `adapter_model.safetensors`:
    what `PeftModel.from_pretrained(base, path)` reads."""
    os.makedirs(path, exist_ok=True)
    peft_model.peft_config[ADAPTER].save_pretrained(path)
    save_file(state, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})


def load_adapter(path: str, model: torch.nn.Module, cfg: LoRAConfig | None = None) -> None:
    """Load a peft adapter folder into `model`'s adapters (plain or sharded; every rank reads the
    small file itself). The folder must adapt exactly the model's layers, with `cfg`'s rank and alpha."""
    config_file, weights_file = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    for required in (config_file, weights_file):
        if not os.path.isfile(required):
            raise FileNotFoundError(f"adapter {path}: `{os.path.basename(required)}` is missing")
    if cfg is not None:
        with open(config_file) as f:
            saved = json.load(f)
        if (saved.get("r"), float(saved.get("lora_alpha", 0))) != (cfg.rank, float(cfg.alpha)):
            raise ValueError(
                f"adapter {path} has rank {saved.get('r')} and alpha {saved.get('lora_alpha')}; the config asks for "
                f"lora.rank={cfg.rank}, lora.alpha={cfg.alpha}"
            )
    expected = {name for name, _ in model.named_parameters() if is_lora_param(name)}
    state = {}
    for key, tensor in load_file(weights_file).items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"adapter {path}: key {key!r} is not in peft's format ({PEFT_PREFIX}...)")
        inner = key[len(PEFT_PREFIX) :]
        for part in (".lora_A.", ".lora_B."):
            inner = inner.replace(part, f"{part}{ADAPTER}.")
        state[inner] = tensor
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"adapter {path} does not fit the model's adapters (check lora.target_modules / exclude_modules and the "
            f"base model): missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    dtype = next(p.dtype for n, p in model.named_parameters() if is_lora_param(n))
    state = {key: tensor.to(dtype) for key, tensor in state.items()}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def has_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))
