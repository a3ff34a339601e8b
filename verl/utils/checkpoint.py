"""Checkpoint folders: `<root>/global_step_<N>/`, written atomically, found again on resume."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable

STEP_DIR = re.compile(r"^global_step_(\d+)$")
TRACKER_FILE = "latest_global_step.txt"
logger = logging.getLogger(__name__)


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


def write_trainer_state(folder: str, state: dict) -> None:
    """The file that marks a checkpoint complete: write it last."""
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump(state, f, indent=2)


def save_and_prune(root: str, step: int, keep: int, write: Callable[[str], None]) -> str:
    """`save_atomically`, then keep only the newest `keep` checkpoints (keep <= 0 keeps all)."""
    start = time.monotonic()
    path = save_atomically(root, step, write)
    logger.info("saved %s in %.1f s", path, time.monotonic() - start)
    for removed in remove_old_checkpoints(root, keep):
        logger.info("removed old checkpoint %s", removed)
    return path


def find_resume_checkpoint(root: str, load_path: str | None, find_last: bool) -> tuple[str, dict] | None:
    """The checkpoint to resume from (explicit path, else the latest under `root`) and its trainer state."""
    path = load_path
    if path is None and find_last:
        path = latest_checkpoint(root)
    if path is None:
        return None
    state_file = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"trainer.load_checkpoint_path={path}: no trainer_state.json (incomplete checkpoint?)")
    with open(state_file) as f:
        return path, json.load(f)
