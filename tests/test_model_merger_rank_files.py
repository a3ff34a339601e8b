"""scripts/model_merger.py on checkpoints of EasyR1-style trainers (EasyR1, the original Vision-SR1): one
torch.save'd FSDP state dict per rank (`model_world_size_{W}_rank_{r}.pt`) and a `huggingface/` subfolder.
The rank files here are written by two real FSDP2 processes (gloo), the way those trainers write them."""

import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

from verl.utils.network import free_port

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("model_merger", ROOT / "scripts" / "model_merger.py")
model_merger = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model_merger)

REPLICATED_KEY = "model.visual.blocks.0.norm1.weight"  # saved as a Replicate DTensor, the rest as Shard(0)


def perturbed_model(model_dir: Path) -> torch.nn.Module:
    """The tiny model with seeded noise on every parameter, so no file on disk holds these weights."""
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
    return model


def _save_rank_file(rank: int, world_size: int, port: int, model_dir: str, out: str) -> None:
    """One FSDP2 rank saving as EasyR1's checkpoint manager does: its sharded state dict, offloaded to CPU."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("fsdp",))
    model = perturbed_model(Path(model_dir))
    fully_shard(model, mesh=mesh)
    state = get_model_state_dict(model, options=StateDictOptions(cpu_offload=True))
    assert type(state[REPLICATED_KEY]).__name__ == "DTensor"
    state[REPLICATED_KEY] = state[REPLICATED_KEY].redistribute(placements=[Replicate()])
    torch.save(state, os.path.join(out, f"model_world_size_{world_size}_rank_{rank}.pt"))
    if rank == 0:
        hf_dir = os.path.join(out, "huggingface")
        model.config.save_pretrained(hf_dir)
        model.generation_config.save_pretrained(hf_dir)
        AutoProcessor.from_pretrained(model_dir).save_pretrained(hf_dir)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def model_dir(tiny_world) -> Path:
    return tiny_world / "models" / "qwen2_5_vl"


@pytest.fixture(scope="module")
def expected_weights(model_dir) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in perturbed_model(model_dir).state_dict().items()}


@pytest.fixture(scope="module")
def two_rank_save(model_dir, tmp_path_factory) -> Path:
    actor = tmp_path_factory.mktemp("easyr1_save") / "global_step_5" / "actor"
    actor.mkdir(parents=True)
    mp.spawn(_save_rank_file, args=(2, free_port(), str(model_dir), str(actor)), nprocs=2, join=True)
    return actor


def copy_save(save: Path, destination: Path, skip: tuple[str, ...] = ()) -> Path:
    shutil.copytree(save, destination, ignore=lambda _dir, names: [n for n in names if n in skip or n == "merged"])
    return destination


def assert_loads_with_weights(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    merged = AutoModelForImageTextToText.from_pretrained(folder).state_dict()
    assert set(merged) == set(expected)
    differing = [name for name, tensor in expected.items() if not torch.equal(merged[name], tensor)]
    assert not differing, differing[:5]


def test_the_rank_files_hold_sharded_and_replicated_dtensors(two_rank_save):
    state = torch.load(two_rank_save / "model_world_size_2_rank_1.pt", weights_only=False)
    placements = {str(tuple(value.placements)) for value in state.values()}
    assert placements == {"(Shard(dim=0),)", "(Replicate(),)"}


def test_a_two_rank_save_merges_into_a_folder_with_the_saved_weights(
    two_rank_save, expected_weights, model_dir, tmp_path, monkeypatch, capsys
):
    actor = copy_save(two_rank_save, tmp_path / "actor")
    monkeypatch.setattr(sys, "argv", ["model_merger.py", f"--local_dir={actor}", "--max_shard_size=2MB"])
    model_merger.main()
    assert "matches the checkpoint" in capsys.readouterr().out
    merged = actor / "huggingface"  # the default target: beside the config, as EasyR1's merger writes it
    assert len(list(merged.glob("model-*-of-*.safetensors"))) > 1
    assert_loads_with_weights(merged, expected_weights)
    assert (merged / "tokenizer.json").is_file() and (merged / "processor_config.json").is_file()
    saved_generation = GenerationConfig.from_pretrained(model_dir)
    assert GenerationConfig.from_pretrained(merged).eos_token_id == saved_generation.eos_token_id


def test_a_missing_rank_file_is_named(two_rank_save, tmp_path):
    actor = copy_save(two_rank_save, tmp_path / "actor", skip=("model_world_size_2_rank_1.pt",))
    expected = re.escape(str(actor / "model_world_size_2_rank_1.pt"))
    with pytest.raises(FileNotFoundError, match=f"1 of the 2 rank files .* missing: {expected}"):
        model_merger.merge_checkpoint(str(actor), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()


def test_a_rank_file_whose_shard_has_another_shape_is_named(two_rank_save, tmp_path):
    actor = copy_save(two_rank_save, tmp_path / "actor")
    rank_file = actor / "model_world_size_2_rank_1.pt"
    state = torch.load(rank_file, weights_only=False)
    key = "lm_head.weight"
    state[key] = torch.zeros(state[key].to_local().shape[0], 3)  # a plain tensor, and too narrow
    torch.save(state, rank_file)
    with pytest.raises(ValueError, match=f"{re.escape(str(rank_file))}: {key} is a plain tensor"):
        model_merger.merge_checkpoint(str(actor), str(tmp_path / "merged"))


def test_a_one_rank_save_of_plain_tensors_with_older_parameter_names_merges(expected_weights, model_dir, tmp_path):
    """World size 1 saves plain tensors; transformers before 4.52 named Qwen2.5-VL's parameters
    `visual.*` and `model.layers.*` (now `model.visual.*` and `model.language_model.*`)."""
    actor = tmp_path / "actor"
    shutil.copytree(model_dir, actor / "huggingface", ignore=shutil.ignore_patterns("*.safetensors*"))
    older_names = {
        re.sub(r"^model\.language_model\.", "model.", re.sub(r"^model\.visual\.", "visual.", name)): tensor
        for name, tensor in expected_weights.items()
    }
    assert "visual.patch_embed.proj.weight" in older_names and "model.embed_tokens.weight" in older_names
    torch.save(older_names, actor / "model_world_size_1_rank_0.pt")
    target = model_merger.merge_checkpoint(str(actor), str(tmp_path / "merged"))
    assert_loads_with_weights(Path(target), expected_weights)


def test_a_tensor_of_the_wrong_shape_is_named(expected_weights, model_dir, tmp_path):
    actor = tmp_path / "actor"
    shutil.copytree(model_dir, actor / "huggingface", ignore=shutil.ignore_patterns("*.safetensors*"))
    state = dict(expected_weights)
    state["model.language_model.norm.weight"] = torch.ones(3)
    torch.save(state, actor / "model_world_size_1_rank_0.pt")
    with pytest.raises(ValueError, match=r"model\.language_model\.norm\.weight: merged from .* to shape \(3,\)"):
        model_merger.merge_checkpoint(str(actor), str(tmp_path / "merged"))


def test_upload_offline_fails_after_the_merge_and_keeps_the_folder(two_rank_save, tmp_path, monkeypatch):
    actor = copy_save(two_rank_save, tmp_path / "actor")
    target = tmp_path / "merged"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["model_merger.py", f"--local_dir={actor}", f"--target_dir={target}", "--hf_upload_path=someone/model"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=f"not uploaded to someone/model: HF_HUB_OFFLINE .* {re.escape(str(target))}"):
        model_merger.main()
    assert (target / "model.safetensors").is_file() and (target / "config.json").is_file()


def test_upload_without_a_reachable_hub_names_the_folder(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    (tmp_path / "config.json").write_text("{}")
    unreachable = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(model_merger.UploadError, match=f"not uploaded to someone/model .*{re.escape(str(tmp_path))}"):
        model_merger.upload_to_hub(str(tmp_path), "someone/model", endpoint=unreachable)
