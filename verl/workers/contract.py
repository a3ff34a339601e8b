"""What the trainers may call on a worker group: one Protocol per worker class.

A worker group (verl.single_controller: in-process or Ray) exposes exactly the worker's
`@register`ed methods, dispatched by their modes; the trainers are typed against these Protocols,
and tests/test_layers.py checks that each Protocol lists exactly its worker's registered methods.
"""

from __future__ import annotations

from typing import Protocol

from verl.protocol import DataProto


class WorkerGroup(Protocol):
    world_size: int
    """Number of workers (data-parallel ranks)."""

    def shutdown(self) -> None:
        """Stop every worker (Ray) or nothing (in-process); safe to call twice."""


class ActorRolloutRefGroup(WorkerGroup, Protocol):
    """verl.workers.fsdp_worker.ActorRolloutRefWorker behind a worker group."""

    def init_model(self) -> dict[str, int]: ...

    def generate_sequences(self, prompts: DataProto) -> DataProto:
        """`prompts.meta_info["sampling"]` is a verl.protocol.SamplingParams."""
        ...

    def compute_log_probs(self, data: DataProto) -> DataProto: ...

    def compute_ref_log_probs(self, data: DataProto) -> DataProto: ...

    def update_actor(self, data: DataProto) -> DataProto: ...

    def save_checkpoint(self, path: str) -> None: ...

    def load_checkpoint(self, path: str) -> None: ...


class SFTWorkerGroup(WorkerGroup, Protocol):
    """verl.workers.sft_worker.SFTWorker behind a worker group."""

    def init_model(self) -> dict[str, int]: ...

    def train_step(self, batch: DataProto) -> DataProto: ...

    def eval_loss(self, batch: DataProto) -> DataProto: ...

    def generate_sequences(self, prompts: DataProto) -> DataProto: ...

    def save_checkpoint(self, path: str) -> None: ...

    def load_checkpoint(self, path: str) -> None: ...
