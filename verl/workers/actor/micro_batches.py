"""Micro-batches of a fixed row count, or by a per-device token budget (dynamic batching).

Token-budget micro-batches are consecutive runs of rows: rows are never reordered, so outputs come
back in row order by plain concatenation, and the update's loss (normalised by the whole
mini-batch's token count, not the micro-batch's) gives the same gradient for any grouping.
Under FSDP every rank must run the same number of forwards (each one gathers parameters
collectively), so the count is agreed across ranks (the largest wins) and a rank with fewer groups
splits its heaviest ones.

With `keep_groups` (shared-prompt forwards) the units packed are runs of consecutive rows with the
same prompt (a GRPO group), never cut: a micro-batch holds as many whole groups as fit in its row
count or token budget, and a group larger than that runs alone, as a row over the token budget
does. Only when ranks must agree on more micro-batches than whole groups can make is a group cut.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from verl.models.shared_prompt import prompt_groups
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


def split_to_count(
    groups: list[list[int]], counts: list[int], target: int, unit_starts: set[int] | None = None
) -> list[list[int]]:
    """Split the heaviest multi-row group at its token midpoint until there are `target` groups.

    `unit_starts`: the rows a cut may fall before (every row when None): the heaviest group that
    has such a row inside it is cut at the first of them past its token midpoint (the last one
    before it, if none is past); only when no group has one is a unit cut, as rows are cut.
    Needs `target` <= the number of rows; order is kept (the halves stay consecutive).
    """
    groups = [list(g) for g in groups]
    while len(groups) < target:
        splittable = [i for i, g in enumerate(groups) if len(g) > 1]
        if not splittable:
            raise ValueError(f"cannot form {target} non-empty micro-batches from {sum(map(len, groups))} rows")
        allowed = unit_starts
        if allowed is not None and not any(row in allowed for i in splittable for row in groups[i][1:]):
            allowed = None  # every group is one unit: cut inside one
        candidates = [i for i in splittable if allowed is None or any(row in allowed for row in groups[i][1:])]
        i = max(candidates, key=lambda j: sum(counts[r] for r in groups[j]))
        group = groups[i]
        half = sum(counts[r] for r in group) / 2
        running, cut = 0, 1
        for k, row in enumerate(group[:-1]):
            running += counts[row]
            if allowed is None or group[k + 1] in allowed:
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


def prompt_run_starts(data: DataProto) -> list[int]:
    """The rows that start a run of consecutive rows sharing one prompt (a GRPO group as a rollout
    lays it out), row 0 first: the groups a shared-prompt forward encodes once (`prompt_groups`)."""
    if len(data) == 0:
        return []
    width = data.batch["responses"].shape[1]
    multimodal = data.non_tensor_batch.get("multi_modal_inputs")
    groups = prompt_groups(
        data.batch["input_ids"][:, :-width],
        data.batch["attention_mask"][:, :-width],
        list(multimodal) if multimodal is not None else None,
    )
    return groups.first_rows.tolist()


def whole_group_micro_batches(
    counts: list[int], starts: list[int], micro_batch_size: int, dynamic: bool, max_tokens: int
) -> list[list[int]]:
    """Row indices of each micro-batch made of whole units (runs starting at `starts`, in order):
    consecutive units packed while their rows stay within `micro_batch_size` (or, `dynamic`, their
    tokens within `max_tokens`); a unit over the limit forms a micro-batch of its own."""
    bounds = [*starts, len(counts)]
    units = [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
    sizes = [sum(counts[r] for r in unit) if dynamic else len(unit) for unit in units]
    limit = max_tokens if dynamic else micro_batch_size
    return [[row for u in packed for row in units[u]] for packed in token_budget_groups(sizes, limit)]


def micro_batches(
    data: DataProto, micro_batch_size: int, dynamic: bool, max_tokens: int, keep_groups: bool = False
) -> list[DataProto]:
    """Consecutive pieces of `data`: `micro_batch_size` rows each, or (dynamic) up to `max_tokens` tokens each.

    With `dynamic` or `keep_groups`, every rank of a distributed run returns the same number of
    pieces. `keep_groups`: pieces of whole prompt groups (see the module's docstring).
    """
    if not dynamic and not keep_groups:
        return data.split(micro_batch_size)
    counts = row_token_counts(data)
    starts = prompt_run_starts(data) if keep_groups else None
    if starts is not None:
        groups = whole_group_micro_batches(counts, starts, micro_batch_size, dynamic, max_tokens)
    else:
        groups = token_budget_groups(counts, max_tokens)
    # Fixed-size pieces of whole groups may differ in number between ranks too (unequal groups).
    target = _max_across_ranks(len(groups))
    groups = split_to_count(groups, counts, target, set(starts) if starts is not None else None)
    return [data[group[0] : group[-1] + 1] for group in groups]
