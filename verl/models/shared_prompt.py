"""Shared-prompt forwards: a GRPO group's prompt (vision tower included) encoded once, not n times.

The n responses of a prompt sit in n adjacent rows with the same prompt tokens and images. A plain
forward runs the whole prompt n times. Here the distinct prompts of a micro-batch run once with a
key/value cache, the cache is indexed out to every row of the group, and the responses run against
it with their own (continued) positions, as generation does. Under autograd the indexing's backward
adds the n responses' gradients into the one prompt forward, so gradients equal the plain path's.

Transformers drops key/value caches while gradient checkpointing is active in training, so the
update takes this path only without checkpointing; no-grad passes (old and reference log-probs)
always can.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from verl.models.logprobs import capture_lm_head_input


@dataclass
class PromptGroups:
    """Rows that share a prompt: `first_rows` (G,) one row per distinct prompt, `group_of_row` (B,) in 0..G-1."""

    first_rows: torch.Tensor
    group_of_row: torch.Tensor


def _same_multimodal(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    if a is b:
        return True
    a, b = a or {}, b or {}
    if a.keys() != b.keys():
        return False
    return all(torch.equal(a[key], b[key]) for key in a)


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, multimodal: list[dict] | None) -> PromptGroups:
    """Runs of consecutive rows with the same prompt tokens, mask and images.

    Only consecutive rows are grouped (a rollout keeps a prompt's samples adjacent); equal token ids
    alone are not enough, since two images of one size give the same placeholder tokens.
    """
    rows = prompt_ids.shape[0]
    group_of_row = torch.zeros(rows, dtype=torch.long)
    first_rows = [0]
    for row in range(1, rows):
        first = first_rows[-1]
        same = (
            torch.equal(prompt_ids[row], prompt_ids[first])
            and torch.equal(prompt_mask[row], prompt_mask[first])
            and (multimodal is None or _same_multimodal(multimodal[row], multimodal[first]))
        )
        if not same:
            first_rows.append(row)
        group_of_row[row] = len(first_rows) - 1
    return PromptGroups(torch.tensor(first_rows, dtype=torch.long), group_of_row)


def shared_prompt_hidden(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    response_length: int,
    groups: PromptGroups,
    prompt_multimodal: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM head's inputs (B, T, H) that predict each response token, and the head's weight (V, H).

    Args:
        input_ids, attention_mask: (B, P + T) left-padded prompt then right-padded response, on the model's device.
        position_ids: (B, L) text positions or (3, B, L) 3-D rope positions, on the model's device.
        response_length: T.
        groups: which rows share a prompt (`prompt_groups`).
        prompt_multimodal: pixel values and grids of the distinct prompts' images (the `first_rows` only).
    """
    prompt_length = input_ids.shape[1] - response_length
    first = groups.first_rows.to(input_ids.device)
    index = groups.group_of_row.to(input_ids.device)
    with capture_lm_head_input(model) as captured:
        prompt_out = model(
            input_ids=input_ids[first, :prompt_length],
            attention_mask=attention_mask[first, :prompt_length],
            position_ids=position_ids[..., first, :prompt_length],
            use_cache=True,
            logits_to_keep=1,
            **prompt_multimodal,
        )
        cache = prompt_out.past_key_values
        if cache is None:
            raise RuntimeError(
                f"{type(model).__name__} returned no key/value cache (gradient checkpointing in training drops it); "
                "shared-prompt forwards need it"
            )
        # `reorder_cache` (beam search's row selection) covers every layer kind, the linear-attention
        # layers' convolution and recurrent states included; `batch_select_indices` skips those.
        cache.reorder_cache(index)
        model(
            input_ids=input_ids[:, prompt_length:],
            attention_mask=attention_mask,
            position_ids=position_ids[..., prompt_length:],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=response_length,
        )
    if len(captured.hidden) != 2:
        raise RuntimeError(
            f"expected the LM head to run twice (prompt, responses), it ran {len(captured.hidden)} times"
        )
    last_prompt, responses = captured.hidden
    weight = captured.weight[1]
    # The prompt's last position predicts the first response token; each response position the next.
    hidden = torch.cat([last_prompt[index], responses[:, :-1]], dim=1)
    return hidden, weight
