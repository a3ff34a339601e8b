"""How one worker-group call reaches the workers and how their answers come back.

A worker class marks each method the controller may call with `@register(Dispatch.<MODE>)`:

- `ONE_TO_ALL`: every rank runs it with the same arguments (collective work: building the model,
  saving, loading); the call returns rank 0's result.
- `DP_COMPUTE`: the one `DataProto` argument is shared out over the data-parallel ranks (balanced by
  token count) and the ranks' outputs are put back together in the caller's row order. A worker
  that names a non-tensor column in the attribute `GROUP_KEY_ATTR` (the actor with shared-prompt
  forwards: `uid`) gets runs of consecutive rows with equal values in it kept together on one rank,
  whole groups balanced by tokens (verl/utils/seqlen_balancing.py).
- `RANK_ZERO`: only rank 0 runs it (work that must happen once and needs no collective).
- `TP_GROUP_COMPUTE`: like `DP_COMPUTE`, but over groups of `tp_size` consecutive ranks that share
  one tensor-parallel engine (SPMD, as vLLM's external launcher runs it): the batch is shared out
  over the groups, every rank of a group receives its group's rows, and each group's answer is
  taken once (from its first rank). A worker states its group size in the attribute named by
  `TP_SIZE_ATTR`; without it the groups have one rank and this is `DP_COMPUTE`.

The in-process group ignores the marks (one worker gets everything); the Ray group follows them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

import numpy as np

from verl.protocol import DataProto
from verl.utils.seqlen_balancing import balanced_dp_order, cut_groups

logger = logging.getLogger(__name__)

DISPATCH_ATTR = "_dispatch_mode"
TP_SIZE_ATTR = "dispatch_tp_size"
"""Worker attribute: ranks per tensor-parallel group for `TP_GROUP_COMPUTE` (default 1)."""
GROUP_KEY_ATTR = "dispatch_group_key"
"""Worker attribute: a non-tensor column whose runs of equal values `DP_COMPUTE` keeps on one rank
(default None: rows are balanced one by one)."""
_warned: set[str] = set()
Method = TypeVar("Method", bound=Callable)


class Dispatch(Enum):
    ONE_TO_ALL = "one_to_all"
    DP_COMPUTE = "dp_compute"
    RANK_ZERO = "rank_zero"
    TP_GROUP_COMPUTE = "tp_group_compute"


def register(dispatch_mode: Dispatch) -> Callable[[Method], Method]:
    """Mark a worker method as callable through a worker group, with how its calls are dispatched."""

    def mark(method: Method) -> Method:
        setattr(method, DISPATCH_ATTR, dispatch_mode)
        return method

    return mark


def registered_methods(worker_cls: type) -> dict[str, Dispatch]:
    """Name -> dispatch mode of every `@register`ed method of `worker_cls`."""
    return {
        name: getattr(member, DISPATCH_ATTR)
        for name, member in inspect.getmembers(worker_cls, inspect.isfunction)
        if hasattr(member, DISPATCH_ATTR)
    }


@dataclass(frozen=True)
class DataParallelSplit:
    """How a batch was shared out, so the outputs can be put back in the caller's row order."""

    order: np.ndarray
    """Row order (of the padded batch) whose consecutive equal chunks went to ranks 0, 1, ..."""
    pad_size: int
    """Rows appended so the batch divides by the number of ranks."""


def split_by_dp(
    data: DataProto, dp_size: int, group_key: str | None = None
) -> tuple[list[DataProto], DataParallelSplit]:
    """One shard per rank, each with a similar number of tokens (`attention_mask` sums).

    `meta_info["mini_batch_size"]`, when present, marks runs of consecutive rows that form one
    optimizer step: each run is shared out on its own so every step still sees exactly its rows,
    and such a batch is never padded (a padded row would count twice in the gradient).

    `group_key`: a non-tensor column (GRPO `uid`); runs of consecutive rows with equal values stay
    on one rank where every rank's share of each mini-batch can be made of whole runs, and are cut
    into equal pieces otherwise (logged once: see `seqlen_balancing.group_piece_size`). Ignored
    when the batch has no such column.
    """
    block_size = data.meta_info.get("mini_batch_size")
    if block_size is None:
        data, pad_size = data.pad_to_divisor(dp_size)
    else:
        pad_size = 0
    if "attention_mask" in data.batch:
        token_counts = data.batch["attention_mask"].sum(-1).tolist()
    else:
        token_counts = [1] * len(data)
    keys = data.non_tensor_batch.get(group_key) if group_key is not None else None
    if keys is not None:
        # Padding rows copy rows 0, 1, ...: give them keys of their own, so a copy never joins the
        # group of the row it copies (they may end up adjacent).
        keys = keys.tolist()[: len(keys) - pad_size] + [("padding", row) for row in range(pad_size)]
        _warn_cut_groups(len(keys), dp_size, block_size, keys, group_key)
    order = balanced_dp_order(token_counts, dp_size, block_size, keys)
    return data.reorder(order).chunk(dp_size), DataParallelSplit(order, pad_size)


def _warn_cut_groups(rows: int, dp_size: int, block_size: int | None, keys: list, group_key: str) -> None:
    """Say once per batch layout when groups must be cut across ranks (each piece encodes the prompt again)."""
    cut, groups = cut_groups(rows, dp_size, block_size, keys)
    message = (
        f"{cut} of {groups} groups (rows with equal `{group_key}`) are cut across the {dp_size} data-parallel "
        f"ranks: every rank must get {(block_size or rows) // dp_size} rows of each "
        f"{'mini-batch' if block_size else 'batch'} of {block_size or rows}, which whole groups cannot fill, so "
        "shared-prompt forwards encode such a prompt once per piece; make worker.actor.global_batch_size (and "
        "data.rollout_batch_size) a multiple of the number of workers, trainer.nnodes x trainer.n_gpus_per_node"
    )
    if cut and message not in _warned:
        _warned.add(message)
        logger.warning(message)


def merge_from_dp(outputs: list[DataProto], split: DataParallelSplit) -> DataProto:
    """The ranks' outputs concatenated and put back in the caller's row order, padding removed.

    An output may have several rows per input row (n samples per prompt, kept adjacent); an output
    without rows (metrics only in `meta_info`) is returned as rank 0 gave it.
    """
    merged = DataProto.concat(outputs)
    if len(merged) == 0:
        return merged
    input_rows = len(split.order)
    if len(merged) % input_rows:
        raise ValueError(
            f"merge_from_dp: {len(merged)} output rows are not a whole multiple of {input_rows} input rows"
        )
    per_row = len(merged) // input_rows
    position = np.argsort(split.order)  # where each original row went
    rows = (position[:, None] * per_row + np.arange(per_row)).reshape(-1)
    return merged[rows].unpad(split.pad_size * per_row)


def check_tp_size(world_size: int, tp_size: int) -> None:
    if tp_size < 1 or world_size % tp_size:
        raise ValueError(
            f"tensor-parallel groups of {tp_size} ranks do not divide {world_size} workers "
            "(worker.rollout.tensor_parallel_size must divide the number of workers)"
        )


def split_by_tp_groups(
    data: DataProto, world_size: int, tp_size: int, group_key: str | None = None
) -> tuple[list[DataProto], DataParallelSplit]:
    """One shard per rank: the batch split over the `world_size // tp_size` groups (as `split_by_dp`
    over that many ranks), each group's shard given to every one of its `tp_size` consecutive ranks.

    vLLM's tensor-parallel ranks run the same schedule in lockstep, so they must see identical
    prompts (and seeds, which follow the row order).
    """
    check_tp_size(world_size, tp_size)
    group_shards, split = split_by_dp(data, world_size // tp_size, group_key)
    return [group_shards[rank // tp_size] for rank in range(world_size)], split


def merge_from_tp_groups(outputs: list[DataProto], split: DataParallelSplit, tp_size: int) -> DataProto:
    """The groups' outputs (taken from each group's first rank) put back in the caller's row order."""
    check_tp_size(len(outputs), tp_size)
    leaders = outputs[::tp_size]
    for group, leader in enumerate(leaders):
        for rank in range(group * tp_size + 1, (group + 1) * tp_size):
            if len(outputs[rank]) != len(leader):
                raise ValueError(
                    f"merge_from_tp_groups: rank {rank} returned {len(outputs[rank])} rows, its group's first rank "
                    f"{group * tp_size} returned {len(leader)}; the ranks of a tensor-parallel group must agree"
                )
    return merge_from_dp(leaders, split)
