"""Checks a run makes before any model loads, so that a problem that would stop it after minutes of
loading (or after its first step) stops it at once, naming the path: output folders writable, room
for one checkpoint, data files readable and non-empty.

Each check raises `PreflightError` with a message that names the path and the cause; the trainers
turn it into a config error naming the key.
"""

from __future__ import annotations

import glob
import os
import shutil
import uuid

# A checkpoint holds the weights, the optimizer's two Adam moments and small files: about three
# times the weights as the model folder stores them.
CHECKPOINT_SIZE_FACTOR = 3
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


class PreflightError(RuntimeError):
    """A check before loading failed; the message names the path and why."""


def check_writable_folder(path: str) -> None:
    """`path` exists (created if missing) and a file can be written and removed in it."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise PreflightError(f"cannot create the folder {path}: {exc.strerror or exc}") from None
    probe = os.path.join(path, f".write_check_{uuid.uuid4().hex[:8]}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise PreflightError(f"the folder {path} is not writable: {exc.strerror or exc}") from None


def model_weights_bytes(model_path: str) -> int | None:
    """Bytes of the weight files in a local model folder; None when it is not a local folder."""
    if not os.path.isdir(model_path):
        return None
    files = {f for pattern in WEIGHT_PATTERNS for f in glob.glob(os.path.join(model_path, pattern))}
    return sum(os.path.getsize(f) for f in files) or None


def check_checkpoint_space(folder: str, model_path: str) -> int | None:
    """Free space under `folder` for one checkpoint of the model in `model_path`, estimated as
    CHECKPOINT_SIZE_FACTOR x its weight files; returns the estimate (None when the model is not a
    local folder, so nothing could be estimated)."""
    weights = model_weights_bytes(model_path)
    if weights is None:
        return None
    needed = CHECKPOINT_SIZE_FACTOR * weights
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise PreflightError(
            f"not enough disk space for one checkpoint under {folder}: about {_size(needed)} needed "
            f"({CHECKPOINT_SIZE_FACTOR} x the {_size(weights)} of weights in {model_path}: weights and optimizer "
            f"state), {_size(free)} free"
        )
    return needed


def check_data_files(spec: str, files: list[str]) -> None:
    """Each local data file of `spec` is readable and holds at least one row (a parquet file's row
    count is read from its footer, so this is cheap for large files)."""
    for path in files:
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise PreflightError(f"data file {path} (of {spec!r}) cannot be read: {exc.strerror or exc}") from None
        if size == 0:
            raise PreflightError(f"data file {path} (of {spec!r}) is empty (0 bytes)")
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            try:
                rows = pq.ParquetFile(path).metadata.num_rows
            except Exception as exc:  # pyarrow raises several types for damaged files
                raise PreflightError(
                    f"data file {path} (of {spec!r}) is not a readable parquet file: {type(exc).__name__}: {exc}"
                ) from None
            if rows == 0:
                raise PreflightError(f"data file {path} (of {spec!r}) is a parquet file with no rows")
        else:
            with open(path, "rb") as f:
                if not f.read(1 << 16).strip():
                    raise PreflightError(f"data file {path} (of {spec!r}) holds only whitespace: no rows")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
