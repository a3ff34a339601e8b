"""The record each model family fills in (see verl/models/families/__init__.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


class FamilyPathError(ValueError):
    """A model family cannot take a requested path (or is unknown); the message names both."""


@dataclass(frozen=True)
class ModelFamily:
    """What the framework needs to know about one kind of model.

    Attributes:
        name: the registry key (and the tiny world's model folder name).
        title: the name users know it by, for messages and the README.
        model_types: the `model_type` values of its top-level configs.
        vision: whether it has a vision tower (`model.visual`).
        projector_modules: children of the vision tower that project into the text model (frozen or
            trained apart from the tower by SFT's `model.freeze_vision_tower` / `model.freeze_projector`;
            the RL actor's `freeze_vision_tower` freezes both).
        refused_paths: actor paths the family cannot take, each with the reason; refused at config
            load. Keys: "padding_free", "shared_prompt".
        shared_prompt_under_autograd: False when the prompt cache cannot carry gradients (its states
            are updated in place); the update then runs the plain path while no-grad passes still
            share prompts.
        vllm_architecture: the vLLM model class its weights are synced into (vllm 0.33's registry name).
        vllm_weight_layout: rewrites the actor's weights, `(config, [(name, tensor), ...])` to
            `(name, tensor)` pairs, where vLLM's loader for `vllm_architecture` expects another layout
            than transformers keeps in memory (verl.workers.rollout.vllm_weights.actor_weights); None
            sends them as they are.
    """

    name: str
    title: str
    model_types: tuple[str, ...]
    vision: bool
    projector_modules: tuple[str, ...] = ()
    refused_paths: dict[str, str] = field(default_factory=dict)
    shared_prompt_under_autograd: bool = True
    vllm_architecture: str | None = None
    vllm_weight_layout: Callable[[Any, Iterable[tuple[str, Any]]], Iterator[tuple[str, Any]]] | None = None

    def check_paths(self, key_prefix: str = "worker.actor", **requested: bool) -> None:
        """Raise FamilyPathError for the first requested path (e.g. `padding_free=True`) the family refuses."""
        for path, on in requested.items():
            if on and path in self.refused_paths:
                raise FamilyPathError(
                    f"{self.title} ({self.name}) cannot take `{key_prefix}.{path}`: {self.refused_paths[path]}. "
                    f"Set {key_prefix}.{path}=false."
                )
