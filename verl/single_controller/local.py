"""The in-process worker group: one worker, called directly (pdb and profilers work)."""

from __future__ import annotations

from typing import Any

from verl.single_controller.dispatch import registered_methods


class LocalWorkerGroup:
    """Same interface as the Ray worker group, with one worker living in the driver process.

    Only the worker's `@register`ed methods are reachable, exactly as through the Ray group, so a
    call that works here cannot fail only on Ray.
    """

    world_size = 1

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.methods = registered_methods(type(worker))

    def __getattr__(self, name: str) -> Any:
        methods = self.__dict__.get("methods", {})
        if name not in methods:
            raise AttributeError(
                f"LocalWorkerGroup: {name!r} is not a @register'ed method of {type(self.__dict__.get('worker')).__name__}"
            )
        # One worker gets everything: no dispatch to do.
        return getattr(self.worker, name)

    def shutdown(self) -> None:
        """Nothing to stop: the worker lives and dies with this process."""
