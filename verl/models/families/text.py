"""Text-only causal language models (Qwen2, Qwen3, Llama, ...): no vision tower; 1-D positions
counted over attended tokens; every actor path holds."""

from verl.models.families.base import ModelFamily

TEXT = ModelFamily(name="text", title="text-only model", model_types=("qwen2", "qwen3"), vision=False)
