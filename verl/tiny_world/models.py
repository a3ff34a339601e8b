"""Tiny randomly initialised Qwen models saved as ordinary Hugging Face folders.

Three models share one tokenizer: Qwen2.5-VL (the default policy), Qwen2-VL, and a text-only Qwen2
whose head_dim is 64 because vLLM's CPU attention accepts nothing smaller. Each has about a million
parameters, so a training step on a CPU takes about a second.
"""

from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from verl.tiny_world.tokenizer import CHAT_TEMPLATE

# Each merged 2x2 block of 14-pixel patches is one image token: a 28x56 image gives 2 tokens.
PATCH_SIZE = 14
SPATIAL_MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 28 * 28
MAX_PIXELS = 28 * 28 * 64

TEXT_HIDDEN_SIZE = 128
TEXT_INTERMEDIATE_SIZE = 512
ROPE_THETA = 1_000_000.0


def _token_ids(tokenizer: Qwen2Tokenizer) -> dict[str, int]:
    """The ids every model config must agree with the tokenizer on."""
    return {
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tokenizer.pad_token_id,
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }


def _text_config(tokenizer: Qwen2Tokenizer, num_attention_heads: int, num_key_value_heads: int, rope: dict) -> dict:
    """4 decoder layers of width 128; the heads decide head_dim (128 / num_attention_heads)."""
    ids = _token_ids(tokenizer)
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_HIDDEN_SIZE,
        "intermediate_size": TEXT_INTERMEDIATE_SIZE,
        "num_hidden_layers": 4,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA, **rope},
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
    }


def _vision_language_text_config(tokenizer: Qwen2Tokenizer) -> dict:
    """4 query / 2 KV heads of 32; the three M-RoPE sections (time, height, width) split its 16 frequencies."""
    return _text_config(tokenizer, num_attention_heads=4, num_key_value_heads=2, rope={"mrope_section": [4, 6, 6]})


def _vision_language_ids(ids: dict[str, int]) -> dict[str, int]:
    keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return {key: ids[key] for key in keys}


def qwen2_5_vl_config(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    """Text: 4 layers, 4 query / 2 KV heads of 32; vision: 2 blocks of width 64 (the last one global)."""
    ids = _token_ids(tokenizer)
    text = _vision_language_text_config(tokenizer)
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": TEXT_HIDDEN_SIZE,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": SPATIAL_MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "window_size": 112,
        "fullatt_block_indexes": [1],
    }
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True, dtype="float32", **_vision_language_ids(ids)
    )


def qwen2_vl_config(tokenizer: Qwen2Tokenizer) -> Qwen2VLConfig:
    """The same text shape as Qwen2.5-VL; Qwen2-VL's vision blocks name their width `embed_dim`."""
    ids = _token_ids(tokenizer)
    text = _vision_language_text_config(tokenizer)
    vision = {
        "depth": 2,
        "embed_dim": 64,
        "mlp_ratio": 2,
        "num_heads": 2,
        "hidden_size": TEXT_HIDDEN_SIZE,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": SPATIAL_MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    }
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True, dtype="float32", **_vision_language_ids(ids)
    )


def qwen2_text_config(tokenizer: Qwen2Tokenizer) -> Qwen2Config:
    """Text only: 4 layers, 2 query heads and 1 KV head of 64."""
    text = _text_config(tokenizer, num_attention_heads=2, num_key_value_heads=1, rope={})
    return Qwen2Config(**text, tie_word_embeddings=True, dtype="float32")


def generation_config(tokenizer: Qwen2Tokenizer) -> GenerationConfig:
    """Stops at the end of a turn or of a text, like the released Qwen-VL instruct models."""
    ids = _token_ids(tokenizer)
    return GenerationConfig(
        bos_token_id=ids["bos_token_id"],
        eos_token_id=[ids["eos_token_id"], ids["bos_token_id"]],
        pad_token_id=ids["pad_token_id"],
    )


def vision_processor(processor_class: type, tokenizer: Qwen2Tokenizer) -> Qwen2VLProcessor | Qwen2_5_VLProcessor:
    """The stock Qwen-VL processor, with pixel bounds small enough for 28x56 images."""
    patching = {"patch_size": PATCH_SIZE, "temporal_patch_size": TEMPORAL_PATCH_SIZE, "merge_size": SPATIAL_MERGE_SIZE}
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, **patching)
    video_processor = Qwen2VLVideoProcessor(**patching)
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_models(tokenizer: Qwen2Tokenizer, models_dir: Path, seed: int) -> dict[str, int]:
    """Initialises the three models from `seed`, saves each with its tokenizer/processor under `models_dir`.

    Returns the parameter count of each model folder name. The global torch RNG is left as it was.
    """
    parameter_counts = {}
    builds = (
        ("qwen2_5_vl", Qwen2_5_VLForConditionalGeneration, qwen2_5_vl_config, Qwen2_5_VLProcessor),
        ("qwen2_vl", Qwen2VLForConditionalGeneration, qwen2_vl_config, Qwen2VLProcessor),
        ("qwen2_text", Qwen2ForCausalLM, qwen2_text_config, None),
    )
    for offset, (name, model_class, make_config, processor_class) in enumerate(builds):
        out_dir = models_dir / name
        with torch.random.fork_rng(devices=[]):
            # A different stream per model, so the models do not start as copies of one another.
            torch.manual_seed(seed * len(builds) + offset)
            model = model_class(make_config(tokenizer))
        model.generation_config = generation_config(tokenizer)
        model.save_pretrained(out_dir)
        parameter_counts[name] = sum(parameter.numel() for parameter in model.parameters())
        if processor_class is None:
            tokenizer.save_pretrained(out_dir)
        else:
            vision_processor(processor_class, tokenizer).save_pretrained(out_dir)
    return parameter_counts
