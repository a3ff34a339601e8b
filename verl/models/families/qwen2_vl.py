"""Qwen2-VL and Qwen2.5-VL: a ViT on 14-pixel patches merged 2x2 by `visual.merger` into the text
model's width; 3-D M-RoPE with contiguous (time, height, width) frequency sections."""

from verl.models.families.base import ModelFamily

QWEN2_5_VL = ModelFamily(
    name="qwen2_5_vl",
    title="Qwen2.5-VL",
    model_types=("qwen2_5_vl",),
    vision=True,
    projector_modules=("merger",),
    vllm_architecture="Qwen2_5_VLForConditionalGeneration",
)

QWEN2_VL = ModelFamily(
    name="qwen2_vl",
    title="Qwen2-VL",
    model_types=("qwen2_vl",),
    vision=True,
    projector_modules=("merger",),
    vllm_architecture="Qwen2VLForConditionalGeneration",
)
