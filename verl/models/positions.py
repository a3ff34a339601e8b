"""Position ids for Qwen-VL (3-D "mrope") and plain text models.

Qwen-VL models need explicit 3-D positions in training forwards: without them Qwen2.5-VL silently
falls back to 1-D RoPE and log-probs drift from the sampler's.
"""

from __future__ import annotations

import torch


def multimodal_token_types(input_ids: torch.Tensor, image_token_id: int, video_token_id: int | None) -> torch.Tensor:
    """0 for text, 1 for image and 2 for video placeholder tokens (the layout get_rope_index expects)."""
    types = torch.zeros_like(input_ids, dtype=torch.int)
    types[input_ids == image_token_id] = 1
    if video_token_id is not None:
        types[input_ids == video_token_id] = 2
    return types


def text_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only attended tokens, so left padding does not shift them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


def compute_position_ids(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    prompt_length: int | None = None,
) -> torch.Tensor:
    """(B, 3, L) mrope positions for Qwen-VL models, (B, L) positions for text models.

    `image_grid_thw` holds the grids of every image of the batch, in row order. Tokens after
    `prompt_length` (the responses) are always text.
    """
    config = model.config
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        return text_position_ids(attention_mask)
    inner = model.model if hasattr(model, "model") else model
    token_types = multimodal_token_types(input_ids, image_token_id, getattr(config, "video_token_id", None))
    if prompt_length is not None:
        token_types[:, prompt_length:] = 0
    positions, _ = inner.get_rope_index(
        input_ids,
        mm_token_type_ids=token_types,
        image_grid_thw=image_grid_thw,
        attention_mask=attention_mask,
    )
    return positions.transpose(0, 1).contiguous()
