"""Token balancing across data-parallel ranks: equal row counts, even token sums, blocks and GRPO groups kept whole."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verl.utils.seqlen_balancing import balanced_dp_order, balanced_partitions, cut_groups, group_piece_size


def test_hand_computed_partition():
    # Longest first, each to the lightest group with room: 10->A, 9->B, 8->B (17), 7->A (17),
    # 2->A (tie goes to the first group; A is now full at 19), 1->B (18).
    assert balanced_partitions([10, 9, 8, 7, 2, 1], 2) == [[0, 3, 4], [1, 2, 5]]


def test_sorted_lengths_are_spread_instead_of_chunked():
    counts = [1, 1, 1, 1, 9, 9, 9, 9]  # consecutive chunks would give ranks 4 and 36 tokens
    order = balanced_dp_order(counts, 2)
    shares = [sum(counts[i] for i in chunk) for chunk in np.split(order, 2)]
    assert shares == [20, 20]


@settings(max_examples=200, deadline=None)
@given(
    parts=st.integers(1, 4),
    per_part=st.integers(1, 6),
    data=st.data(),
)
def test_groups_are_equal_sized_cover_every_row_and_differ_by_at_most_one_row(parts, per_part, data):
    counts = data.draw(st.lists(st.integers(1, 1000), min_size=parts * per_part, max_size=parts * per_part))
    groups = balanced_partitions(counts, parts)
    assert all(len(group) == per_part for group in groups)
    assert sorted(i for group in groups for i in group) == list(range(len(counts)))
    sums = [sum(counts[i] for i in group) for group in groups]
    assert max(sums) - min(sums) <= max(counts)


def test_blocks_stay_whole_and_in_order_on_every_rank():
    # Two blocks (optimizer steps) of 4 rows over 2 ranks: each rank gets 2 rows of block 0, then 2 of block 1.
    counts = [5, 1, 1, 5, 2, 8, 8, 2]
    order = balanced_dp_order(counts, dp_size=2, block_size=4)
    assert sorted(order.tolist()) == list(range(8))
    for chunk in np.split(order, 2):
        first, second = chunk[:2], chunk[2:]
        assert set(first) <= {0, 1, 2, 3} and set(second) <= {4, 5, 6, 7}
        assert sum(counts[i] for i in first) == 6 and sum(counts[i] for i in second) == 10


def test_a_shorter_last_block_is_shared_too():
    order = balanced_dp_order([3, 1, 4, 1, 5, 9], dp_size=2, block_size=4)
    rank0, rank1 = np.split(order, 2)
    assert set(rank0[:2]) | set(rank1[:2]) == {0, 1, 2, 3}
    assert {rank0[2], rank1[2]} == {4, 5}


@pytest.mark.parametrize(("rows", "dp_size", "block_size"), [(6, 4, None), (8, 2, 3), (5, 2, 4)])
def test_rows_that_cannot_be_shared_evenly_are_refused(rows, dp_size, block_size):
    with pytest.raises(ValueError, match="cannot be shared evenly"):
        balanced_dp_order([1] * rows, dp_size, block_size)


# --- whole GRPO groups (group keys) ---------------------------------------------------------------
def groups_of(sizes: list[int]) -> list[str]:
    """One key per row: group g's rows adjacent, as a rollout lays out the n samples of a prompt."""
    return [f"uid{g}" for g, size in enumerate(sizes) for _ in range(size)]


def test_whole_groups_go_to_one_rank_each_balanced_by_their_tokens():
    # Four groups of 2 over 2 ranks, token sums 20, 4, 16, 8; longest first to the lightest rank:
    # 20 -> A, 16 -> B, 8 -> B (24), 4 -> A (24).
    counts = [10, 10, 2, 2, 8, 8, 4, 4]
    keys = groups_of([2, 2, 2, 2])
    order = balanced_dp_order(counts, 2, group_keys=keys)
    chunks = [chunk.tolist() for chunk in np.split(order, 2)]
    assert sorted(chunks) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # Row balancing reaches the same sums only by tearing groups apart.
    rows = [chunk.tolist() for chunk in np.split(balanced_dp_order(counts, 2), 2)]
    assert any(len({keys[r] for r in chunk}) > 2 for chunk in rows)


def test_groups_that_cannot_fill_the_ranks_whole_are_cut_into_equal_pieces():
    # 4 groups of 8 rows over 8 ranks: 4 rows each, so every group is cut into 2 pieces of 4.
    keys = groups_of([8] * 4)
    order = balanced_dp_order(list(range(1, 33)), 8, block_size=32, group_keys=keys)
    for chunk in np.split(order, 8):
        assert len({keys[r] for r in chunk}) == 1 and chunk.tolist() == sorted(chunk.tolist())
    assert cut_groups(32, 8, 32, keys) == (4, 4)
    assert cut_groups(32, 4, 32, keys) == (0, 4)
    assert group_piece_size([8, 8, 8, 8], 4) == 4 and group_piece_size([8, 8], 6) == 2


@settings(max_examples=200, deadline=None)
@given(dp_size=st.integers(1, 4), data=st.data())
def test_group_keys_keep_every_block_even_and_groups_whole_when_they_fit(dp_size, data):
    groups_per_block = data.draw(st.integers(1, 3)) * dp_size
    n = data.draw(st.integers(1, 4))
    blocks = data.draw(st.integers(1, 3))
    rows = groups_per_block * n * blocks
    keys = groups_of([n] * (groups_per_block * blocks))
    counts = data.draw(st.lists(st.integers(1, 100), min_size=rows, max_size=rows))
    block = groups_per_block * n
    order = balanced_dp_order(counts, dp_size, block, keys)
    assert sorted(order.tolist()) == list(range(rows))
    per_block = block // dp_size
    for chunk in np.split(order, dp_size):
        for b in range(blocks):
            piece = chunk[b * per_block : (b + 1) * per_block]
            assert set(piece) <= set(range(b * block, (b + 1) * block))  # each mini-batch's own rows
        groups = {keys[r] for r in chunk}
        assert sum(keys.count(k) for k in groups) == len(chunk)  # only whole groups
