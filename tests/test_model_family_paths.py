"""What each model family (verl/models/families/) changes on the actor's paths, on the tiny world's
models: which vision parts freeze, which paths are refused at config load (and that the refusal
comes before any weights load, through the real command line), and that two FSDP2 ranks (gloo)
compute what one worker computes on the Qwen3 families.

The forward layouts per family are in tests/test_forward_layouts.py, LoRA per family in
tests/test_lora.py.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from verl.models.families import FAMILIES, family_of
from verl.models.loading import freeze_vision_parts, vision_tower
from verl.protocol import DataProto
from verl.utils.config import ConfigError
from verl.utils.dataset import PromptDataset, PromptDatasetConfig, collate_prompts
from verl.utils.network import free_port
from verl.workers import fsdp_utils
from verl.workers.config import WorkerConfig
from verl.workers.fsdp_worker import ActorRolloutRefWorker
from verl.workers.rollout.base import rollout_output

ROOT = Path(__file__).resolve().parent.parent
VISION_MODELS = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5"]
REFUSAL = "Qwen3.5 (qwen3_5) cannot take `worker.actor.padding_free`"


def load(tiny_world: Path, model_name: str) -> torch.nn.Module:
    model_class = AutoModelForCausalLM if model_name == "qwen2_text" else AutoModelForImageTextToText
    return model_class.from_pretrained(tiny_world / "models" / model_name, dtype=torch.float32)


# --- freezing the vision tower and its projectors ------------------------------------------------
def trainable_children(model: torch.nn.Module) -> dict[str, bool]:
    """Each child of the vision tower: whether any of its parameters still trains."""
    return {
        name: any(p.requires_grad for p in child.parameters())
        for name, child in vision_tower(model).named_children()
        if any(True for _ in child.parameters())
    }


@pytest.mark.parametrize("model_name", VISION_MODELS)
def test_freezing_the_tower_leaves_the_familys_projectors_trainable_and_vice_versa(tiny_world, model_name):
    model = load(tiny_world, model_name)
    projectors = set(family_of(model.config).projector_modules)
    if model_name.startswith("qwen3_vl"):  # the deepstack mergers project too
        assert projectors == {"merger", "deepstack_merger_list"}
    assert projectors < set(trainable_children(model)), "every projector is a child holding weights"

    assert freeze_vision_parts(model, freeze_tower=True, freeze_projector=False)
    children = trainable_children(model)
    assert {name for name, trains in children.items() if trains} == projectors
    assert all(p.requires_grad for name, p in model.named_parameters() if "visual" not in name)

    model.requires_grad_(True)
    assert freeze_vision_parts(model, freeze_tower=False, freeze_projector=True)
    children = trainable_children(model)
    assert {name for name, trains in children.items() if not trains} == projectors
    assert all(p.requires_grad for name, p in model.named_parameters() if "visual" not in name)


def test_a_text_model_has_no_vision_parts_to_freeze(tiny_world):
    model = load(tiny_world, "qwen2_text")
    assert family_of(model.config) is FAMILIES["text"]
    assert not freeze_vision_parts(model, freeze_tower=True, freeze_projector=True)
    assert all(p.requires_grad for p in model.parameters())


# --- refused paths, at config load ---------------------------------------------------------------
def test_qwen3_5_padding_free_is_refused_by_check_config_naming_family_and_key(tiny_world):
    """The real command line, as a user runs it: exit 2 (as every config error) before anything
    loads; the same config without padding-free passes."""
    model = tiny_world / "models" / "qwen3_5"
    command = [
        sys.executable,
        "-m",
        "verl.trainer.main",
        "config=examples/tiny_world/self_reward.yaml",
        f"worker.actor.model.model_path={model}",
        "worker.actor.padding_free=true",
        "--check-config",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert REFUSAL in result.stderr and "Set worker.actor.padding_free=false" in result.stderr
    assert "delta-net" in result.stderr  # the reason, from the family file
    assert result.stdout == "", "a refused config is not printed as resolved"


def test_qwen3_5_padding_free_is_refused_before_any_weights_load(tiny_world, tmp_path, capsys):
    """The run itself (no --check-config) and a worker built directly both refuse it; the model
    folder here has no weights at all, so reaching a weight load would fail differently."""
    from verl.trainer.main import main

    model = tmp_path / "qwen3_5_config_only"
    shutil.copytree(tiny_world / "models" / "qwen3_5", model, ignore=shutil.ignore_patterns("*.safetensors"))
    data = tiny_world / "data" / "digit_sum"
    with pytest.raises(SystemExit) as raised:
        main(
            [
                f"config={ROOT / 'examples/tiny_world/self_reward.yaml'}",
                f"worker.actor.model.model_path={model}",
                "worker.actor.padding_free=true",
                f"data.train_files={data / 'train.parquet'}",
                f"data.val_files={data / 'val.parquet'}",
                f"trainer.save_checkpoint_path={tmp_path / 'run'}",
                "trainer.logger=[console]",
            ]
        )
    assert raised.value.code == 2
    assert REFUSAL in capsys.readouterr().err

    config = WorkerConfig()
    config.actor.model.model_path = str(model)
    config.actor.padding_free = True
    with pytest.raises(ConfigError, match=REFUSAL.replace("(", r"\(").replace(")", r"\)")):
        ActorRolloutRefWorker(config, device="cpu", need_ref=False).init_model()


@pytest.mark.parametrize("model_name", ["qwen2_5_vl", "qwen2_text", "qwen3_vl", "qwen3_vl_moe", "qwen3_5"])
@pytest.mark.parametrize("padding_free", [False, True])
def test_the_check_passes_every_family_and_path_but_qwen3_5_padding_free(tiny_world, model_name, padding_free):
    config = WorkerConfig()
    config.actor.model.model_path = str(tiny_world / "models" / model_name)
    config.actor.padding_free = padding_free
    if model_name == "qwen3_5" and padding_free:
        with pytest.raises(ConfigError, match="delta-net"):
            config.actor.check_family("worker.actor")
        return
    expected = "text" if model_name == "qwen2_text" else model_name
    assert config.actor.check_family("worker.actor") is FAMILIES[expected]


# --- two FSDP2 ranks (gloo) against one worker ---------------------------------------------------
def family_batch(tiny_world: Path, model_name: str, worker: ActorRolloutRefWorker) -> DataProto:
    """Two image prompts then two text prompts, two samples each, random responses of unequal
    lengths: the first half of the rows (rank 0's) holds every image, the second half none."""
    config = PromptDatasetConfig(format_prompt=str(ROOT / "examples/format_prompt/see_think.jinja"))
    images = PromptDataset(str(tiny_world / "data/digit_sum/val.parquet"), worker.tokenizer, worker.processor, config)
    texts = PromptDataset(str(tiny_world / "data/text_sum/val.parquet"), worker.tokenizer, worker.processor, config)
    prompts = collate_prompts([images[0], images[1], texts[0], texts[1]], worker.tokenizer.pad_token_id)
    prompts = prompts.repeat(2, interleave=True)
    lengths = torch.tensor([12, 3, 7, 1, 10, 5, 2, 9])
    mask = (torch.arange(12)[None, :] < lengths[:, None]).long()
    generator = torch.Generator().manual_seed(0)
    responses = torch.randint(3, 200, mask.shape, generator=generator).masked_fill(mask == 0, 0)
    batch = rollout_output(worker.model, prompts, responses, mask, None, {})
    batch.meta_info = {"temperature": 1.0}
    return batch


def fsdp_config(tiny_world: Path, model_name: str) -> WorkerConfig:
    config = WorkerConfig()
    config.actor.model.model_path = str(tiny_world / "models" / model_name)
    config.actor.optim.lr = 1e-3
    config.actor.micro_batch_size_per_device_for_update = 2
    config.actor.micro_batch_size_per_device_for_experience = 2
    return config


def _fsdp_rank(rank: int, port: int, config: WorkerConfig, batch: DataProto, out: str) -> None:
    """One of two FSDP2 workers: old and reference log-probs of its half, one update, full weights."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    worker = ActorRolloutRefWorker(config, device="cpu", need_ref=True, seed=0)
    worker.init_model()
    shard = batch.chunk(2)[rank]
    old = worker.compute_log_probs(shard).batch["old_log_probs"]
    ref = worker.compute_ref_log_probs(shard).batch["ref_log_probs"]
    metrics = worker.update_actor(shard).meta_info["metrics"]
    weights, _ = fsdp_utils.full_state(worker.model)  # a collective: every rank takes part
    torch.save({"old": old, "ref": ref, "metrics": metrics, "weights": weights}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("model_name", ["qwen3_vl", "qwen3_vl_moe", "qwen3_5"])
def test_two_fsdp_ranks_compute_what_one_worker_computes(tiny_world, tmp_path, model_name):
    # Rank 0 holds every image and rank 1 none: the ranks must still issue the same collectives
    # (the vision tower, deepstack mergers included, sits in the root FSDP unit). fp32 on CPU, so
    # only summation order differs: log-probs within 1e-5, the step's loss and gradient norm within
    # 1e-4 relative, and each weight's change within 1e-3 of its norm (Adam's first step).
    config = fsdp_config(tiny_world, model_name)
    one = ActorRolloutRefWorker(config, device="cpu", need_ref=True, seed=0)
    one.init_model()
    initial = {name: p.detach().clone() for name, p in one.model.named_parameters()}
    batch = family_batch(tiny_world, model_name, one)
    old, ref = one.compute_log_probs(batch), one.compute_ref_log_probs(batch)
    batch = batch.union(old.select(["old_log_probs"])).union(ref)
    batch.batch["advantages"] = torch.linspace(-1.0, 1.0, len(batch))[:, None] * batch.batch["response_mask"]
    batch.meta_info["mini_batch_size"] = len(batch)

    # Forked ranks skip re-importing the stack; fork is safe only while this process has run no
    # multi-threaded (OpenMP) torch work.
    method = "fork" if torch.get_num_threads() == 1 else "spawn"
    mp.start_processes(
        _fsdp_rank, args=(free_port(), config, batch, str(tmp_path)), nprocs=2, start_method=method, join=True
    )
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    metrics = one.update_actor(batch).meta_info["metrics"]

    for key in ("old", "ref"):
        expected = batch.batch[f"{key}_log_probs"]
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]), expected, atol=1e-5, rtol=0, msg=key)
    assert metrics["actor/grad_norm"] > 0
    for key in ("actor/loss", "actor/pg_loss", "actor/kl_loss", "actor/grad_norm"):
        assert ranks[0]["metrics"][key] == pytest.approx(metrics[key], rel=1e-4), key
    weights = ranks[0]["weights"]
    assert weights.keys() >= initial.keys()
    moved = 0
    for name, before in initial.items():
        ours, reference = weights[name] - before, one.model.get_parameter(name).detach() - before
        scale = float(reference.norm())
        moved += scale > 0
        error = float((ours - reference).norm())
        assert error <= 1e-3 * scale + 1e-9, f"{name}: change differs by {error:.2e} (change {scale:.2e})"
    assert moved > len(initial) // 2
