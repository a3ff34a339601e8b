"""Turns an actor checkpoint into a plain Hugging Face model folder, and checks that it loads.

python scripts/model_merger.py --local_dir CKPT/global_step_N/actor [--target_dir DIR] [--max_shard_size 5GB]
                               [--base_model PATH] [--adapter_only]

Reads a worker checkpoint (verl/workers/checkpoint.py: already a Hugging Face folder, with the
optimizer state beside it) or one in the earlier multi-worker layout (`sharded/`,
torch.distributed.checkpoint, with the HF config beside it). Writes safetensors (split into shards
above `--max_shard_size`), config, generation config, tokenizer and processor to `--target_dir`
(default: `<local_dir>/huggingface`) without the training state, then loads the result with
transformers and compares every tensor with the checkpoint's.

A LoRA checkpoint (adapter_config.json + adapter_model.safetensors) is merged into its base model
(`base_model_name_or_path` of the adapter config, or `--base_model`): W + (alpha / rank) * B @ A,
written as a plain Hugging Face folder. `--adapter_only` writes the adapter alone in peft's format
(loadable with `PeftModel.from_pretrained(base, DIR)`), checked by loading it onto the base model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import warnings

import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

from verl.models.loading import load_tokenizer_and_processor

SHARDED_DIR = "sharded"  # the earlier multi-worker layout
MODEL_PREFIX = "model."  # DCP keys of the weights: "model.<parameter name>" (optimizer states are "optimizer....")


def model_class(config: AutoConfig) -> type:
    return AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM


def read_sharded_weights(sharded_dir: str) -> dict[str, torch.Tensor]:
    """The full weights of a multi-worker save, read in one process (no process group needed)."""
    reader = dcp.FileSystemReader(sharded_dir)
    metadata = reader.read_metadata()
    weights = {
        key[len(MODEL_PREFIX) :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and hasattr(meta, "size")
    }
    if not weights:
        raise ValueError(f"{sharded_dir}: the checkpoint holds no model weights (keys starting with {MODEL_PREFIX!r})")
    with warnings.catch_warnings():
        # Reading without a process group is what we want here; torch warns about it.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": weights}, storage_reader=reader)
    return weights


def load_checkpoint_model(local_dir: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The checkpoint's model and its state dict, from either kind of save."""
    if not os.path.isfile(os.path.join(local_dir, "config.json")):
        raise FileNotFoundError(f"--local_dir {local_dir}: no config.json (expected CKPT/global_step_N/actor)")
    sharded_dir = os.path.join(local_dir, SHARDED_DIR)
    config = AutoConfig.from_pretrained(local_dir)
    if not os.path.isdir(sharded_dir):
        # A Hugging Face folder already; read it in the dtype it was saved in.
        model = model_class(config).from_pretrained(local_dir, dtype="auto")
        return model, model.state_dict()
    weights = read_sharded_weights(sharded_dir)
    with torch.device("meta"):
        model = model_class(config).from_config(config, dtype=next(iter(weights.values())).dtype)
    missing = sorted(set(model.state_dict()) - set(weights))
    if missing:
        raise ValueError(f"{sharded_dir}: weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    # Take the loaded tensors as the parameters (no second copy), then restore tied weights.
    model.load_state_dict(weights, assign=True)
    model.tie_weights()
    if os.path.isfile(os.path.join(local_dir, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(local_dir)
    return model, weights


def verify(target_dir: str, expected: dict[str, torch.Tensor]) -> None:
    """Load the merged folder with plain transformers and compare every weight with the checkpoint's."""
    config = AutoConfig.from_pretrained(target_dir)
    reloaded = model_class(config).from_pretrained(target_dir, dtype=next(iter(expected.values())).dtype)
    state = reloaded.state_dict()
    differing = [key for key, tensor in expected.items() if key not in state or not torch.equal(state[key], tensor)]
    if differing:
        raise RuntimeError(f"{target_dir}: reloaded weights differ from the checkpoint for {differing[:5]}")
    load_tokenizer_and_processor(target_dir)


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def load_adapter_model(local_dir: str, base_model: str | None) -> tuple[torch.nn.Module, str]:
    """The base model with the checkpoint's adapter loaded by peft (not merged), and the base's path."""
    from peft import PeftConfig, PeftModel

    base = base_model or PeftConfig.from_pretrained(local_dir).base_model_name_or_path
    if not base or not os.path.isfile(os.path.join(base, "config.json")):
        raise FileNotFoundError(
            f"{local_dir}: the adapter's base model {base!r} is not a local Hugging Face folder; pass --base_model"
        )
    model = model_class(AutoConfig.from_pretrained(base)).from_pretrained(base, dtype="auto")
    return PeftModel.from_pretrained(model, local_dir), base


def export_adapter(local_dir: str, target_dir: str, base_model: str | None = None) -> str:
    """Copy the adapter in peft's format to `target_dir`, check that peft loads it onto the base
    model with the checkpoint's values, and return `target_dir`."""
    from safetensors.torch import load_file

    os.makedirs(target_dir, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copy(os.path.join(local_dir, name), os.path.join(target_dir, name))
    expected = load_file(os.path.join(local_dir, ADAPTER_FILES[1]))
    loaded = {
        name: p for name, p in load_adapter_model(target_dir, base_model)[0].named_parameters() if "lora_" in name
    }
    for key, tensor in expected.items():
        name = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        if name not in loaded or not torch.equal(loaded[name].detach().to(tensor.dtype), tensor):
            raise RuntimeError(f"{target_dir}: peft did not load adapter weight {key} as saved")
    return target_dir


def merge_checkpoint(
    local_dir: str,
    target_dir: str | None = None,
    max_shard_size: str = "5GB",
    base_model: str | None = None,
    adapter_only: bool = False,
) -> str:
    """Write the HF folder (or, with `adapter_only`, the peft adapter folder) for the checkpoint at
    `local_dir`, verify it, and return its path."""
    target_dir = target_dir or os.path.join(local_dir, "adapter" if adapter_only else "huggingface")
    is_lora = os.path.isfile(os.path.join(local_dir, ADAPTER_FILES[0]))
    if adapter_only:
        if not is_lora:
            raise ValueError(f"--adapter_only: {local_dir} is no LoRA checkpoint (no {ADAPTER_FILES[0]})")
        return export_adapter(local_dir, target_dir, base_model)
    if is_lora:
        model = load_adapter_model(local_dir, base_model)[0].merge_and_unload()
        weights = model.state_dict()
    else:
        model, weights = load_checkpoint_model(local_dir)
    tokenizer, processor = load_tokenizer_and_processor(local_dir)
    os.makedirs(target_dir, exist_ok=True)
    model.save_pretrained(target_dir, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(target_dir)
    if processor is not None:
        processor.save_pretrained(target_dir)
    verify(target_dir, weights)
    return target_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_dir", required=True, help="the actor folder of a checkpoint: CKPT/global_step_N/actor")
    parser.add_argument("--target_dir", default=None, help="output folder (default: <local_dir>/huggingface)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors file (default: 5GB)")
    parser.add_argument(
        "--base_model", default=None, help="LoRA: the base model folder (default: the adapter config's base path)"
    )
    parser.add_argument(
        "--adapter_only",
        action="store_true",
        help="LoRA: write the adapter alone in peft's format (default dir: adapter)",
    )
    args = parser.parse_args()
    target = merge_checkpoint(args.local_dir, args.target_dir, args.max_shard_size, args.base_model, args.adapter_only)
    if args.adapter_only:
        print(f"exported the adapter of {args.local_dir} to {target}; peft loads it onto its base model")
    else:
        print(f"merged {args.local_dir} into {target}; it loads with transformers and matches the checkpoint")


if __name__ == "__main__":
    main()
