"""Micro-batches of a fixed row count, or by a per-device token budget (dynamic batching).

Token-budget micro-batches are consecutive runs of rows: rows are never reordered, so outputs come
back in row order by plain concatenation, and the update's loss (normalised by the whole
mini-batch's token count, not the micro-batch's) gives the same gradient for any grouping.
Under FSDP every rank must run the same number of forwards (each one gathers parameters
collectively), so the count is agreed across ranks (the largest wins) and a rank with fewer groups
splits its heaviest ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from verl.protocol import DataProto


def row_token_counts(data: DataProto) -> list[int]:
    """Real (attended) tokens per row: prompt and response, padding excluded."""
    return data.batch["attention_mask"].sum(-1).tolist()


def token_budget_groups(counts: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive rows packed greedily while their token sum stays within `max_tokens`.

    A row longer than the budget forms a group of its own (it cannot be split).
    """
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for row, count in enumerate(counts):
        if current and used + count > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(row)
        used += count
    if current:
        groups.append(current)
    return groups


def split_to_count(groups: list[list[int]], counts: list[int], target: int) -> list[list[int]]:
    """Split the heaviest multi-row group at its token midpoint until there are `target` groups.

    Needs `target` <= the number of rows; order is kept (the halves stay consecutive).
    """
    groups = [list(g) for g in groups]
    while len(groups) < target:
        splittable = [i for i, g in enumerate(groups) if len(g) > 1]
        if not splittable:
            raise ValueError(f"cannot form {target} non-empty micro-batches from {sum(map(len, groups))} rows")
        i = max(splittable, key=lambda j: sum(counts[r] for r in groups[j]))
        group = groups[i]
        half = sum(counts[r] for r in group) / 2
        running, cut = 0, 1
        for k, row in enumerate(group[:-1]):
            running += counts[row]
            cut = k + 1
            if running >= half:
                break
        groups[i : i + 1] = [group[:cut], group[cut:]]
    return groups


def _max_across_ranks(value: int) -> int:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def micro_batches(data: DataProto, micro_batch_size: int, dynamic: bool, max_tokens: int) -> list[DataProto]:
    """Consecutive pieces of `data`: `micro_batch_size` rows each, or (dynamic) up to `max_tokens` tokens each.

    With `dynamic`, every rank of a distributed run returns the same number of pieces.
    """
    if not dynamic:
        return data.split(micro_batch_size)
    counts = row_token_counts(data)
    groups = token_budget_groups(counts, max_tokens)
    target = _max_across_ranks(len(groups))
    groups = split_to_count(groups, counts, target)
    return [data[group[0] : group[-1] + 1] for group in groups]
