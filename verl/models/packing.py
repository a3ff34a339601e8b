"""Padding-free forwards: the real tokens of a micro-batch packed into one sequence.

A rollout micro-batch is stored padded: (b, L) rows of a left-padded prompt followed by a
right-padded response. A padded forward spends compute on every pad token. Packed, the rows' real
tokens are concatenated into one (1, N) sequence, N = the number of attended tokens, and the
position ids restart at 0 for each row. Transformers reads that restart as a sequence boundary:
flash-attention 2 runs its variable-length kernel (no work across rows, none on padding), and
sdpa/eager get a block-diagonal causal mask (exact too, but attention then costs N^2, so packing
pays off on GPUs with flash-attention).

Qwen-VL models take (4, 1, N) position ids here: row 0 the restarting text positions (what the
attention mask is built from), rows 1-3 the 3-D rope positions of each token as in the padded layout.
Images need nothing: their patches are matched to image tokens in order, and packing keeps the order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedRows:
    """The packed form of a padded micro-batch and the way back to its (b, T) response layout.

    Attributes:
        input_ids: (1, N) the attended tokens of every row, row after row.
        position_ids: (1, N) restarting text positions, or (4, 1, N) for 3-D rope models.
        predictor_index: (M,) for each real response token, the packed position whose output predicts it.
        response_tokens: (M,) the real response tokens, row-major.
        response_slots: (b, T) bool, True where a real response token sits in the padded layout.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    predictor_index: torch.Tensor
    response_tokens: torch.Tensor
    response_slots: torch.Tensor

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """(M, ...) per-response-token values -> (b, T, ...) in the padded layout, zeros at padding."""
        out = values.new_zeros(*self.response_slots.shape, *values.shape[1:])
        out[self.response_slots] = values
        return out


def pack_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, response_length: int
) -> PackedRows:
    """Pack a padded micro-batch.

    Args:
        input_ids: (b, L) prompt (left-padded) then response (right-padded), L = P + T.
        attention_mask: (b, L) 1 on real tokens.
        position_ids: (b, L) text positions, or (b, 3, L) 3-D rope positions (Qwen-VL), as stored in the batch.
        response_length: T, the width of the response part.

    Every row must have at least one real prompt token (the predictor of its first response token),
    and its real response tokens must come first in the response part (right padding).
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"pack_rows: input_ids {tuple(input_ids.shape)} and attention_mask must both be (b, L)")
    real = attention_mask.bool()
    prompt_length = input_ids.shape[1] - response_length
    if not bool(real[:, :prompt_length].any(-1).all()):
        raise ValueError("pack_rows: a row has no real prompt token, so nothing predicts its first response token")
    response_slots = real[:, prompt_length:]
    # Right padding: once a response slot is padding, every later one is too.
    if bool((response_slots[:, 1:] & ~response_slots[:, :-1]).any()):
        raise ValueError("pack_rows: a response has a real token after padding; responses must be right-padded")

    packed_ids = input_ids[real].unsqueeze(0)
    text_positions = (attention_mask.long().cumsum(-1) - 1)[real].unsqueeze(0)
    if position_ids.dim() == 3:  # (b, 3, L) -> (3, N), then the text row on top
        rope_positions = position_ids.transpose(0, 1)[:, real]
        packed_positions = torch.cat([text_positions, rope_positions.to(text_positions.dtype)]).unsqueeze(1)
    else:
        packed_positions = text_positions
    # Packed index of each attended token; a response token is predicted by the token just before it.
    packed_index = real.flatten().long().cumsum(0).view_as(real) - 1
    predictor_index = packed_index[:, prompt_length:][response_slots] - 1
    return PackedRows(
        input_ids=packed_ids,
        position_ids=packed_positions,
        predictor_index=predictor_index,
        response_tokens=input_ids[:, prompt_length:][response_slots],
        response_slots=response_slots,
    )
