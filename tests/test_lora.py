"""LoRA training (worker.actor.model.lora, model.lora for SFT) on the tiny Qwen2.5-VL.

The actor trains only its adapters; the reference policy is the same module with the adapters off
and equals a separately loaded base model; the hf engine samples from the adapted model; two FSDP2
workers (gloo) compute what one does; a checkpoint holds the adapter in peft's format and resumes
exactly; the merger's Hugging Face folder gives the trained model's logits. On each vision family
(Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5) the default adapters reach the text layers and not
the vision tower, and the merged weights are the base weights plus the adapters' delta.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from peft import PeftModel
from transformers import AutoModelForImageTextToText

from verl.protocol import DataProto, SamplingParams
from verl.utils.config import ConfigError
from verl.utils.dataset import PromptDataset, PromptDatasetConfig, PromptLoader, collate_prompts
from verl.utils.network import free_port
from verl.workers import lora
from verl.workers.actor.dp_actor import forward_response_logits
from verl.workers.config import WorkerConfig
from verl.workers.fsdp_worker import ActorRolloutRefWorker
from verl.workers.rollout.base import rollout_output

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("model_merger", ROOT / "scripts" / "model_merger.py")
model_merger = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model_merger)

LOGITS_ATOL = 1e-5  # fp32 on CPU: merged and adapted layers differ only in summation order


def worker_config(tiny_world: Path, rank: int = 4, model_name: str = "qwen2_5_vl") -> WorkerConfig:
    config = WorkerConfig()
    config.actor.model.model_path = str(tiny_world / "models" / model_name)
    config.actor.model.lora.rank = rank
    config.actor.model.lora.alpha = 8
    config.actor.optim.lr = 1e-2  # visible changes after one step
    # A changing learning rate, so a resume that lost the schedule shows up.
    config.actor.optim.lr_scheduler_type = "warmup"
    config.actor.optim.lr_warmup_steps = 3
    config.actor.optim.training_steps = 10
    config.actor.micro_batch_size_per_device_for_update = 4
    return config


def make_worker(tiny_world: Path, rank: int = 4, need_ref: bool = True) -> ActorRolloutRefWorker:
    worker = ActorRolloutRefWorker(worker_config(tiny_world, rank), device="cpu", need_ref=need_ref, seed=0)
    worker.init_model()
    return worker


@torch.no_grad()
def response_logits(model: torch.nn.Module, batch) -> torch.Tensor:
    model.eval()
    logits, _ = forward_response_logits(model, batch, temperature=1.0)
    return logits.cpu()


@pytest.fixture(scope="module")
def base_worker(tiny_world):
    """Full fine-tuning setup: the plain base model (and its separately loaded reference)."""
    return make_worker(tiny_world, rank=0, need_ref=False)


@pytest.fixture(scope="module")
def prompts(tiny_world, base_worker):
    dataset = PromptDataset(
        str(tiny_world / "data/digit_sum/val.parquet"),
        base_worker.tokenizer,
        base_worker.processor,
        PromptDatasetConfig(format_prompt=str(ROOT / "examples/format_prompt/see_think.jinja")),
    )
    loader = PromptLoader(dataset, 4, shuffle=False, seed=0, pad_token_id=base_worker.tokenizer.pad_token_id)
    return next(iter(loader))


@pytest.fixture(scope="module")
def batch(base_worker, prompts):
    """Four image prompts, two samples each, with old and reference log-probs and fixed advantages."""
    prompts.meta_info["sampling"] = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=3)
    batch = base_worker.generate_sequences(prompts)
    batch.meta_info = {"temperature": 1.0, "mini_batch_size": len(batch)}
    batch = batch.union(base_worker.compute_log_probs(batch).select(["old_log_probs"]))
    batch.batch["ref_log_probs"] = batch.batch["old_log_probs"].clone()  # the base model is the reference (KL on)
    batch.batch["advantages"] = torch.linspace(-1.0, 1.0, len(batch))[:, None] * batch.batch["response_mask"]
    return batch


@pytest.fixture(scope="module")
def trained(tiny_world, batch):
    """A LoRA worker after one update (the adapters' B starts at zero: before it, LoRA is a no-op)."""
    worker = make_worker(tiny_world)
    base = {name: p.detach().clone() for name, p in worker.model.named_parameters() if not lora.is_lora_param(name)}
    worker.update_actor(batch)
    worker.base_before = base
    return worker


def test_only_the_adapters_train_and_no_reference_copy_is_loaded(trained):
    assert trained.ref_model is None, "the reference is the actor with its adapters off, not a second model"
    trainable = {name for name, p in trained.model.named_parameters() if p.requires_grad}
    assert trainable and all(lora.is_lora_param(name) for name in trainable)
    assert not any("visual" in name for name in trainable), "the vision tower and projector get no adapters"
    assert any(".mlp." in name for name in trainable) and any(".self_attn." in name for name in trainable)
    for name, p in trained.model.named_parameters():
        if not lora.is_lora_param(name):
            assert torch.equal(p, trained.base_before[name]), f"frozen base weight {name} changed"


def test_reference_log_probs_are_the_base_models(trained, base_worker, batch):
    ref = trained.compute_ref_log_probs(batch).batch["ref_log_probs"]
    base = base_worker.compute_log_probs(batch).batch["old_log_probs"]
    mask = batch.batch["response_mask"].bool()
    torch.testing.assert_close(ref[mask], base[mask], atol=1e-6, rtol=0)
    actor = trained.compute_log_probs(batch).batch["old_log_probs"]
    assert (actor[mask] - ref[mask]).abs().max() > 1e-3, "the trained adapters should move the policy"
    # The adapters are on again (and trainable) after the reference pass.
    torch.testing.assert_close(trained.compute_log_probs(batch).batch["old_log_probs"], actor, atol=0, rtol=0)
    assert all(p.requires_grad for name, p in trained.model.named_parameters() if lora.is_lora_param(name))


def test_hf_rollout_samples_from_the_adapted_model(trained, base_worker, prompts):
    prompts.meta_info["sampling"] = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    adapted = trained.generate_sequences(prompts).batch["responses"]
    # A plain model holding the merged weights (what the vLLM engine receives) samples the same tokens.
    merged = dict(lora.merged_weights(trained.model))
    original = {name: p.detach().clone() for name, p in base_worker.model.named_parameters()}
    try:
        base_worker.model.load_state_dict(merged, strict=False)
        assert torch.equal(base_worker.generate_sequences(prompts).batch["responses"], adapted)
    finally:
        base_worker.model.load_state_dict(original, strict=False)
    assert not torch.equal(base_worker.generate_sequences(prompts).batch["responses"], adapted), (
        "the adapters should change the greedy responses"
    )


def test_checkpoint_is_a_peft_adapter_and_resumes_exactly(tiny_world, trained, batch, tmp_path):
    path = tmp_path / "actor"
    trained.save_checkpoint(str(path))
    assert (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
    assert not (path / "model.safetensors").exists(), "the frozen base weights are not copied"
    assert (path / "optimizer" / ".metadata").is_file() and (path / "config.json").is_file()
    resumed = make_worker(tiny_world)
    resumed.load_checkpoint(str(path))
    # The next step (lr still warming up) from both gives the same metrics and the same model.
    ours, theirs = trained.update_actor(batch).meta_info["metrics"], resumed.update_actor(batch).meta_info["metrics"]
    for key in ("actor/loss", "actor/grad_norm", "actor/lr"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key
    torch.testing.assert_close(response_logits(resumed.model, batch), response_logits(trained.model, batch))
    # A full-weight model cannot resume a LoRA checkpoint by mistake.
    with pytest.raises(ValueError, match="holds a LoRA adapter but the model has no adapters"):
        make_worker(tiny_world, rank=0, need_ref=False).load_checkpoint(str(path))


def test_merged_and_adapter_only_exports_give_the_trained_logits(tiny_world, trained, batch, tmp_path, monkeypatch):
    trained.save_checkpoint(str(tmp_path / "actor"))
    expected = response_logits(trained.model, batch)
    argv = ["model_merger.py", f"--local_dir={tmp_path / 'actor'}", f"--target_dir={tmp_path / 'merged'}"]
    monkeypatch.setattr(sys, "argv", argv)
    model_merger.main()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(response_logits(merged, batch), expected, atol=LOGITS_ATOL, rtol=0)

    monkeypatch.setattr(sys, "argv", [*argv[:2], f"--target_dir={tmp_path / 'adapter'}", "--adapter_only"])
    model_merger.main()
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    base = AutoModelForImageTextToText.from_pretrained(tiny_world / "models" / "qwen2_5_vl")
    with_adapter = PeftModel.from_pretrained(base, tmp_path / "adapter").base_model.model
    torch.testing.assert_close(response_logits(with_adapter, batch), expected, atol=LOGITS_ATOL, rtol=0)


def test_a_saved_adapter_starts_a_new_run(tiny_world, trained, batch, tmp_path):
    trained.save_checkpoint(str(tmp_path / "actor"))
    config = worker_config(tiny_world)
    config.actor.model.lora.adapter_path = str(tmp_path / "actor")
    config.check("worker")
    started = ActorRolloutRefWorker(config, device="cpu", need_ref=False, seed=0)
    started.init_model()
    torch.testing.assert_close(response_logits(started.model, batch), response_logits(trained.model, batch))
    config.actor.model.lora.rank = 8
    with pytest.raises(ValueError, match="has rank 4 and alpha 8"):
        ActorRolloutRefWorker(config, device="cpu", need_ref=False, seed=0).init_model()


def test_lora_keys_are_checked_at_load(tiny_world, tmp_path):
    config = worker_config(tiny_world)
    config.actor.kl_penalty = "full"
    with pytest.raises(ConfigError, match="algorithm.kl_penalty.*not available with LoRA"):
        config.check("worker")
    config = worker_config(tiny_world)
    config.actor.model.lora.adapter_path = str(tmp_path)
    with pytest.raises(ConfigError, match=r"worker.actor.model.lora.adapter_path.*no adapter_config.json"):
        config.check("worker")
    config.actor.model.model_path = str(tmp_path / "lora_ckpt")
    (tmp_path / "lora_ckpt").mkdir()
    (tmp_path / "lora_ckpt" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"worker.actor.model.model_path.*is a LoRA checkpoint.*lora.adapter_path"):
        config.check("worker")
    config = worker_config(tiny_world)
    config.actor.model.lora.rank = -1
    with pytest.raises(ConfigError, match=r"worker.actor.model.lora.rank"):
        config.check("worker")


def test_a_lora_cold_start_feeds_a_lora_rl_run(tiny_world, batch, tmp_path):
    """SFT with model.lora.* trains only adapters and saves the same adapter layout; the RL actor
    starts from it (worker.actor.model.lora.adapter_path) as exactly the SFT model."""
    from verl.utils.sft_dataset import ConversationEncoder, collate_examples, read_conversations
    from verl.workers.config import LoRAConfig, SFTModelConfig, SFTOptimConfig
    from verl.workers.sft_worker import SFTWorker

    model_dir = str(tiny_world / "models" / "qwen2_5_vl")
    model_config = SFTModelConfig(model_path=model_dir, lora=LoRAConfig(rank=4, alpha=8))
    model_config.check("model")
    sft = SFTWorker(model_config, SFTOptimConfig(lr=1e-2, lr_scheduler_type="constant", training_steps=10), 8, "cpu")
    sft.init_model()
    assert all(lora.is_lora_param(name) for name, p in sft.model.named_parameters() if p.requires_grad)
    cold = tiny_world / "data" / "cold_start"
    encoder = ConversationEncoder(sft.tokenizer, sft.processor)
    conversations = read_conversations(str(cold / "seethink.json"), str(cold))[:2]
    sft.train_step(collate_examples([encoder.encode(c) for c in conversations], sft.tokenizer.pad_token_id))
    sft.save_checkpoint(str(tmp_path / "sft"))

    config = worker_config(tiny_world)
    config.actor.model.lora.adapter_path = str(tmp_path / "sft")
    rl = ActorRolloutRefWorker(config, device="cpu", need_ref=False, seed=0)
    rl.init_model()
    expected = response_logits(sft.model, batch)
    torch.testing.assert_close(response_logits(rl.model, batch), expected, atol=0, rtol=0)
    base = make_worker(tiny_world, rank=0, need_ref=False)
    assert (response_logits(base.model, batch) - expected).abs().max() > 1e-3, "the SFT step should have trained"


# --- every vision family -------------------------------------------------------------------------
# The layers the default target ("all-linear": every nn.Linear but the output head) adapts in each
# family's first text layer. Qwen3.5's first layer is a gated delta-net one (its projections are
# linear; its causal conv1d is not); Qwen3-VL-MoE's experts are fused 3-D parameters and its router
# a bare weight, neither an nn.Linear, so only its attention gets adapters (see
# verl/models/families/qwen3_vl.py).
FIRST_LAYER_ADAPTED = {
    "qwen2_5_vl": {"self_attn." + p for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    | {"mlp." + p for p in ("gate_proj", "up_proj", "down_proj")},
    "qwen3_vl": {"self_attn." + p for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    | {"mlp." + p for p in ("gate_proj", "up_proj", "down_proj")},
    "qwen3_vl_moe": {"self_attn." + p for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    "qwen3_5": {"linear_attn." + p for p in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")}
    | {"mlp." + p for p in ("gate_proj", "up_proj", "down_proj")},
}


def family_batch(tiny_world: Path, worker: ActorRolloutRefWorker) -> DataProto:
    """Two image prompts and one text prompt with fixed random responses."""
    config = PromptDatasetConfig(format_prompt=str(ROOT / "examples/format_prompt/see_think.jinja"))
    images = PromptDataset(str(tiny_world / "data/digit_sum/val.parquet"), worker.tokenizer, worker.processor, config)
    texts = PromptDataset(str(tiny_world / "data/text_sum/val.parquet"), worker.tokenizer, worker.processor, config)
    prompts = collate_prompts([images[0], texts[0], images[1]], worker.tokenizer.pad_token_id)
    mask = (torch.arange(8)[None, :] < torch.tensor([[8], [5], [3]])).long()
    responses = torch.randint(3, 200, mask.shape, generator=torch.Generator().manual_seed(0)).masked_fill(mask == 0, 0)
    return rollout_output(worker.model, prompts, responses, mask, None, {})


@pytest.mark.parametrize("model_name", ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5"])
def test_default_adapters_reach_every_familys_text_layers_and_merge_into_base_plus_delta(tiny_world, model_name):
    worker = ActorRolloutRefWorker(worker_config(tiny_world, model_name=model_name), "cpu", need_ref=False, seed=0)
    worker.init_model()
    model = worker.model
    adapted = {name for name, module in model.named_modules() if hasattr(module, "base_layer")}
    # The vision tower (Qwen3's deepstack mergers included) keeps no adapter and nothing there trains.
    assert adapted and not any("visual" in name for name in adapted)
    assert not any(p.requires_grad for name, p in model.named_parameters() if "visual" in name)
    base = AutoModelForImageTextToText.from_pretrained(tiny_world / "models" / model_name)
    linear = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "visual" not in n}
    assert adapted == linear - {"lm_head"}, "all-linear adapts every linear layer of the text model"
    first = {name.split(".layers.0.")[1] for name in adapted if ".language_model.layers.0." in name}
    assert first == FIRST_LAYER_ADAPTED[model_name]
    if model_name == "qwen3_5":  # its full-attention layers are adapted too
        assert any(name.endswith("self_attn.q_proj") for name in adapted)

    # Trained adapters (B starts at zero): merged weights are the base weights plus (alpha / rank) B A.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    merged = dict(lora.merged_weights(model))
    base_weights = dict(base.named_parameters())
    assert merged.keys() == base_weights.keys()
    scaling = worker.config.actor.model.lora.alpha / worker.config.actor.model.lora.rank
    for name in adapted:
        layer = model.get_submodule(name)
        delta = scaling * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        torch.testing.assert_close(merged[f"{name}.weight"], base_weights[f"{name}.weight"] + delta, msg=name)
    for name, weight in merged.items():
        if name.rpartition(".")[0] not in adapted:
            assert torch.equal(weight, base_weights[name]), f"{name} is not adapted but changed"
    # A plain model holding the merged weights (what the vLLM engine receives) computes the adapted model's logits.
    batch = family_batch(tiny_world, worker)
    adapted_logits = response_logits(model, batch)
    assert (response_logits(base, batch) - adapted_logits).abs().max() > 1e-3, "the adapters should move the logits"
    loaded = base.load_state_dict(merged, strict=False)
    assert not loaded.unexpected_keys and set(loaded.missing_keys) <= {"lm_head.weight"}  # tied to the embedding
    torch.testing.assert_close(response_logits(base, batch), adapted_logits, atol=LOGITS_ATOL, rtol=0)


# --- two FSDP2 workers (gloo) against one -----------------------------------------------------
def _two_worker_rank(rank: int, world_size: int, port: int, config: WorkerConfig, batch_file: str, out: str) -> None:
    """One of two FSDP2 workers: reference log-probs, one update on its half, merged weights, a save."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    worker = ActorRolloutRefWorker(config, device="cpu", need_ref=True, seed=0)
    worker.init_model()
    batch = torch.load(batch_file, weights_only=False)
    worker.update_actor(batch.chunk(world_size)[rank])
    ref = worker.compute_ref_log_probs(batch).batch["ref_log_probs"]
    merged = dict(lora.merged_weights(worker.model))  # what the vLLM engine receives; every rank gathers
    worker.save_checkpoint(os.path.join(out, "actor"))
    logits = response_logits(worker.model, batch)
    if rank == 0:
        torch.save({"ref": ref, "merged": merged, "logits": logits}, os.path.join(out, "results.pt"))


@pytest.mark.slow
def test_two_fsdp_workers_match_one(tiny_world, base_worker, batch, tmp_path):
    batch_file = str(tmp_path / "batch.pt")
    torch.save(batch, batch_file)
    mp.spawn(_two_worker_rank, args=(2, free_port(), worker_config(tiny_world), batch_file, str(tmp_path)), nprocs=2)
    results = torch.load(tmp_path / "results.pt")
    one = make_worker(tiny_world)
    one.update_actor(batch)
    torch.testing.assert_close(results["logits"], response_logits(one.model, batch), atol=1e-5, rtol=0)
    ref = base_worker.compute_log_probs(batch).batch["old_log_probs"]
    torch.testing.assert_close(results["ref"], ref, atol=1e-6, rtol=0)
    ones = dict(lora.merged_weights(one.model))
    assert results["merged"].keys() == ones.keys() == dict(base_worker.model.named_parameters()).keys()
    for name, tensor in ones.items():
        torch.testing.assert_close(results["merged"][name], tensor, atol=1e-6, rtol=0, msg=name)
    # The two workers' save resumes in one process.
    resumed = make_worker(tiny_world)
    resumed.load_checkpoint(str(tmp_path / "actor"))
    torch.testing.assert_close(response_logits(resumed.model, batch), results["logits"])
