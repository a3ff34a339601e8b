"""Turns an actor checkpoint into a plain Hugging Face model folder, and checks that it loads.

python scripts/model_merger.py --local_dir CKPT/global_step_N/actor [--target_dir DIR] [--max_shard_size 5GB]
                               [--base_model PATH] [--adapter_only] [--hf_upload_path REPO_ID]

Reads a worker checkpoint (verl/workers/checkpoint.py: already a Hugging Face folder, with the
optimizer state beside it) or one in the earlier multi-worker layout (`sharded/`,
torch.distributed.checkpoint, with the HF config beside it). Writes safetensors (split into shards
above `--max_shard_size`), config, generation config, tokenizer and processor to `--target_dir`
(default: `<local_dir>/huggingface`) without the training state, then loads the result with
transformers and compares every tensor with the checkpoint's.

The default output lies inside the checkpoint folder. A training run's `trainer.save_limit` never
deletes a checkpoint that holds a merged model (weights the save did not write): it keeps it beyond
the limit and logs a warning naming it, so a merge is never lost to the rotation; delete such a
checkpoint yourself once the merge is copied elsewhere, or merge to a `--target_dir` outside the
run's checkpoint folders. Written files get the permissions of the umask (0644 under umask 022).

A checkpoint written by an EasyR1-style trainer (EasyR1, the original Vision-SR1) is read too: one
`model_world_size_{W}_rank_{r}.pt` per rank (torch.save'd FSDP state dicts whose values are DTensor
shards or plain tensors) with config, tokenizer and processor in its `huggingface/` subfolder. The
shards are joined along their shard dimension as the DTensor placements say (replicated ones taken
once); parameter names of older transformers versions ("visual.*", "model.layers.*") are mapped to
the current ones, and tensors whose layout changed under the same name (Qwen3-VL-MoE's expert
weights, transposed in transformers 5) are transposed when their shape says so, as transformers
does on load. Qwen3-VL, Qwen3-VL-MoE and Qwen3.5 saves already use the current names
("model.visual.*", "model.language_model.*"). These files are unpickled: read only checkpoints you trust.

`--hf_upload_path REPO_ID` uploads the merged folder to the Hugging Face Hub afterwards; when the
Hub cannot be reached (HF_HUB_OFFLINE=1, no network, no login) the command fails with the reason
and the merged folder stays in place.

A LoRA checkpoint (adapter_config.json + adapter_model.safetensors) is merged into its base model
(`base_model_name_or_path` of the adapter config, or `--base_model`): W + (alpha / rank) * B @ A,
written as a plain Hugging Face folder. `--adapter_only` writes the adapter alone in peft's format
(loadable with `PeftModel.from_pretrained(base, DIR)`), checked by loading it onto the base model.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import warnings
import zipfile

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

from verl.models.loading import load_tokenizer_and_processor
from verl.utils.file_modes import entries, honour_umask

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


def assemble_model(weights: dict[str, torch.Tensor], config_dir: str, source: str) -> torch.nn.Module:
    """The model of `config_dir`'s config holding `weights` (taken as its parameters, no second copy)."""
    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = model_class(config).from_config(config, dtype=next(iter(weights.values())).dtype)
    missing = sorted(set(model.state_dict()) - set(weights))
    if missing:
        raise ValueError(f"{source}: weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(weights) - set(model.state_dict()))
    if unexpected:
        raise ValueError(
            f"{source}: weights that {type(model).__name__} has no parameter for: "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    model.load_state_dict(weights, assign=True)
    model.tie_weights()
    if os.path.isfile(os.path.join(config_dir, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(config_dir)
    return model


def load_checkpoint_model(local_dir: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The checkpoint's model and its state dict, from any of the supported saves."""
    rank_paths = rank_file_paths(local_dir)
    if rank_paths:
        config_dir = rank_files_config_dir(local_dir)
        weights = read_rank_files(rank_paths, config_dir)
        return assemble_model(weights, config_dir, local_dir), weights
    if not os.path.isfile(os.path.join(local_dir, "config.json")):
        raise FileNotFoundError(f"--local_dir {local_dir}: no config.json (expected CKPT/global_step_N/actor)")
    sharded_dir = os.path.join(local_dir, SHARDED_DIR)
    if not os.path.isdir(sharded_dir):
        # A Hugging Face folder already; read it in the dtype it was saved in.
        config = AutoConfig.from_pretrained(local_dir)
        model = model_class(config).from_pretrained(local_dir, dtype="auto")
        return model, model.state_dict()
    weights = read_sharded_weights(sharded_dir)
    return assemble_model(weights, local_dir, sharded_dir), weights


# ---- checkpoints of EasyR1-style trainers: one torch.save'd FSDP state dict per rank ----

RANK_FILE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
RANK_FILES_CONFIG_DIR = "huggingface"  # where those trainers put config, tokenizer and processor


def rank_file_name(world_size: int, rank: int) -> str:
    return f"model_world_size_{world_size}_rank_{rank}.pt"


def rank_file_paths(local_dir: str) -> list[str]:
    """The per-rank model files of an EasyR1-style save in rank order; [] when the folder has none.
    Raises when ranks are missing or saves of several world sizes are mixed."""
    if not os.path.isdir(local_dir):
        return []
    ranks_by_world_size: dict[int, set[int]] = {}
    for name in os.listdir(local_dir):
        match = RANK_FILE.match(name)
        if match:
            ranks_by_world_size.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
    if not ranks_by_world_size:
        return []
    if len(ranks_by_world_size) > 1:
        sizes = sorted(ranks_by_world_size)
        raise ValueError(f"{local_dir}: model files of several world sizes {sizes}; keep the files of one save only")
    ((world_size, ranks),) = ranks_by_world_size.items()
    missing = [os.path.join(local_dir, rank_file_name(world_size, r)) for r in range(world_size) if r not in ranks]
    if missing:
        raise FileNotFoundError(
            f"{local_dir}: {len(missing)} of the {world_size} rank files of this save are missing: "
            f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}"
        )
    stray = sorted(r for r in ranks if r >= world_size)
    if stray:
        names = ", ".join(rank_file_name(world_size, r) for r in stray)
        raise ValueError(f"{local_dir}: rank files beyond world size {world_size}: {names}")
    return [os.path.join(local_dir, rank_file_name(world_size, r)) for r in range(world_size)]


def rank_files_config_dir(local_dir: str) -> str:
    config_dir = os.path.join(local_dir, RANK_FILES_CONFIG_DIR)
    if not os.path.isfile(os.path.join(config_dir, "config.json")):
        raise FileNotFoundError(
            f"{local_dir}: per-rank model files but no {RANK_FILES_CONFIG_DIR}/config.json beside them; copy the "
            f"model's config, tokenizer and processor files into {config_dir}"
        )
    return config_dir


def load_rank_file(path: str) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        # The device meshes of the DTensors are unpickled without process groups, which is all we need.
        warnings.filterwarnings("ignore", message=".*DeviceMesh.*")
        try:
            # Mapped rather than read where the format allows (the zip format torch.save writes by default).
            # weights_only: no arbitrary pickle from a checkpoint folder; torch allowlists DTensor and its
            # placements and mesh for it.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as error:
            raise ValueError(f"{path}: not a readable torch.save file ({error})") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor), got {type(state).__name__}")
    return state


def _join_dtensor_shards(key: str, shards: list[DTensor], paths: list[str]) -> torch.Tensor:
    """The full tensor of one parameter from every rank's DTensor shard, as its placements say."""
    first = shards[0]
    mesh = first.device_mesh.mesh
    for shard, path in zip(shards, paths):
        if tuple(shard.placements) != tuple(first.placements) or not torch.equal(shard.device_mesh.mesh, mesh):
            raise ValueError(
                f"{path}: {key} is placed {tuple(shard.placements)} on mesh {shard.device_mesh.mesh.tolist()}, "
                f"but {paths[0]} has {tuple(first.placements)} on {mesh.tolist()}"
            )
    if mesh.numel() != len(shards):
        raise ValueError(f"{paths[0]}: {key} is placed on a mesh of {mesh.numel()} ranks, but there are {len(paths)}")

    def join(coordinate: tuple[int, ...]) -> tuple[torch.Tensor, list[str]]:
        if len(coordinate) == mesh.dim():
            rank = int(mesh[coordinate])
            return shards[rank].to_local(), [paths[rank]]
        placement = first.placements[len(coordinate)]
        if placement.is_replicate():
            return join((*coordinate, 0))
        if not placement.is_shard():
            raise ValueError(f"{paths[0]}: {key} has placement {placement}; only Shard and Replicate can be merged")
        parts = [join((*coordinate, i)) for i in range(mesh.shape[len(coordinate)])]
        dim = placement.dim
        shapes = [tuple(tensor.shape[:dim] + tensor.shape[dim + 1 :]) for tensor, _ in parts]
        if len(set(shapes)) > 1:
            listing = "; ".join(f"{files[0]}: {tuple(tensor.shape)}" for tensor, files in parts)
            raise ValueError(f"{key}: shards disagree outside their shard dim {dim}: {listing}")
        return torch.cat([tensor for tensor, _ in parts], dim=dim), [f for _, files in parts for f in files]

    full, _ = join(())
    if full.shape != first.shape:
        raise ValueError(
            f"{key}: the shards in {paths[0]} ... {paths[-1]} join to {tuple(full.shape)}, "
            f"but the saved DTensor's shape is {tuple(first.shape)}"
        )
    return full


def _join_plain_tensors(key: str, tensors: list[torch.Tensor], paths: list[str], expected: torch.Size | None):
    """Plain tensors saved by every rank: one copy when replicated, else row blocks joined along dim 0."""
    if len(tensors) == 1 or (expected is not None and all(t.shape == expected for t in tensors)):
        for tensor, path in zip(tensors[1:], paths[1:]):
            if not torch.equal(tensor, tensors[0]):
                raise ValueError(f"{path}: {key} differs from {paths[0]}'s, though both hold the whole tensor")
        return tensors[0]
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) > 1 or tensors[0].dim() == 0:
        listing = "; ".join(f"{path}: {tuple(t.shape)}" for t, path in zip(tensors, paths))
        raise ValueError(f"{key}: the ranks' tensors can be neither replicas nor row blocks: {listing}")
    return torch.cat(tensors, dim=0)


def legacy_name_map(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(pattern, replacement) pairs with which transformers reads parameter names of older releases."""
    try:
        from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping
    except ImportError:
        return []
    pairs = []
    for transform in get_model_conversion_mapping(model):
        if type(transform) is WeightRenaming:
            pairs.extend(zip(transform.source_patterns, transform.target_patterns))
    return pairs


def legacy_layout_map(model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(pattern, dim0, dim1) of the parameters whose layout changed between transformers releases
    without a change of name: transformers transposes such a tensor on load when its saved shape
    is the transpose of the model's (Qwen3-VL-MoE's `mlp.experts.gate_up_proj` and `down_proj`, saved
    as (experts, in, out) by transformers 4.x and held as (experts, out, in) since 5.0)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Transpose, WeightConverter
    except ImportError:
        return []
    layouts = []
    for transform in get_model_conversion_mapping(model):
        if type(transform) is not WeightConverter or transform.source_patterns != transform.target_patterns:
            continue
        if len(transform.operations) == 1 and isinstance(transform.operations[0], Transpose):
            transpose = transform.operations[0]
            layouts.extend((pattern, transpose.dim0, transpose.dim1) for pattern in transform.source_patterns)
    return layouts


def to_current_layout(
    name: str, tensor: torch.Tensor, expected: torch.Size | None, layouts: list[tuple[str, int, int]]
) -> torch.Tensor:
    """`tensor` transposed into the model's layout when it is saved in an older one (see
    `legacy_layout_map`). As in transformers, the shape decides: a square tensor is taken as saved."""
    if expected is None or tensor.shape == expected:
        return tensor
    for pattern, dim0, dim1 in layouts:
        if re.search(pattern, name) and tensor.dim() > max(dim0, dim1):
            transposed = tensor.transpose(dim0, dim1)
            if transposed.shape == expected:
                return transposed
    return tensor


def read_rank_files(paths: list[str], config_dir: str) -> dict[str, torch.Tensor]:
    """The full weights of a per-rank save, under the parameter names (and in the layouts) of
    `config_dir`'s model."""
    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        reference = model_class(config).from_config(config)
    expected_shapes = {name: tensor.shape for name, tensor in reference.state_dict().items()}
    renames = legacy_name_map(reference)
    layouts = legacy_layout_map(reference)

    states = [load_rank_file(path) for path in paths]
    keys = list(states[0])
    for path, state in zip(paths[1:], states[1:]):
        if set(state) != set(keys):
            missing, extra = sorted(set(keys) - set(state)), sorted(set(state) - set(keys))
            raise ValueError(f"{path}: parameter names differ from {paths[0]}'s: lacks {missing[:5]}, adds {extra[:5]}")
    if any("lora_" in key for key in keys):
        raise ValueError(
            f"{paths[0]}: a LoRA save; merge its adapter folder instead: --local_dir <lora_adapter folder> --base_model"
        )

    weights = {}
    for key in keys:
        name = key
        if name not in expected_shapes:
            for pattern, replacement in renames:
                name = re.sub(pattern, replacement, name)
        values = [state.pop(key) for state in states]
        if isinstance(values[0], DTensor):
            plain = [path for value, path in zip(values, paths) if not isinstance(value, DTensor)]
            if plain:
                raise ValueError(f"{plain[0]}: {key} is a plain tensor, but a DTensor in {paths[0]}")
            full = _join_dtensor_shards(key, values, paths)
        else:
            if any(isinstance(value, DTensor) for value in values):
                raise ValueError(f"{paths[0]}: {key} is a plain tensor, but a DTensor in other rank files")
            whole = expected_shapes.get(name)
            if whole is not None and to_current_layout(name, values[0], whole, layouts).shape == whole:
                whole = values[0].shape  # a whole tensor, maybe in an older layout: replicas, not row blocks
            full = _join_plain_tensors(key, values, paths, whole)
        # Joined first: the shards split the saved layout's dimensions (FSDP: dim 0, the experts).
        full = to_current_layout(name, full, expected_shapes.get(name), layouts)
        if name in expected_shapes and full.shape != expected_shapes[name]:
            raise ValueError(
                f"{key}: merged from {paths[0]} ... {paths[-1]} to shape {tuple(full.shape)}, but the model of "
                f"{config_dir} expects {tuple(expected_shapes[name])}"
            )
        weights[name] = full.contiguous()
    return weights


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

    before = entries(target_dir)
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
    honour_umask(target_dir, before)
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
    # An EasyR1-style save keeps its tokenizer and processor in its huggingface/ subfolder.
    tokenizer_dir = rank_files_config_dir(local_dir) if not is_lora and rank_file_paths(local_dir) else local_dir
    tokenizer, processor = load_tokenizer_and_processor(tokenizer_dir)
    before = entries(target_dir)
    os.makedirs(target_dir, exist_ok=True)
    model.save_pretrained(target_dir, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(target_dir)
    if processor is not None:
        processor.save_pretrained(target_dir)
    # safetensors writes its files 0600 whatever the umask: a merge is for others to load too.
    honour_umask(target_dir, before)
    verify(target_dir, weights)
    return target_dir


class UploadError(RuntimeError):
    """The merged folder could not be uploaded; the message says why and where the folder is."""


def hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def upload_to_hub(folder: str, repo_id: str, endpoint: str | None = None) -> str:
    """Upload `folder` as the model repository `repo_id` (created when absent) and return its URL."""
    if hub_offline():
        raise UploadError(f"not uploaded to {repo_id}: HF_HUB_OFFLINE is set; the merged folder is {folder}")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint)
    try:
        url = api.create_repo(repo_id=repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model")
    except Exception as error:  # no network, no login, no rights: all end the same way for the user
        raise UploadError(
            f"not uploaded to {repo_id} ({type(error).__name__}: {error}); the merged folder is {folder}"
        ) from error
    return str(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_dir", required=True, help="the actor folder of a checkpoint: CKPT/global_step_N/actor")
    parser.add_argument(
        "--target_dir",
        default=None,
        help="output folder (default: <local_dir>/huggingface, inside the checkpoint; trainer.save_limit then "
        "keeps that checkpoint, with a warning, instead of deleting it)",
    )
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors file (default: 5GB)")
    parser.add_argument(
        "--base_model", default=None, help="LoRA: the base model folder (default: the adapter config's base path)"
    )
    parser.add_argument(
        "--adapter_only",
        action="store_true",
        help="LoRA: write the adapter alone in peft's format (default dir: adapter)",
    )
    parser.add_argument(
        "--hf_upload_path",
        default=None,
        metavar="REPO_ID",
        help="after the merge, upload the folder to this Hugging Face Hub model repository (needs network and login)",
    )
    args = parser.parse_args()
    target = merge_checkpoint(args.local_dir, args.target_dir, args.max_shard_size, args.base_model, args.adapter_only)
    if args.adapter_only:
        print(f"exported the adapter of {args.local_dir} to {target}; peft loads it onto its base model")
    else:
        print(f"merged {args.local_dir} into {target}; it loads with transformers and matches the checkpoint")
    if args.hf_upload_path:
        try:
            url = upload_to_hub(target, args.hf_upload_path)
        except UploadError as error:
            raise SystemExit(f"error: {error}") from error
        print(f"uploaded {target} to {url}")


if __name__ == "__main__":
    main()
