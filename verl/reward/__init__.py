"""Reward functions: loading a user's `file.py:function` and calling it with checked inputs and outputs."""

from .function import RewardFunction, RewardFunctionError, RewardInput, aggregate_reward_metrics

__all__ = ["RewardFunction", "RewardFunctionError", "RewardInput", "aggregate_reward_metrics"]
