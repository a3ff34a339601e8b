"""The rollout-engine interface and its registry.

An engine turns a batch of prompts into `n` sampled responses per prompt, grouped: the responses of
prompt i occupy rows i*n .. i*n+n-1 of the output, next to their repeated prompt data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from verl.protocol import DataProto


@dataclass(frozen=True)
class SamplingParams:
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


class RolloutEngine(ABC):
    """Samples responses with the policy's current weights."""

    @abstractmethod
    def generate(self, prompts: DataProto, sampling: SamplingParams) -> DataProto:
        """Return the prompts repeated n times (interleaved) with `responses`, `response_mask`,
        `input_ids`, `attention_mask` and `position_ids` of prompt + response (and
        `rollout_log_probs` when asked)."""

    def sync_weights(self, model: torch.nn.Module) -> None:  # noqa: B027 - engines sharing the module need nothing
        """Load the actor's current weights into the engine."""

    def sleep(self) -> None:  # noqa: B027
        """Free the engine's memory while the actor trains."""

    def wake(self) -> None:  # noqa: B027
        """Take the memory back before generating."""


ROLLOUT_ENGINES: dict[str, Callable[..., RolloutEngine]] = {}


def register_rollout_engine(name: str) -> Callable:
    def decorator(factory: Callable[..., RolloutEngine]) -> Callable[..., RolloutEngine]:
        ROLLOUT_ENGINES[name] = factory
        return factory

    return decorator


def get_rollout_engine(name: str) -> Callable[..., RolloutEngine]:
    if name not in ROLLOUT_ENGINES:
        raise ValueError(f"worker.rollout.name={name!r}: unknown rollout engine; available: {sorted(ROLLOUT_ENGINES)}")
    return ROLLOUT_ENGINES[name]
