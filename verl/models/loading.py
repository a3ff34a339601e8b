"""Loading policy models, tokenizers and processors from Hugging Face folders."""

from __future__ import annotations

import importlib.util
import logging
import os

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from verl.models.families import family_of

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")


def resolve_dtype(name: str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """Map a config string (fp32/bf16/fp16) to a torch dtype."""
    if name is None:
        return default
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_attn_implementation(requested: str, device: torch.device) -> str:
    """`auto` picks flash_attention_2 on CUDA when flash-attn is installed, else sdpa."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if device.type == "cuda" and has_flash else "sdpa"
    if requested == "flash_attention_2" and not (has_flash and device.type == "cuda"):
        logger.warning("flash_attention_2 requested but flash-attn is not usable here (CUDA + flash-attn); using sdpa")
        return "sdpa"
    return requested


def is_vision_model(model_path: str) -> bool:
    """True when the folder holds a vision-language model (its config has a vision_config)."""
    config = AutoConfig.from_pretrained(model_path)
    return getattr(config, "vision_config", None) is not None


def check_model_path(path: str) -> None:
    """A local folder, or a hub id (`org/name`) that transformers resolves from its cache or the hub."""
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/")) and not os.path.exists(path)
    if not os.path.isdir(path) and not looks_like_hub_id:
        raise FileNotFoundError(f"model folder not found: {path}")


def load_tokenizer_and_processor(
    path: str, trust_remote_code: bool = False
) -> tuple[PreTrainedTokenizerBase, ProcessorMixin | None]:
    """The tokenizer (always left-padded) and, for vision models, the multimodal processor."""
    check_model_path(path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    # Generation with right padding silently uses wrong positions for padded rows.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    processor = None
    if is_vision_model(path):
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        if not isinstance(processor, ProcessorMixin):
            raise RuntimeError(
                f"{path}: AutoProcessor returned {type(processor).__name__}, not a multimodal processor. "
                "transformers needs torchvision to build Qwen-VL processors; install it (bash setup.sh)."
            )
        processor.tokenizer = tokenizer
    return tokenizer, processor


def load_model(
    path: str,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Load a causal LM or image-text-to-text model from a Hugging Face folder (or hub id)."""
    check_model_path(path)
    auto_cls = AutoModelForImageTextToText if is_vision_model(path) else AutoModelForCausalLM
    model = auto_cls.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
    )
    return model


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """The vision encoder (with its merger/projector) of a Qwen-VL model, or None for text models."""
    inner = getattr(model, "model", model)
    return getattr(inner, "visual", None)


def freeze_vision_parts(model: torch.nn.Module, freeze_tower: bool, freeze_projector: bool) -> bool:
    """Stop gradients into the vision encoder (patch embedding, position table and blocks) and/or
    its projectors: the tower's children that map vision features into the text model, which the
    model's family names (`projector_modules`: Qwen-VL's `merger`, plus Qwen3-VL's
    `deepstack_merger_list`). Returns False for a text-only model, which has neither."""
    visual = vision_tower(model)
    if visual is None:
        return False
    family = family_of(model.config)
    projectors = [getattr(visual, name, None) for name in family.projector_modules]
    missing = [name for name, module in zip(family.projector_modules, projectors) if module is None]
    if missing or not projectors:
        raise ValueError(
            f"{type(visual).__name__} ({family.title}) lacks the projector submodules {missing or '(none listed)'} "
            "its family names (verl/models/families/); cannot tell the projector apart from the tower"
        )
    if freeze_projector:
        for projector in projectors:
            projector.requires_grad_(False)
    if freeze_tower:
        projector_ids = {id(projector) for projector in projectors}
        for child in visual.children():
            if id(child) not in projector_ids:
                child.requires_grad_(False)
    return True
