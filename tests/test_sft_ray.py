"""SFT on the Ray backend with FSDP2 on CPU (gloo): two workers take the same step as one, evaluate
and generate the same, their checkpoint is a Hugging Face folder, and checkpoints resume across
worker counts. Also `python -m verl.trainer.sft trainer.backend=ray` end to end.

Tolerances: fp32 on CPU, so two workers differ from one only in summation order: losses within a
relative 1e-5, gradient norms and weights after a step within 1e-4.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import ray
import torch

from verl.models.loading import load_model
from verl.protocol import DataProto, SamplingParams
from verl.single_controller.dispatch import Dispatch, registered_methods
from verl.single_controller.local import LocalWorkerGroup
from verl.single_controller.ray import RayWorkerGroup, ResourcePool
from verl.utils.dataset import PromptDataset, PromptDatasetConfig, collate_prompts
from verl.utils.sft_dataset import ConversationEncoder, collate_examples, read_conversations
from verl.workers.config import SFTModelConfig, SFTOptimConfig
from verl.workers.sft_worker import SFTWorker

ROOT = Path(__file__).resolve().parent.parent
LOSS_RTOL = 1e-5
STEP_RTOL = 1e-4
MICRO_BATCH = 2


def worker_kwargs(tiny_world: Path) -> dict:
    # Tower and projector frozen (the defaults, as in the original recipe): FSDP must cope with
    # frozen and trainable parameters in one unit. A warm-up schedule makes a lost schedule visible.
    optim = SFTOptimConfig(lr=1e-3, lr_scheduler_type="warmup", lr_warmup_steps=4, training_steps=10)
    return {
        "model_config": SFTModelConfig(model_path=str(tiny_world / "models" / "qwen2_5_vl")),
        "optim_config": optim,
        "micro_batch_size": MICRO_BATCH,
        "seed": 0,
    }


def local_worker(tiny_world: Path) -> LocalWorkerGroup:
    group = LocalWorkerGroup(SFTWorker(device="cpu", **worker_kwargs(tiny_world)))
    group.init_model()
    return group


def mixed_batch(tiny_world: Path, worker: SFTWorker) -> DataProto:
    """Four image conversations and four text-only ones, of different lengths."""
    cold = tiny_world / "data" / "cold_start"
    encoder = ConversationEncoder(worker.tokenizer, worker.processor)
    images = read_conversations(str(cold / "seethink.json"), str(cold))[:4]
    texts = read_conversations(str(cold / "text_only.json"))[:4]
    batch = collate_examples([encoder.encode(c) for c in images + texts], worker.tokenizer.pad_token_id)
    batch.meta_info["mini_batch_size"] = len(batch)  # as the trainer sends it
    return batch


def prompts(tiny_world: Path, worker: SFTWorker) -> DataProto:
    config = PromptDatasetConfig(format_prompt=str(ROOT / "examples/format_prompt/see_think.jinja"))
    dataset = PromptDataset(str(tiny_world / "data/digit_sum/test.parquet"), worker.tokenizer, worker.processor, config)
    batch = collate_prompts(
        [dataset[i] for i in range(3)], worker.tokenizer.pad_token_id
    )  # odd: one rank gets a pad row
    batch.meta_info["sampling"] = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    return batch


def metrics(output: DataProto) -> dict[str, float]:
    return output.meta_info["metrics"]


def assert_step_matches(ours: dict[str, float], reference: dict[str, float]) -> None:
    assert ours["train/label_tokens"] == reference["train/label_tokens"]
    assert ours["train/tokens"] == reference["train/tokens"]
    assert ours["train/loss"] == pytest.approx(reference["train/loss"], rel=LOSS_RTOL)
    assert ours["train/grad_norm"] == pytest.approx(reference["train/grad_norm"], rel=STEP_RTOL)
    assert ours["train/lr"] == reference["train/lr"]


def assert_same_weights(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(ours[name], value, atol=STEP_RTOL, rtol=0, msg=name)


@pytest.fixture(scope="module")
def scenario(tiny_world, tmp_path_factory):
    """One local worker and a group of two Ray workers take the same steps; each saves, and each
    resumes the other's save."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = SimpleNamespace(saves=tmp_path_factory.mktemp("sft_saves"))
    pool = ResourcePool(nnodes=1, workers_per_node=2, use_gpu=False, cpus_per_worker=1.0)
    kwargs = {**worker_kwargs(tiny_world), "device": "cpu"}
    group = RayWorkerGroup(pool, SFTWorker, kwargs, torch_threads=1, call_timeout_s=300)
    try:
        out.sizes_ray = group.init_model()
        local = LocalWorkerGroup(SFTWorker(device="cpu", **worker_kwargs(tiny_world)))
        out.sizes_local = local.init_model()
        out.initial = {k: v.clone() for k, v in local.worker.model.state_dict().items()}
        batch = mixed_batch(tiny_world, local.worker)
        out.batch = batch

        out.step1_local, out.step1_ray = metrics(local.train_step(batch)), metrics(group.train_step(batch))
        odd = batch[:5]  # the ranks get 3 rows each, one of them padding
        odd.meta_info = {}  # evaluation batches come without a mini-batch size
        out.eval_local, out.eval_ray = local.eval_loss(odd).batch, group.eval_loss(odd).batch
        check = prompts(tiny_world, local.worker)
        out.generated_local, out.generated_ray = local.generate_sequences(check), group.generate_sequences(check)
        local.save_checkpoint(str(out.saves / "one_worker"))
        group.save_checkpoint(str(out.saves / "two_workers"))
        out.after_step1_local = {k: v.clone() for k, v in local.worker.model.state_dict().items()}

        # 2 -> 1: a fresh local worker resumes the two workers' save; both take step 2.
        resumed = local_worker(tiny_world)
        resumed.load_checkpoint(str(out.saves / "two_workers"))
        out.step2_resumed, out.step2_ray = metrics(resumed.train_step(batch)), metrics(group.train_step(batch))
        group.save_checkpoint(str(out.saves / "two_workers_step2"))
        out.after_step2_resumed = {k: v.clone() for k, v in resumed.worker.model.state_dict().items()}

        # 1 -> 2: the group resumes the local worker's save; both take step 2.
        group.load_checkpoint(str(out.saves / "one_worker"))
        out.step2_local, out.step2_group_from_local = metrics(local.train_step(batch)), metrics(group.train_step(batch))
        yield out
    finally:
        group.shutdown()
        ray.shutdown()


def test_the_sft_worker_registers_every_method_the_trainer_calls():
    assert registered_methods(SFTWorker) == {
        "init_model": Dispatch.ONE_TO_ALL,
        "train_step": Dispatch.DP_COMPUTE,
        "eval_loss": Dispatch.DP_COMPUTE,
        "generate_sequences": Dispatch.DP_COMPUTE,
        "save_checkpoint": Dispatch.ONE_TO_ALL,
        "load_checkpoint": Dispatch.ONE_TO_ALL,
    }


def test_two_workers_take_the_same_step_as_one(scenario):
    assert scenario.sizes_ray == scenario.sizes_local
    assert scenario.sizes_local["trainable_params"] < scenario.sizes_local["params"]  # the tower is frozen
    assert scenario.step1_local["train/grad_norm"] > 0
    assert_step_matches(scenario.step1_ray, scenario.step1_local)


def test_two_workers_evaluate_and_generate_as_one(scenario):
    # Per row, in the caller's order, without the padding row.
    assert len(scenario.eval_ray["loss_sum"]) == len(scenario.eval_local["loss_sum"]) == 5
    assert torch.equal(scenario.eval_ray["label_tokens"], scenario.eval_local["label_tokens"])
    torch.testing.assert_close(scenario.eval_ray["loss_sum"], scenario.eval_local["loss_sum"], rtol=LOSS_RTOL, atol=0)
    assert torch.equal(scenario.generated_ray.batch["responses"], scenario.generated_local.batch["responses"])


def test_the_two_worker_checkpoint_is_a_model_folder_with_the_trained_weights(scenario):
    folder = scenario.saves / "two_workers"
    assert (folder / "optimizer" / ".metadata").is_file()
    saved = load_model(str(folder), torch.float32, "sdpa").state_dict()
    assert_same_weights(saved, scenario.after_step1_local)
    visual = [name for name in saved if name.startswith("model.visual.")]
    assert visual and all(torch.equal(saved[name], scenario.initial[name]) for name in visual)
    assert not torch.equal(saved["lm_head.weight"], scenario.initial["lm_head.weight"])


def test_checkpoints_resume_across_worker_counts(scenario):
    # The optimizer's moments and the schedule came along: step 2 agrees, and so do the weights after it.
    assert_step_matches(scenario.step2_ray, scenario.step2_resumed)
    after = load_model(str(scenario.saves / "two_workers_step2"), torch.float32, "sdpa").state_dict()
    assert_same_weights(after, scenario.after_step2_resumed)
    assert_step_matches(scenario.step2_group_from_local, scenario.step2_local)


def test_the_cli_trains_on_two_ray_workers(tiny_world, tmp_path):
    cold = tiny_world / "data" / "cold_start"
    out = tmp_path / "run"
    check = tmp_path / "check.parquet"
    pq.write_table(pq.read_table(tiny_world / "data/digit_sum/test.parquet").slice(0, 16), check)
    subsets = {}
    for name in ("seethink.json", "text_only.json", "seethink_val.json"):
        subsets[name] = tmp_path / name
        subsets[name].write_text(json.dumps(json.loads((cold / name).read_text())[:16]))
    args = [
        f"config={ROOT / 'examples' / 'sft_config.yaml'}",
        f"data.train_files=[{subsets['seethink.json']},{subsets['text_only.json']}]",
        f"data.val_files=[{subsets['seethink_val.json']}]",
        f"data.image_dir={cold}",
        "data.batch_size=8",
        f"model.model_path={tiny_world / 'models' / 'qwen2_5_vl'}",
        f"eval.generation_files={check}",
        f"eval.format_prompt={ROOT / 'examples/format_prompt/see_think.jinja'}",
        f"eval.reward_function={ROOT / 'examples/reward_function/digit_sum.py'}:compute_score",
        "eval.max_new_tokens=8",
        "trainer.max_steps=2",
        "trainer.micro_batch_size=2",
        "trainer.backend=ray",
        "trainer.n_gpus_per_node=2",
        "trainer.device=cpu",
        "trainer.logger=[file]",
        f"trainer.save_checkpoint_path={out}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "verl.trainer.sft", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    step = out / "global_step_2"
    assert (step / "trainer_state.json").is_file() and (step / "actor" / "optimizer").is_dir()
    evaluation = json.loads((step / "eval_metrics.json").read_text())
    assert evaluation["val/loss"] > 0 and 0.0 <= evaluation["gen/format"] <= 1.0
    # The RL trainer's starting point: the actor folder loads as a plain model.
    assert (
        load_model(str(step / "actor"), torch.float32, "sdpa").state_dict().keys()
        == load_model(str(tiny_world / "models" / "qwen2_5_vl"), torch.float32, "sdpa").state_dict().keys()
    )
