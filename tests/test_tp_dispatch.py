"""Dispatch over tensor-parallel groups: rows shared out over groups, the same rows to every rank of
a group, each group's answer taken once and put back in the caller's order."""

from __future__ import annotations

import pytest
import torch

from verl.protocol import DataProto
from verl.single_controller.dispatch import merge_from_dp, merge_from_tp_groups, split_by_dp, split_by_tp_groups


def batch_with_lengths(lengths: list[int]) -> DataProto:
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return DataProto.from_dict({"attention_mask": mask, "row": torch.arange(len(lengths))})


def test_every_rank_of_a_group_gets_its_groups_rows_and_the_groups_split_the_batch():
    data = batch_with_lengths([1, 9, 2, 8, 3, 7, 4, 6])
    shards, _ = split_by_tp_groups(data, world_size=4, tp_size=2)
    assert len(shards) == 4
    rows = [shard.batch["row"].tolist() for shard in shards]
    assert rows[0] == rows[1] and rows[2] == rows[3]  # ranks 0,1 share an engine; so do 2,3
    assert sorted(rows[0] + rows[2]) == list(range(8))  # the two groups split the batch, no overlap
    # Balanced by tokens over the groups, exactly as a data-parallel split over 2 ranks would be.
    dp_shards, _ = split_by_dp(data, 2)
    assert rows[0] == dp_shards[0].batch["row"].tolist() and rows[2] == dp_shards[1].batch["row"].tolist()


def test_the_groups_answers_are_gathered_once_each_in_the_callers_order():
    data = batch_with_lengths([5, 1, 4, 2, 3, 3])
    shards, split = split_by_tp_groups(data, world_size=6, tp_size=3)
    # Each rank answers n=2 samples per prompt, tagged with its rank; a group's ranks agree on rows.
    outputs = []
    for rank, shard in enumerate(shards):
        out = shard.repeat(2)
        out.batch["rank"] = torch.full((len(out),), rank)
        outputs.append(out)
    merged = merge_from_tp_groups(outputs, split, tp_size=3)
    assert merged.batch["row"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # 12 rows: not 36
    assert set(merged.batch["rank"].tolist()) <= {0, 3}  # only each group's first rank is read


def test_tp_size_one_is_the_data_parallel_split():
    data = batch_with_lengths([3, 1, 2])
    shards, split = split_by_tp_groups(data, world_size=2, tp_size=1)
    dp_shards, dp_split = split_by_dp(data, 2)
    assert [s.batch["row"].tolist() for s in shards] == [s.batch["row"].tolist() for s in dp_shards]
    assert split.pad_size == dp_split.pad_size == 1
    assert merge_from_tp_groups(shards, split, 1).batch["row"].tolist() == [0, 1, 2]
    assert merge_from_dp(dp_shards, dp_split).batch["row"].tolist() == [0, 1, 2]


def test_an_odd_batch_is_padded_per_group_and_the_padding_dropped():
    shards, split = split_by_tp_groups(batch_with_lengths([3, 1, 2]), world_size=4, tp_size=2)
    assert [len(s) for s in shards] == [2, 2, 2, 2] and split.pad_size == 1
    assert merge_from_tp_groups(shards, split, 2).batch["row"].tolist() == [0, 1, 2]


def test_groups_that_do_not_divide_the_workers_are_refused():
    with pytest.raises(ValueError, match="groups of 3 ranks do not divide 4 workers"):
        split_by_tp_groups(batch_with_lengths([1, 2]), world_size=4, tp_size=3)


def test_ranks_of_a_group_that_disagree_are_an_error_not_a_silent_pick():
    shards, split = split_by_tp_groups(batch_with_lengths([1, 2, 3, 4]), world_size=2, tp_size=2)
    with pytest.raises(ValueError, match="rank 1 returned 2 rows, its group's first rank 0 returned 4"):
        merge_from_tp_groups([shards[0], shards[1][:2]], split, 2)
