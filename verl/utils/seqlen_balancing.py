"""Spreading a batch's rows over data-parallel ranks so that every rank gets a similar number of tokens.

A rank's forward/backward time grows with its tokens, and every step waits for the slowest rank;
handing out rows in their original order can give one rank all the long responses.

With group keys (a GRPO group: the n responses of one prompt, equal `uid`s on consecutive rows)
whole groups are balanced instead of rows, so a shared-prompt forward (verl/models/shared_prompt.py)
still finds each group's rows together on one rank. Every rank must still get the same number of
rows of each block (a mini-batch is split evenly over the ranks); where whole groups cannot do that,
groups are cut into the largest equal pieces that can (`group_piece_size`), one row at the least.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

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


def _blocks(rows: int, dp_size: int, block_size: int | None) -> list[tuple[int, int]]:
    """(start, end) of each block: consecutive runs of `block_size` rows (the whole batch when None)."""
    block_size = block_size or max(rows, 1)
    blocks = [(start, min(start + block_size, rows)) for start in range(0, rows, block_size)]
    if dp_size < 1 or any((end - start) % dp_size for start, end in blocks):
        raise ValueError(
            f"balanced_dp_order: {rows} rows in blocks of {block_size} cannot be shared evenly by {dp_size} ranks"
        )
    return blocks


def group_runs(keys: Sequence[Hashable], start: int, end: int) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive rows with equal keys within rows [start, end)."""
    runs: list[tuple[int, int]] = []
    for row in range(start, end):
        if runs and keys[row] == keys[runs[-1][0]]:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


def group_piece_size(run_sizes: Sequence[int], rows_per_rank: int) -> int:
    """The largest piece size that cuts every run into equal pieces and fills every rank with whole
    pieces: gcd(rows_per_rank, *run_sizes). Equal to the group size when whole groups fit (e.g. 16
    groups of 8 over 4 ranks: 32 rows each, pieces of 8); 4 groups of 8 over 8 ranks: pieces of 4."""
    return math.gcd(rows_per_rank, *run_sizes)


def _block_runs(
    rows: int, dp_size: int, block_size: int | None, group_keys: Sequence[Hashable] | None
) -> list[tuple[list[tuple[int, int]], int]]:
    """Per block: its runs of equal keys (single rows without keys) and the piece size they are cut to."""
    out = []
    for start, end in _blocks(rows, dp_size, block_size):
        if group_keys is None:
            out.append(([(row, row + 1) for row in range(start, end)], 1))
        else:
            runs = group_runs(group_keys, start, end)
            out.append((runs, group_piece_size([b - a for a, b in runs], (end - start) // dp_size)))
    return out


def dp_pieces(
    rows: int, dp_size: int, block_size: int | None = None, group_keys: Sequence[Hashable] | None = None
) -> list[list[tuple[int, int]]]:
    """Per block, the (start, end) row ranges that go to one rank as a unit: single rows without
    `group_keys`, else each run of equal keys cut into pieces of `group_piece_size` rows (every
    piece of a block has the same size, so equal piece counts give equal row counts)."""
    return [
        [(a + k, min(a + k + size, b)) for a, b in runs for k in range(0, b - a, size)]
        for runs, size in _block_runs(rows, dp_size, block_size, group_keys)
    ]


def cut_groups(rows: int, dp_size: int, block_size: int | None, group_keys: Sequence[Hashable]) -> tuple[int, int]:
    """(groups cut into several pieces, all groups) when `balanced_dp_order` shares out these rows;
    a group straddling two blocks counts once per block."""
    block_runs = _block_runs(rows, dp_size, block_size, group_keys)
    cut = sum(1 for runs, size in block_runs for a, b in runs if b - a > size)
    return cut, sum(len(runs) for runs, _ in block_runs)


def balanced_dp_order(
    token_counts: Sequence[int],
    dp_size: int,
    block_size: int | None = None,
    group_keys: Sequence[Hashable] | None = None,
) -> np.ndarray:
    """A permutation of the rows such that cutting the reordered batch into `dp_size` equal
    consecutive chunks gives every rank a token-balanced share of each block.

    Blocks are consecutive runs of `block_size` rows (the whole batch when None; the last run may
    be shorter) that must stay together, such as the mini-batches of one optimizer step: rank r's
    chunk holds its share of block 0, then its share of block 1, and so on, so splitting a chunk
    into pieces of `block_size / dp_size` rows recovers exactly the rows of each block.

    `group_keys` (one per row, e.g. GRPO `uid`s): runs of consecutive equal keys are balanced as
    units (see `dp_pieces`), and a rank's rows keep their original order, so a group's rows stay
    adjacent. Without keys every row is its own unit.
    """
    counts = [int(c) for c in token_counts]
    per_rank: list[list[int]] = [[] for _ in range(dp_size)]
    for block_pieces in dp_pieces(len(counts), dp_size, block_size, group_keys):
        sums = [sum(counts[a:b]) for a, b in block_pieces]
        for rank, chosen in enumerate(balanced_partitions(sums, dp_size)):
            per_rank[rank].extend(row for piece in chosen for row in range(*block_pieces[piece]))
    return np.array([row for rank_rows in per_rank for row in rank_rows], dtype=np.int64)
