"""Progress of the long loops that are not training steps (validation, generation, evaluation):
a tqdm bar on a terminal, and a periodic line in the log when the output goes to a file (where a
bar would be a wall of carriage returns)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
logger = logging.getLogger("verl.progress")
LOG_EVERY_S = 60.0


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "batch") -> Iterator[T]:
    """Yield `items`, showing how far along they are: a bar when stderr is a terminal, else an
    INFO line `desc: done/total` at most every LOG_EVERY_S seconds and at the end."""
    if sys.stderr.isatty():
        yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False)
        return
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= LOG_EVERY_S:
            last = now
            logger.info("%s: %d/%s %s (%.0f s)", desc, done, total if total is not None else "?", unit, now - start)
    logger.info("%s: %d %s done in %.1f s", desc, done, unit, time.monotonic() - start)
