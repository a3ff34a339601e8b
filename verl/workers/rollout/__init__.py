"""Rollout engines; importing this package registers the built-in ones."""

from verl.workers.rollout import (
    hf_rollout,  # noqa: F401  (registers "hf")
    vllm_rollout,  # noqa: F401  (registers "vllm"; vLLM itself loads only when built)
)
from verl.workers.rollout.base import ROLLOUT_ENGINES, RolloutEngine, get_rollout_engine

__all__ = ["ROLLOUT_ENGINES", "RolloutEngine", "get_rollout_engine"]
