"""Checkpoint folders: `<root>/global_step_<N>/`, written atomically, found again on resume."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable

STEP_DIR = re.compile(r"^global_step_(\d+)$")
TRACKER_FILE = "latest_global_step.txt"


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `root` as (step, path), oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = STEP_DIR.match(name)
        if match and os.path.isfile(os.path.join(root, name, "trainer_state.json")):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def latest_checkpoint(root: str) -> str | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


def save_atomically(root: str, step: int, write: Callable[[str], None]) -> str:
    """Call `write(tmp_dir)` and then rename it to `global_step_<step>`: a checkpoint is complete or absent.

    `write` must create `trainer_state.json` last; a crash mid-write leaves only a temporary folder,
    which the next save removes.
    """
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"global_step_{step}")
    tmp = os.path.join(root, f".tmp_global_step_{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    tracker_tmp = os.path.join(root, TRACKER_FILE + ".tmp")
    with open(tracker_tmp, "w") as f:
        f.write(str(step))
    os.replace(tracker_tmp, os.path.join(root, TRACKER_FILE))
    return final


def remove_old_checkpoints(root: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps all); returns what was removed."""
    if keep <= 0:
        return []
    removed = []
    for _, path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path)
        removed.append(path)
    return removed
