"""Per-sample multimodal inputs (pixel values, image grids) and batching them for a forward."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def batch_multimodal_inputs(per_sample: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Concatenate the samples' `pixel_values` and `image_grid_thw` in row order.

    Qwen-VL forwards take the patches of every image of the batch as one tensor and match them to
    image tokens in order, so the rows' order must be kept. Text-only samples contribute nothing.
    """
    pixel_values, grids = [], []
    for sample in per_sample:
        if sample and "pixel_values" in sample:
            pixel_values.append(sample["pixel_values"])
            grids.append(sample["image_grid_thw"])
    if not pixel_values:
        return {}
    return {"pixel_values": torch.cat(pixel_values), "image_grid_thw": torch.cat(grids)}


def reset_rope_cache(model: torch.nn.Module) -> None:
    """Drop the mrope deltas that `generate` caches, so a later forward cannot reuse stale ones."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None


def multimodal_token_ids(config: Any) -> list[int]:
    """Ids of the image/video placeholder and boundary tokens of a Qwen-VL config (empty for text models).

    A sampler must never emit these: a response holding `<|image_pad|>` would claim image features
    that do not exist, and the next forward fails ("image features and image tokens do not match").
    """
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return sorted({int(getattr(config, name)) for name in names if getattr(config, name, None) is not None})
