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
