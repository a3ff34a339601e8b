"""Wall-clock timing of training stages."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def timer(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Add the seconds spent in the block to `timings[name]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
