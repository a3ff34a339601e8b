"""`DataProto`: the batch container passed between the trainer (controller) and the workers.

A batch is a set of rows. Each row's values live in two dicts of columns that share the row axis:

- `batch`: torch tensors (`input_ids`, `attention_mask`, `old_log_probs`, ...), first dim = rows;
- `non_tensor_batch`: numpy arrays, usually `dtype=object` (raw prompts, ground truths, image
  data), first dim = rows;

plus `meta_info`, a plain dict of batch-wide values (temperature, step, ...) that is never split.

Every operation returns a new `DataProto` that shares the column storage with its source where it
can (slices are views, `select` copies no tensors); only `pop` changes `self`. Row order is the
contract: splitting, repeating and reordering move the values of a row together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Index = int | slice | Sequence[int] | Sequence[bool] | np.ndarray | torch.Tensor


def as_object_array(values: Sequence[Any]) -> np.ndarray:
    """A 1-D `dtype=object` array with one element per item of `values`.

    `np.array(values, dtype=object)` would turn a list of equal-length lists into a 2-D array;
    filling an empty array item by item keeps each inner list whole.
    """
    array = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        array[i] = value
    return array


class DataProto:
    """Columns of tensors and numpy arrays with a shared first (row) dimension, plus `meta_info`."""

    def __init__(
        self,
        batch: dict[str, torch.Tensor] | None = None,
        non_tensor_batch: dict[str, np.ndarray] | None = None,
        meta_info: dict[str, Any] | None = None,
    ) -> None:
        self.batch = dict(batch or {})
        self.non_tensor_batch = dict(non_tensor_batch or {})
        self.meta_info = dict(meta_info or {})
        self.check_consistency()

    @classmethod
    def from_dict(
        cls,
        tensors: dict[str, torch.Tensor] | None = None,
        non_tensors: dict[str, np.ndarray | Sequence[Any]] | None = None,
        meta_info: dict[str, Any] | None = None,
    ) -> DataProto:
        """Build a batch; non-tensor columns given as lists become 1-D object arrays."""
        non_tensor_batch = {
            key: value if isinstance(value, np.ndarray) else as_object_array(value)
            for key, value in (non_tensors or {}).items()
        }
        return cls(tensors, non_tensor_batch, meta_info)

    def __len__(self) -> int:
        columns = [*self.batch.values(), *self.non_tensor_batch.values()]
        return columns[0].shape[0] if columns else 0

    def __repr__(self) -> str:
        tensors = ", ".join(f"{k}: {tuple(v.shape)} {v.dtype}" for k, v in self.batch.items())
        arrays = ", ".join(f"{k}: {v.shape} {v.dtype}" for k, v in self.non_tensor_batch.items())
        return f"DataProto(rows={len(self)}, batch={{{tensors}}}, non_tensor_batch={{{arrays}}}, meta_info={sorted(self.meta_info)})"

    def check_consistency(self) -> None:
        """Raise if a column is of the wrong type, has no row axis, or its row count differs."""
        reference: tuple[str, int] | None = None
        for where, columns, kind in (
            ("batch", self.batch, torch.Tensor),
            ("non_tensor_batch", self.non_tensor_batch, np.ndarray),
        ):
            for key, column in columns.items():
                name = f"{where}[{key!r}]"
                if not isinstance(column, kind):
                    raise TypeError(
                        f"DataProto: {name} must be a {kind.__module__}.{kind.__name__}, got {type(column).__name__}"
                    )
                if column.ndim == 0:
                    raise ValueError(f"DataProto: {name} is 0-dimensional; every column needs a row axis")
                if reference is None:
                    reference = (name, column.shape[0])
                elif column.shape[0] != reference[1]:
                    raise ValueError(
                        f"DataProto: {name} has {column.shape[0]} rows but {reference[0]} has {reference[1]}"
                    )

    def _map_columns(
        self, tensor_fn: Callable[[torch.Tensor], torch.Tensor], array_fn: Callable[[np.ndarray], np.ndarray]
    ) -> DataProto:
        """A new batch with `tensor_fn` applied to each tensor and `array_fn` to each array."""
        return DataProto(
            {key: tensor_fn(value) for key, value in self.batch.items()},
            {key: array_fn(value) for key, value in self.non_tensor_batch.items()},
            self.meta_info,
        )

    def __getitem__(self, index: Index) -> DataProto:
        """Rows picked like numpy indexing: an int gives a one-row batch (never a bare row), a slice
        gives views, and an integer array / list / tensor or a boolean mask of length `len(self)`
        gives copies in the order given (repeats allowed)."""
        rows = _normalize_index(index, len(self))
        if isinstance(rows, slice):
            return self._map_columns(lambda t: t[rows], lambda a: a[rows])
        return self._map_columns(lambda t: t[torch.as_tensor(rows, device=t.device)], lambda a: a[rows])

    def select(
        self,
        batch_keys: Iterable[str] | None = None,
        non_tensor_keys: Iterable[str] | None = None,
        meta_keys: Iterable[str] | None = None,
    ) -> DataProto:
        """A batch with only the named columns / meta keys (None keeps all of that kind)."""
        return DataProto(
            _pick(self.batch, batch_keys, "batch"),
            _pick(self.non_tensor_batch, non_tensor_keys, "non_tensor_batch"),
            _pick(self.meta_info, meta_keys, "meta_info"),
        )

    def pop(self, batch_keys: Iterable[str] = (), non_tensor_keys: Iterable[str] = ()) -> DataProto:
        """Remove the named columns from `self` and return them, with a copy of `meta_info`."""
        popped = self.select(batch_keys, non_tensor_keys)
        for key in popped.batch:
            del self.batch[key]
        for key in popped.non_tensor_batch:
            del self.non_tensor_batch[key]
        return popped

    def union(self, other: DataProto) -> DataProto:
        """All columns and meta keys of both; a key present in both must hold equal values."""
        both_have_columns = (self.batch or self.non_tensor_batch) and (other.batch or other.non_tensor_batch)
        if both_have_columns and len(self) != len(other):
            raise ValueError(f"DataProto.union: batches have {len(self)} and {len(other)} rows")
        for where, mine, theirs, equal in (
            ("batch", self.batch, other.batch, _tensors_equal),
            ("non_tensor_batch", self.non_tensor_batch, other.non_tensor_batch, _arrays_equal),
            ("meta_info", self.meta_info, other.meta_info, _values_equal),
        ):
            for key in mine.keys() & theirs.keys():
                if not equal(mine[key], theirs[key]):
                    raise ValueError(f"DataProto.union: {where}[{key!r}] differs between the two batches")
        return DataProto(
            {**self.batch, **other.batch},
            {**self.non_tensor_batch, **other.non_tensor_batch},
            {**self.meta_info, **other.meta_info},
        )

    def split(self, size: int) -> list[DataProto]:
        """Consecutive pieces of `size` rows; the last one holds the remainder."""
        if size < 1:
            raise ValueError(f"DataProto.split: size must be >= 1, got {size}")
        return [self[start : start + size] for start in range(0, len(self), size)]

    def chunk(self, chunks: int) -> list[DataProto]:
        """`chunks` consecutive pieces of equal size (one per worker)."""
        if chunks < 1 or len(self) % chunks:
            raise ValueError(f"DataProto.chunk: {len(self)} rows cannot be split into {chunks} equal chunks")
        size = len(self) // chunks
        return [self[i * size : (i + 1) * size] for i in range(chunks)]

    @staticmethod
    def concat(items: Sequence[DataProto]) -> DataProto:
        """Rows of all items in order; all must have the same columns. `meta_info` is the first item's."""
        if not items:
            raise ValueError("DataProto.concat: nothing to concatenate")
        first = items[0]
        for i, item in enumerate(items[1:], start=1):
            if item.batch.keys() != first.batch.keys() or item.non_tensor_batch.keys() != first.non_tensor_batch.keys():
                raise ValueError(
                    f"DataProto.concat: item {i} has columns {sorted(item.batch) + sorted(item.non_tensor_batch)}, "
                    f"item 0 has {sorted(first.batch) + sorted(first.non_tensor_batch)}"
                )
        return DataProto(
            {key: torch.cat([item.batch[key] for item in items]) for key in first.batch},
            {key: np.concatenate([item.non_tensor_batch[key] for item in items]) for key in first.non_tensor_batch},
            first.meta_info,
        )

    def repeat(self, times: int, interleave: bool = True) -> DataProto:
        """Each row `times` times: interleaved `a a b b` (a prompt's samples stay adjacent) or tiled `a b a b`."""
        if times < 1:
            raise ValueError(f"DataProto.repeat: times must be >= 1, got {times}")
        rows = np.arange(len(self))
        return self[np.repeat(rows, times) if interleave else np.tile(rows, times)]

    def reorder(self, indices: Index) -> DataProto:
        """Rows in the order `indices`, which must be a permutation of `range(len(self))`."""
        rows = _normalize_index(indices, len(self))
        if isinstance(rows, slice) or not np.array_equal(np.sort(rows), np.arange(len(self))):
            raise ValueError(f"DataProto.reorder: indices must be a permutation of range({len(self)})")
        return self[rows]

    def pad_to_divisor(self, divisor: int) -> tuple[DataProto, int]:
        """Append copies of rows 0, 1, ... (cycling) until the row count divides by `divisor`.
        Returns the padded batch and the number of rows added, for `unpad`."""
        if divisor < 1:
            raise ValueError(f"DataProto.pad_to_divisor: divisor must be >= 1, got {divisor}")
        pad_size = -len(self) % divisor
        if pad_size == 0:
            return self[:], 0
        return DataProto.concat([self, self[np.arange(pad_size) % len(self)]]), pad_size

    def unpad(self, pad_size: int) -> DataProto:
        """Drop the last `pad_size` rows added by `pad_to_divisor`."""
        if not 0 <= pad_size <= len(self):
            raise ValueError(f"DataProto.unpad: pad_size must be in [0, {len(self)}], got {pad_size}")
        return self[: len(self) - pad_size]

    def to(self, device: torch.device | str) -> DataProto:
        """Tensors moved to `device`; numpy columns stay on the host."""
        return self._map_columns(lambda t: t.to(device), lambda a: a)


def _normalize_index(index: Index, length: int) -> slice | np.ndarray:
    """A forward slice or a 1-D array of non-negative row numbers, checked against `length`."""
    if isinstance(index, int | np.integer) and not isinstance(index, bool | np.bool_):
        if not -length <= index < length:
            raise IndexError(f"DataProto: row {index} out of range for {length} rows")
        row = int(index) % length
        return slice(row, row + 1)
    if isinstance(index, slice):
        start, stop, step = index.indices(length)
        # torch slicing takes no negative step; such slices become explicit row numbers.
        return slice(start, stop, step) if step > 0 else np.arange(start, stop, step)
    rows = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index)
    if rows.dtype == bool:
        if rows.shape != (length,):
            raise IndexError(f"DataProto: boolean mask has shape {rows.shape}, expected ({length},)")
        return np.flatnonzero(rows)
    if rows.size == 0:
        return np.zeros(0, dtype=np.int64)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        raise IndexError(
            f"DataProto: index must be 1-D integers or a boolean mask, got {rows.dtype} of shape {rows.shape}"
        )
    if rows.min() < -length or rows.max() >= length:
        raise IndexError(f"DataProto: index {rows.tolist()} out of range for {length} rows")
    return rows % max(length, 1)


def _pick(columns: dict[str, Any], keys: Iterable[str] | None, where: str) -> dict[str, Any]:
    if keys is None:
        return dict(columns)
    keys = list(keys)
    missing = [key for key in keys if key not in columns]
    if missing:
        raise KeyError(f"DataProto: {where} has no key(s) {missing}; it has {sorted(columns)}")
    return {key: columns[key] for key in keys}


def _tensors_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device)))


def _arrays_equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a is b:
        return True
    if a.shape != b.shape:
        return False
    if a.dtype != object:
        return np.array_equal(a, b)
    return all(_values_equal(x, y) for x, y in zip(a.ravel(), b.ravel()))


def _values_equal(x: Any, y: Any) -> bool:
    if x is y:
        return True
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
        return isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and _arrays_equal(x, y)
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and _tensors_equal(x, y)
    return bool(x == y)


# --- controller <-> worker contract types ------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    """How the controller asks a worker group to sample (`meta_info["sampling"]` of a generate call)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    seed: int = 0
    """Seeds this call's sampling, so a step's samples do not depend on what ran before it."""
    return_log_probs: bool = False
    """Also return `rollout_log_probs`: the sampler's own log-probs of the chosen tokens (at `temperature`)."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0
