"""Shared test setup: offline Hugging Face, one CPU thread by default, and the tiny world fixture."""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

# Set before anything imports transformers or torch: tests never reach a hub, and torch's default
# of two threads is erratic on small shared CPUs.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

TINY_WORLD_SOURCES = Path(__file__).resolve().parent.parent / "verl" / "tiny_world"
TINY_WORLD_CACHE = Path(tempfile.gettempdir()) / "vision_sr1_tiny_world"


def _tiny_world_key() -> str:
    """A hash of the builder's source files, so any edit to the builder gives a fresh build."""
    digest = hashlib.sha256()
    for source in sorted(TINY_WORLD_SOURCES.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_world() -> Path:
    """The folder of a built tiny world (see verl/tiny_world), built at most once per builder version.

    VISION_SR1_TINY_WORLD names a folder to use instead of the cache; it is built there if empty.
    """
    from verl.tiny_world import build_tiny_world
    from verl.utils.file_modes import honour_umask

    chosen = os.environ.get("VISION_SR1_TINY_WORLD")
    if chosen:
        world = Path(chosen)
        if not (world / "manifest.json").is_file():
            build_tiny_world(str(world))
        return world

    world = TINY_WORLD_CACHE / _tiny_world_key()
    if (world / "manifest.json").is_file():
        return world
    TINY_WORLD_CACHE.mkdir(parents=True, exist_ok=True)
    # Build beside the final folder and rename, so a half-written world is never picked up.
    staging = Path(tempfile.mkdtemp(dir=TINY_WORLD_CACHE, prefix="building-"))
    build_tiny_world(str(staging))
    # mkdtemp makes the folder 0700; the cache in /tmp is for every user of the machine.
    honour_umask(str(staging))
    try:
        os.replace(staging, world)
    except OSError:
        # Another session finished the same build first; theirs is identical.
        shutil.rmtree(staging)
    return world
