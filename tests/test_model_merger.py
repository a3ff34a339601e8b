"""scripts/model_merger.py: saves of one worker and of two FSDP2 workers (gloo, two processes) become
Hugging Face folders whose logits, loaded with plain transformers, equal those of the actor that saved."""

import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForImageTextToText

from verl.protocol import SamplingParams
from verl.utils.dataset import PromptDataset, PromptDatasetConfig, PromptLoader
from verl.utils.network import free_port
from verl.workers.actor.dp_actor import forward_response_logits
from verl.workers.config import WorkerConfig
from verl.workers.fsdp_worker import ActorRolloutRefWorker

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("model_merger", ROOT / "scripts" / "model_merger.py")
model_merger = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model_merger)

# fp32 on CPU: a merged model computes the same logits up to summation order.
LOGITS_ATOL = 1e-5


def worker_config(tiny_world: Path) -> WorkerConfig:
    config = WorkerConfig()
    config.actor.model.model_path = str(tiny_world / "models" / "qwen2_5_vl")
    config.actor.optim.lr = 1e-2  # a visible change, so a merge of untrained weights would fail
    config.actor.micro_batch_size_per_device_for_update = 2
    config.actor.use_kl_loss = False  # no reference model needed
    return config


@torch.no_grad()
def response_logits(model: torch.nn.Module, batch) -> torch.Tensor:
    model.eval()
    logits, _ = forward_response_logits(model, batch, temperature=1.0)
    return logits.cpu()


@pytest.fixture(scope="module")
def one_worker(tiny_world):
    worker = ActorRolloutRefWorker(worker_config(tiny_world), device="cpu", need_ref=False, seed=0)
    worker.init_model()
    return worker


@pytest.fixture(scope="module")
def training_batch(tiny_world, one_worker):
    """Four image prompts, two samples each, with old log-probs and fixed advantages."""
    dataset = PromptDataset(
        str(tiny_world / "data/digit_sum/val.parquet"),
        one_worker.tokenizer,
        one_worker.processor,
        PromptDatasetConfig(format_prompt=str(ROOT / "examples/format_prompt/see_think.jinja")),
    )
    prompts = next(
        iter(PromptLoader(dataset, 4, shuffle=False, seed=0, pad_token_id=one_worker.tokenizer.pad_token_id))
    )
    prompts.meta_info["sampling"] = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=3)
    batch = one_worker.generate_sequences(prompts)
    batch.meta_info = {"temperature": 1.0, "mini_batch_size": len(batch)}
    batch = batch.union(one_worker.compute_log_probs(batch).select(["old_log_probs"]))
    advantages = torch.linspace(-1.0, 1.0, len(batch))[:, None] * batch.batch["response_mask"]
    batch.batch["advantages"] = advantages
    return batch


def _train_and_save_on_rank(rank: int, world_size: int, port: int, config: WorkerConfig, batch_file: str, out: str):
    """One of two FSDP2 workers: one update on its half of the batch, a save, then logits of the whole batch."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    worker = ActorRolloutRefWorker(config, device="cpu", need_ref=False, seed=0)
    worker.init_model()
    batch = torch.load(batch_file, weights_only=False)
    worker.update_actor(batch.chunk(world_size)[rank])
    worker.save_checkpoint(os.path.join(out, "actor"))
    logits = response_logits(worker.model, batch)
    if rank == 0:
        torch.save(logits, os.path.join(out, "logits.pt"))


@pytest.fixture(scope="module")
def two_worker_save(tiny_world, training_batch, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_workers")
    batch_file = str(out / "batch.pt")
    torch.save(training_batch, batch_file)
    mp.spawn(
        _train_and_save_on_rank,
        args=(2, free_port(), worker_config(tiny_world), batch_file, str(out)),
        nprocs=2,
        join=True,
    )
    return out


def test_two_worker_save_is_an_hf_folder_with_the_optimizer_sharded_beside_it(two_worker_save):
    actor = two_worker_save / "actor"
    assert (actor / "optimizer" / ".metadata").is_file()
    assert len(list((actor / "optimizer").glob("*.distcp"))) == 2, "each worker writes its own optimizer shards"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "training_state.pt"):
        assert (actor / name).is_file(), name


def test_merged_two_worker_save_gives_the_saving_actors_logits(
    two_worker_save, training_batch, tiny_world, monkeypatch, capsys
):
    target = two_worker_save / "merged"
    # Through the command line (in this process: a new interpreter would spend most of the time importing).
    argv = ["model_merger.py", f"--local_dir={two_worker_save / 'actor'}", f"--target_dir={target}"]
    monkeypatch.setattr(sys, "argv", [*argv, "--max_shard_size=2MB"])  # the 5 MB tiny model: several shards
    model_merger.main()
    assert "matches the checkpoint" in capsys.readouterr().out
    assert len(list(target.glob("model-*-of-*.safetensors"))) > 1
    assert (target / "model.safetensors.index.json").is_file()
    merged = AutoModelForImageTextToText.from_pretrained(target)
    saved = torch.load(two_worker_save / "logits.pt")
    torch.testing.assert_close(response_logits(merged, training_batch), saved, atol=LOGITS_ATOL, rtol=0)
    initial = AutoModelForImageTextToText.from_pretrained(tiny_world / "models" / "qwen2_5_vl")
    assert (response_logits(initial, training_batch) - saved).abs().max() > 100 * LOGITS_ATOL, "no training happened"
    # The sampler's stop tokens survive the merge (a default config would lose the second EOS id).
    assert merged.generation_config.eos_token_id == initial.generation_config.eos_token_id


def test_merged_one_worker_save_gives_the_saving_actors_logits(tiny_world, training_batch, tmp_path):
    worker = ActorRolloutRefWorker(worker_config(tiny_world), device="cpu", need_ref=False, seed=0)
    worker.init_model()
    worker.update_actor(training_batch)
    worker.save_checkpoint(str(tmp_path / "actor"))
    target = model_merger.merge_checkpoint(str(tmp_path / "actor"), str(tmp_path / "merged"))
    merged = AutoModelForImageTextToText.from_pretrained(target)
    expected = response_logits(worker.model, training_batch)
    torch.testing.assert_close(response_logits(merged, training_batch), expected, atol=LOGITS_ATOL, rtol=0)
    assert (Path(target) / "tokenizer.json").is_file() and (Path(target) / "processor_config.json").is_file()


def test_a_folder_that_is_no_checkpoint_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        model_merger.merge_checkpoint(str(tmp_path))


# A transformers-4.x layout in EasyR1-style saves: Qwen3-VL-MoE's fused expert weights were
# (experts, in, out); transformers 5 holds them as (experts, out, in) under the same names.
OLDER_EXPERT_LAYOUT = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe", "qwen3_5"])
def test_a_qwen3_rank_file_save_merges_with_its_names_and_expert_layout(tiny_world, tmp_path, family):
    """An EasyR1-style one-rank save of a Qwen3 family (the current `model.visual.*` and
    `model.language_model.*` names; the MoE's experts in the older layout) merges into a folder that
    transformers loads with the saved weights."""
    model_dir = tiny_world / "models" / family
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # weights no file on disk holds
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
    expected = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    assert any(name.startswith("model.visual.") for name in expected)
    assert any(name.startswith("model.language_model.layers.") for name in expected)

    saved, transposed = dict(expected), []
    for name, tensor in expected.items():
        # Square ones (the tiny model's down_proj) look alike in both layouts: transformers, and the
        # merger, take them as saved, so only the others are written in the older layout.
        if OLDER_EXPERT_LAYOUT.search(name) and tensor.shape[1] != tensor.shape[2]:
            saved[name] = tensor.transpose(1, 2).contiguous()
            transposed.append(name)
    assert bool(transposed) == (family == "qwen3_vl_moe")
    actor = tmp_path / "actor"
    shutil.copytree(model_dir, actor / "huggingface", ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.save(saved, actor / "model_world_size_1_rank_0.pt")

    target = model_merger.merge_checkpoint(str(actor), str(tmp_path / "merged"))
    merged = AutoModelForImageTextToText.from_pretrained(target).state_dict()
    assert sorted(merged) == sorted(expected)
    assert all(torch.equal(merged[name], tensor) for name, tensor in expected.items())
