"""Builds the whole tiny world (tokenizer, six models, datasets, manifest) into one folder, offline."""

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import sklearn
import tokenizers
import torch
import transformers

from verl.tiny_world.data import DEFAULT_SIZES, DataSizes, build_data
from verl.tiny_world.models import build_models
from verl.tiny_world.texts import task_corpus
from verl.tiny_world.tokenizer import real_qwen_tokenizer, train_task_tokenizer

MANIFEST = "manifest.json"
BUILT_PATHS = ("models", "data", MANIFEST)


def _clear_previous_build(out: Path) -> None:
    """Removes an earlier tiny world from `out`; refuses to touch a folder that holds anything else."""
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / MANIFEST).is_file():
        raise FileExistsError(f"build_tiny_world: {out} is not empty and holds no {MANIFEST}; choose an empty folder")
    for name in BUILT_PATHS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def build_tiny_world(out_dir: str, seed: int = 0, real_vocab: bool = False, sizes: DataSizes = DEFAULT_SIZES) -> dict:
    """Writes models/{qwen2_5_vl,qwen2_vl,qwen2_text,qwen3_vl,qwen3_vl_moe,qwen3_5}, data/{digit_sum,digit_mix,text_sum,cold_start} and manifest.json.

    The same seed (and sizes) gives byte-identical data files and weights. With `real_vocab` the models
    use the real 151,643-rank Qwen vocabulary instead of a small BPE trained on the task text.
    Returns the manifest.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    _clear_previous_build(out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = real_qwen_tokenizer() if real_vocab else train_task_tokenizer(task_corpus())
    parameters = build_models(tokenizer, out / "models", seed)
    source_scans = build_data(out / "data", seed, sizes)

    manifest = {
        "seed": seed,
        "real_vocab": real_vocab,
        "vocab_size": len(tokenizer),
        "parameters": parameters,
        "sizes": asdict(sizes),
        "source_scans": source_scans,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "scikit-learn": sklearn.__version__,
        },
        "build_seconds": round(time.perf_counter() - start, 2),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    # safetensors writes the weights 0600 whatever the umask; a tiny world is shared like any model.
    # (The trainers' writers use verl/utils/file_modes.py; the tiny world imports nothing of verl.)
    umask = os.umask(0o077)
    os.umask(umask)
    for name in BUILT_PATHS:
        for path in [out / name, *(out / name).rglob("*")]:
            if path.is_file() and not path.is_symlink():
                path.chmod(0o666 & ~umask)
    return manifest
