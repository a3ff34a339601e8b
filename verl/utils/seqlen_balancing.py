"""Spreading a batch's rows over data-parallel ranks so that every rank gets a similar number of tokens.

A rank's forward/backward time grows with its tokens, and every step waits for the slowest rank;
handing out rows in their original order can give one rank all the long responses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def balanced_partitions(token_counts: Sequence[int], parts: int) -> list[list[int]]:
    """Split the row indices into `parts` groups of equal size whose token sums are as even as a
    greedy pass makes them: rows from the longest down each go to the lightest group that still
    has room. `len(token_counts)` must be a multiple of `parts`; each group comes back sorted."""
    if parts < 1 or len(token_counts) % parts:
        raise ValueError(f"balanced_partitions: {len(token_counts)} rows cannot form {parts} groups of equal size")
    capacity = len(token_counts) // parts
    groups: list[list[int]] = [[] for _ in range(parts)]
    sums = [0] * parts
    # Stable sort: equal counts keep their order, so the result is deterministic.
    for row in sorted(range(len(token_counts)), key=lambda i: -token_counts[i]):
        open_groups = [g for g in range(parts) if len(groups[g]) < capacity]
        lightest = min(open_groups, key=lambda g: sums[g])
        groups[lightest].append(row)
        sums[lightest] += int(token_counts[row])
    return [sorted(group) for group in groups]


def balanced_dp_order(token_counts: Sequence[int], dp_size: int, block_size: int | None = None) -> np.ndarray:
    """A permutation of the rows such that cutting the reordered batch into `dp_size` equal
    consecutive chunks gives every rank a token-balanced share of each block.

    Blocks are consecutive runs of `block_size` rows (the whole batch when None; the last run may
    be shorter) that must stay together, such as the mini-batches of one optimizer step: rank r's
    chunk holds its share of block 0, then its share of block 1, and so on, so splitting a chunk
    into pieces of `block_size / dp_size` rows recovers exactly the rows of each block.
    """
    rows = len(token_counts)
    block_size = block_size or max(rows, 1)
    blocks = [(start, min(start + block_size, rows)) for start in range(0, rows, block_size)]
    if dp_size < 1 or any((end - start) % dp_size for start, end in blocks):
        raise ValueError(
            f"balanced_dp_order: {rows} rows in blocks of {block_size} cannot be shared evenly by {dp_size} ranks"
        )
    counts = [int(c) for c in token_counts]
    per_rank: list[list[int]] = [[] for _ in range(dp_size)]
    for start, end in blocks:
        for rank, group in enumerate(balanced_partitions(counts[start:end], dp_size)):
            per_rank[rank].extend(start + i for i in group)
    return np.array([row for rank_rows in per_rank for row in rank_rows], dtype=np.int64)
