"""Sample accounting: which dataset rows a step trained on, and which samples it leaves out.

`rows.jsonl` (verl/utils/tracking.py) records, per step, the dataset row of each group trained on
and, by reason, the rows drawn but left out, so a resumed run can be shown to neither skip nor
repeat data.
"""

from __future__ import annotations

import numpy as np

from verl.protocol import DataProto


def groups_left_out(uids: np.ndarray, bad_uids: set[str], world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which samples leave the step, as two boolean masks over `uids` (one group id per sample):
    the samples of the groups in `bad_uids`, and those of the intact groups also left out so the
    samples kept divide by `world_size` (the update shares each mini-batch out over the workers).
    The intact groups go last first, while more than one group is kept."""
    bad = np.array([str(uid) in bad_uids for uid in uids], dtype=bool)
    trimmed = np.zeros(len(uids), dtype=bool)
    kept_uids = list(dict.fromkeys(str(uid) for uid, left_out in zip(uids, bad, strict=True) if not left_out))
    while int((~bad & ~trimmed).sum()) % world_size and len(kept_uids) > 1:
        trimmed |= np.array([str(uid) == kept_uids[-1] for uid in uids], dtype=bool)
        kept_uids.pop()
    return bad, trimmed


def group_rows(batch: DataProto, selected: np.ndarray | None = None) -> list[int]:
    """The dataset row of each group in the batch (one per prompt), in batch order; with `selected`
    (a boolean mask over the samples), of the groups of the selected samples only."""
    nt = batch.non_tensor_batch
    if "row_index" not in nt:
        return []
    rows: dict[str, int] = {}  # insertion-ordered: groups in batch order
    for i, (uid, row) in enumerate(zip(nt["uid"], nt["row_index"], strict=True)):
        if selected is None or selected[i]:
            rows.setdefault(str(uid), int(row))
    return list(rows.values())
