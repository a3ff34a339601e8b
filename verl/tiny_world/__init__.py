"""A tiny, offline stand-in for the real setting: small Qwen-VL models and a digit-sum task.

Tests and CPU demos use it to run every part of the pipeline in seconds. Build it with
`python scripts/make_tiny_world.py --out DIR` or `build_tiny_world(DIR)`.
"""

from verl.tiny_world.build import build_tiny_world
from verl.tiny_world.data import DataSizes

__all__ = ["DataSizes", "build_tiny_world"]
