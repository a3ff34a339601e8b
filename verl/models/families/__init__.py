"""Model families: what the framework must know about each kind of model, one file per family.

A family names its `model_type` values and states the facts the workers and trainer would otherwise
test `model_type` for: which children of the vision tower project into the text model, which actor
paths it can take (and why not), and the vLLM architecture its weights are synced into. Positions
come from the model's own `get_rope_index` for every Qwen-VL family (verl.models.positions), and
processor facts (patch and merge size) from the saved processor, so neither needs an entry here.

    family = family_of(model.config)          # or family_of_path("path/to/model")
    family.check_paths(padding_free=True)     # raises FamilyPathError naming the family and the path
"""

from __future__ import annotations

from typing import Any

from verl.models.families.base import FamilyPathError, ModelFamily
from verl.models.families.qwen2_vl import QWEN2_5_VL, QWEN2_VL
from verl.models.families.qwen3_5 import QWEN3_5
from verl.models.families.qwen3_vl import QWEN3_VL, QWEN3_VL_MOE
from verl.models.families.text import TEXT

FAMILIES: dict[str, ModelFamily] = {
    family.name: family for family in (QWEN2_5_VL, QWEN2_VL, QWEN3_VL, QWEN3_VL_MOE, QWEN3_5, TEXT)
}

__all__ = ["FAMILIES", "FamilyPathError", "ModelFamily", "family_of", "family_of_path"]


def family_of(config: Any) -> ModelFamily:
    """The family of a model config (a transformers PretrainedConfig or anything with `model_type`).

    Text-only models of any type share the `text` family. A vision-language model of a type no
    family lists raises: its vision tower's layout (projector, positions) is unknown to us.
    """
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    if getattr(config, "vision_config", None) is None:
        return TEXT
    known = sorted(t for family in FAMILIES.values() for t in family.model_types)
    raise FamilyPathError(
        f"model_type {model_type!r} is a vision-language model no family in verl/models/families/ describes; "
        f"supported: {', '.join(known)}"
    )


def family_of_path(model_path: str, trust_remote_code: bool = False) -> ModelFamily:
    """The family of the model saved at `model_path` (reads only its config.json)."""
    from transformers import AutoConfig

    return family_of(AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code))
