"""The in-process worker group: one worker, called directly (pdb and profilers work)."""

from __future__ import annotations

from typing import Any


class LocalWorkerGroup:
    """Same interface as the Ray worker group, with one worker living in the driver process."""

    world_size = 1

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def __getattr__(self, name: str) -> Any:
        # Worker methods are called as they are: there is only one worker to dispatch to.
        return getattr(self.worker, name)
