"""Tiny randomly initialised Qwen models saved as ordinary Hugging Face folders.

Six models share one tokenizer: Qwen2.5-VL (the default policy), Qwen2-VL, Qwen3-VL, Qwen3-VL-MoE
(4 experts, 2 per token), Qwen3.5 (gated delta-net linear attention layers between full attention
layers) and a text-only Qwen2 whose head_dim is 64 because vLLM's CPU attention accepts nothing
smaller. Each has about a million parameters, so a training step on a CPU takes about a second.
The Qwen3 families see 16-pixel patches (32-pixel merged tokens) where Qwen2 sees 14 (28).
"""

import copy
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
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from verl.tiny_world.tokenizer import CHAT_TEMPLATE

# Each merged 2x2 block of 14-pixel patches is one image token: a 28x56 image gives 2 tokens.
PATCH_SIZE = 14
SPATIAL_MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 28 * 28
MAX_PIXELS = 28 * 28 * 64

# Qwen3-VL and Qwen3.5 patches are 16 pixels: a 28x56 image is resized to 32x64, again 2 tokens.
QWEN3_PATCH_SIZE = 16
QWEN3_MIN_PIXELS = 32 * 32
QWEN3_MAX_PIXELS = 32 * 32 * 64

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


def _qwen3_vision_config(deepstack: bool) -> dict:
    """2 blocks of width 64 on 16-pixel patches; Qwen3-VL also feeds both blocks' outputs ("deepstack")
    into the first text layers through projectors of their own."""
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": TEXT_HIDDEN_SIZE,
        "patch_size": QWEN3_PATCH_SIZE,
        "spatial_merge_size": SPATIAL_MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        # A learned position table of 8x8 patches, interpolated to each image's grid.
        "num_position_embeddings": 64,
    }
    if deepstack:
        vision["deepstack_visual_indexes"] = [0, 1]
    return vision


def _qwen3_text_config(tokenizer: Qwen2Tokenizer) -> dict:
    """The Qwen2-VL text shape with Qwen3's interleaved M-RoPE (time, height, width frequencies alternate)."""
    text = _text_config(
        tokenizer,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope={"mrope_section": [4, 6, 6], "mrope_interleaved": True},
    )
    text["head_dim"] = TEXT_HIDDEN_SIZE // 4
    return text


def qwen3_vl_config(tokenizer: Qwen2Tokenizer) -> Qwen3VLConfig:
    """Text: 4 layers, 4 query / 2 KV heads of 32 with q/k norms; vision: 2 blocks, both deepstack sources."""
    ids = _token_ids(tokenizer)
    return Qwen3VLConfig(
        text_config=_qwen3_text_config(tokenizer),
        vision_config=_qwen3_vision_config(deepstack=True),
        tie_word_embeddings=True,
        dtype="float32",
        **_vision_language_ids(ids),
    )


def qwen3_vl_moe_config(tokenizer: Qwen2Tokenizer) -> Qwen3VLMoeConfig:
    """Qwen3-VL's shape with every text layer a mixture of 4 experts of width 128, 2 chosen per token."""
    ids = _token_ids(tokenizer)
    text = _qwen3_text_config(tokenizer)
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, decoder_sparse_step=1)
    return Qwen3VLMoeConfig(
        text_config=text,
        vision_config=_qwen3_vision_config(deepstack=True),
        tie_word_embeddings=True,
        dtype="float32",
        **_vision_language_ids(ids),
    )


def qwen3_5_config(tokenizer: Qwen2Tokenizer) -> Qwen3_5Config:
    """Text: linear attention (gated delta-net: 2 key / 4 value heads of 32, a width-4 causal convolution)
    at layers 0 and 2, gated full attention (2 query / 1 KV head of 64, rope on a quarter of each head)
    at layers 1 and 3; vision: Qwen3-VL's tower without deepstack."""
    ids = _token_ids(tokenizer)
    text = _text_config(
        tokenizer,
        num_attention_heads=2,
        num_key_value_heads=1,
        # Rope covers 16 of each head's 64 dimensions: 8 frequencies, split (time, height, width).
        rope={"mrope_section": [2, 3, 3], "mrope_interleaved": True, "partial_rotary_factor": 0.25},
    )
    text.update(
        head_dim=64,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
    )
    return Qwen3_5Config(
        text_config=copy.deepcopy(text),
        vision_config=_qwen3_vision_config(deepstack=False),
        tie_word_embeddings=True,
        dtype="float32",
        **_vision_language_ids(ids),
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


def vision_processor(
    processor_class: type, tokenizer: Qwen2Tokenizer
) -> Qwen2VLProcessor | Qwen2_5_VLProcessor | Qwen3VLProcessor:
    """The stock Qwen-VL processor, with pixel bounds small enough for 28x56 images."""
    qwen3 = processor_class is Qwen3VLProcessor
    patch_size = QWEN3_PATCH_SIZE if qwen3 else PATCH_SIZE
    min_pixels, max_pixels = (QWEN3_MIN_PIXELS, QWEN3_MAX_PIXELS) if qwen3 else (MIN_PIXELS, MAX_PIXELS)
    patching = {"patch_size": patch_size, "temporal_patch_size": TEMPORAL_PATCH_SIZE, "merge_size": SPATIAL_MERGE_SIZE}
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **patching)
    video_processor = (Qwen3VLVideoProcessor if qwen3 else Qwen2VLVideoProcessor)(**patching)
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_models(tokenizer: Qwen2Tokenizer, models_dir: Path, seed: int) -> dict[str, int]:
    """Initialises the models from `seed`, saves each with its tokenizer/processor under `models_dir`.

    Returns the parameter count of each model folder name. The global torch RNG is left as it was.
    """
    parameter_counts = {}
    builds = (
        ("qwen2_5_vl", Qwen2_5_VLForConditionalGeneration, qwen2_5_vl_config, Qwen2_5_VLProcessor),
        ("qwen2_vl", Qwen2VLForConditionalGeneration, qwen2_vl_config, Qwen2VLProcessor),
        ("qwen2_text", Qwen2ForCausalLM, qwen2_text_config, None),
        ("qwen3_vl", Qwen3VLForConditionalGeneration, qwen3_vl_config, Qwen3VLProcessor),
        ("qwen3_vl_moe", Qwen3VLMoeForConditionalGeneration, qwen3_vl_moe_config, Qwen3VLProcessor),
        ("qwen3_5", Qwen3_5ForConditionalGeneration, qwen3_5_config, Qwen3VLProcessor),
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
