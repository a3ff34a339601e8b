"""Cold-start SFT: assistant-only labels, mixed batches, learning, frozen vision parts, checkpoints that
transformers and the RL worker load, evaluation metrics, and the LLaMA-Factory route's files."""

import copy
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText

from verl.models.families import family_of_path
from verl.models.loading import load_tokenizer_and_processor
from verl.trainer.sft import build_trainer
from verl.trainer.sft_config import SFTConfig
from verl.utils.config import ConfigError, load_config
from verl.utils.grading import extract_boxed, grade_answer, see_think_format_ok
from verl.utils.sft_dataset import (
    IGNORE_INDEX,
    Conversation,
    ConversationEncoder,
    SFTDataset,
    SFTLoader,
    collate_examples,
    read_conversations,
)
from verl.workers.config import ModelConfig, SFTModelConfig, SFTOptimConfig, WorkerConfig
from verl.workers.fsdp_worker import ActorRolloutRefWorker
from verl.workers.sft_worker import SFTWorker

ROOT = Path(__file__).resolve().parent.parent
LLAMA_FACTORY_DIR = ROOT / "LLaMA-Factory-Cold-Start"
IMAGE = "images/train_00000.png"
# The vision-language families of the tiny world; a test runs on each with
# `@pytest.mark.parametrize("model_dir", VL_FAMILIES, indirect=True)`, on Qwen2.5-VL otherwise.
VL_FAMILIES = ["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5"]
on_every_family = pytest.mark.parametrize("model_dir", VL_FAMILIES, indirect=True)


# ---------------------------------------------------------------- helpers and fixtures
@pytest.fixture(scope="module")
def model_dir(tiny_world, request) -> str:
    """The tiny world's model of the family the test is parametrized with (Qwen2.5-VL by default)."""
    return str(tiny_world / "models" / getattr(request, "param", "qwen2_5_vl"))


@pytest.fixture(scope="module")
def encoder(model_dir) -> ConversationEncoder:
    tokenizer, processor = load_tokenizer_and_processor(model_dir)
    return ConversationEncoder(tokenizer, processor)


def _cold_start(world: Path) -> Path:
    return world / "data" / "cold_start"


def _subset(world: Path, out: Path, name: str, rows: int) -> str:
    """The first `rows` rows of a cold-start file, written to `out` (images stay in the world's folder)."""
    data = json.loads((_cold_start(world) / name).read_text())[:rows]
    path = out / name
    path.write_text(json.dumps(data))
    return str(path)


def _conversation(turns, images=(), image_dir=None) -> Conversation:
    return Conversation(list(turns), list(images), image_dir, "test row")


def _script_module(name: str):
    """A module of scripts/ (not a package), loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _worker(model_dir: str, **model_overrides) -> SFTWorker:
    model_config = SFTModelConfig(model_path=model_dir, **model_overrides)
    worker = SFTWorker(
        model_config, SFTOptimConfig(lr=1e-3, lr_scheduler_type="constant", training_steps=100), 8, device="cpu"
    )
    worker.init_model()
    return worker


def _decoded_labels(encoder: ConversationEncoder, example) -> str:
    labeled = [token for token, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert labeled == [label for label in example.labels if label != IGNORE_INDEX]  # labels equal their inputs
    return encoder.tokenizer.decode(labeled)


# ---------------------------------------------------------------- labels and batches
@on_every_family
def test_labels_are_exactly_the_assistant_replies_and_their_end_tokens(tiny_world, encoder):
    replies = ["<think>3 + 5 = 8.</think> \\boxed{8}", "It is 8."]
    conversation = _conversation(
        [("user", "<image>What is the sum?"), ("assistant", replies[0]), ("user", "Again?"), ("assistant", replies[1])],
        [IMAGE],
        str(_cold_start(tiny_world)),
    )
    example = encoder.encode(conversation)
    assert _decoded_labels(encoder, example) == "".join(reply + "<|im_end|>" for reply in replies)

    # The same tokens as the stock processor gives for the whole conversation, image tokens included.
    messages = encoder._chat_messages(conversation, 1)
    text = encoder.processor.apply_chat_template(messages, tokenize=False)
    image = encoder._open_images(conversation)
    stock = encoder.processor(text=[text], images=image, add_special_tokens=False, return_tensors="pt")
    assert example.input_ids == stock["input_ids"][0].tolist()
    assert torch.equal(example.multi_modal_inputs["pixel_values"], stock["pixel_values"])


def test_alpaca_rows_are_text_only_with_the_input_on_a_new_line(tmp_path, encoder):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Add 2 and 3.", "input": "Be brief.", "output": "\\boxed{5}"}]))
    (conversation,) = read_conversations(str(path))
    assert conversation.turns == [("user", "Add 2 and 3.\nBe brief."), ("assistant", "\\boxed{5}")]
    example = encoder.encode(conversation)
    assert example.multi_modal_inputs == {}
    assert _decoded_labels(encoder, example) == "\\boxed{5}<|im_end|>"


def test_sharegpt_images_without_placeholder_go_first_and_mismatches_name_the_row(tiny_world, encoder):
    image_dir = str(_cold_start(tiny_world))
    implicit = encoder.encode(_conversation([("user", "Sum?"), ("assistant", "8")], [IMAGE], image_dir))
    explicit = encoder.encode(_conversation([("user", "<image>Sum?"), ("assistant", "8")], [IMAGE], image_dir))
    assert implicit.input_ids == explicit.input_ids
    with pytest.raises(ValueError, match="test row: 2 `<image>` placeholders but 1 images"):
        encoder.encode(_conversation([("user", "<image><image>Sum?"), ("assistant", "8")], [IMAGE], image_dir))


@on_every_family
def test_an_image_example_and_a_text_example_train_in_one_batch(tiny_world, tmp_path, encoder, model_dir):
    cold = _cold_start(tiny_world)
    image_example = read_conversations(_subset(tiny_world, tmp_path, "seethink.json", 1), str(cold))[0]
    text_example = read_conversations(_subset(tiny_world, tmp_path, "text_only.json", 1))[0]
    examples = [encoder.encode(image_example), encoder.encode(text_example)]
    batch = collate_examples(examples, encoder.tokenizer.pad_token_id)
    assert [bool(mm) for mm in batch.non_tensor_batch["multi_modal_inputs"]] == [True, False]
    # Right padding: the shorter row ends in pads that carry no label.
    short = int(np.argmin([len(e.input_ids) for e in examples]))
    assert batch.batch["labels"][short, -1] == IGNORE_INDEX and batch.batch["attention_mask"][short, -1] == 0

    worker = _worker(model_dir, freeze_vision_tower=False, freeze_projector=False)
    patch_embedding = worker.model.model.visual.patch_embed.proj.weight.detach().clone()
    metrics = worker.train_step(batch).meta_info["metrics"]
    assert math.isfinite(metrics["train/loss"]) and metrics["train/skipped_step"] == 0.0
    assert metrics["train/label_tokens"] == sum(1 for e in examples for label in e.labels[1:] if label != IGNORE_INDEX)
    # The image row's loss reached the vision tower through the mixed batch.
    assert not torch.equal(patch_embedding, worker.model.model.visual.patch_embed.proj.weight)


@on_every_family
def test_batch_loss_is_the_mean_over_labeled_tokens_of_hf_per_example_losses(tiny_world, tmp_path, encoder, model_dir):
    """Our loss per example equals transformers' own, with the 3-D positions transformers computes
    itself (from the token types the processor marks) reaching the text model in both forwards."""
    path = _subset(tiny_world, tmp_path, "seethink.json", 2)
    examples = [encoder.encode(c) for c in read_conversations(path, str(_cold_start(tiny_world)))]
    examples[1].labels[-3] = IGNORE_INDEX  # unequal label counts make a wrong weighting visible
    worker = _worker(model_dir)
    result = worker.eval_loss(collate_examples(examples, encoder.tokenizer.pad_token_id)).batch

    seen_positions: list[torch.Tensor] = []
    hook = worker.model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen_positions.append(kwargs["position_ids"]), with_kwargs=True
    )
    expected_sum, expected_tokens = 0.0, 0
    for example in examples:  # one row each: no padding; transformers shifts labels itself
        single = collate_examples([example], encoder.tokenizer.pad_token_id)
        count = sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)
        token_types = torch.tensor(encoder.processor.create_mm_token_type_ids(single.batch["input_ids"].tolist()))
        seen_positions.clear()
        with torch.no_grad():
            loss = worker._row_losses(single)[0].sum()
            # No position_ids: the model places the image tokens itself (its get_rope_index).
            hf_loss = worker.model(
                input_ids=single.batch["input_ids"],
                mm_token_type_ids=token_types,
                labels=single.batch["labels"],
                **example.multi_modal_inputs,
            ).loss
        ours, native = seen_positions
        assert torch.equal(ours, native)
        assert not torch.equal(native[1], native[2])  # 3-D: the image tokens' height and width rows differ
        torch.testing.assert_close(loss / count, hf_loss, rtol=1e-4, atol=1e-5)
        expected_sum += float(loss)
        expected_tokens += count
    hook.remove()
    assert result["label_tokens"].sum() == expected_tokens
    assert float(result["loss_sum"].sum()) == pytest.approx(expected_sum, rel=1e-5)


# ---------------------------------------------------------------- data order
def test_loader_draws_each_file_by_its_ratio_and_resumes_exactly(tiny_world, tmp_path, encoder):
    cold = str(_cold_start(tiny_world))
    files = [_subset(tiny_world, tmp_path, name, rows) for name, rows in (("think.json", 8), ("text_only.json", 6))]
    dataset = SFTDataset(files, encoder, max_length=4096, image_dir=cold)
    loader = SFTLoader(dataset, batch_size=4, pad_token_id=0, seed=3, ratios=[0.5, 2.0], group_by_length=True)
    assert loader.examples_per_epoch == 4 + 12 and len(loader) == 4
    think_rows, text_rows = (rows.tolist() for rows in dataset.file_rows)
    orders = [np.concatenate(loader.epoch_batches(epoch)).tolist() for epoch in (0, 1)]
    for order in orders:
        drawn_think = [i for i in order if i in think_rows]
        assert len(drawn_think) == len(set(drawn_think)) == 4  # a fresh half, no repeats
        assert all(order.count(i) == 2 for i in text_rows)
    assert orders[0] != orders[1]

    iterator = iter(loader)
    next(iterator)
    resumed = SFTLoader(dataset, batch_size=4, pad_token_id=0, seed=3, ratios=[0.5, 2.0], group_by_length=True)
    resumed.load_state_dict(loader.state_dict())
    rest = list(resumed)
    expected = loader.epoch_batches(0)[1:]
    assert len(rest) == len(expected) == 3
    for batch, indices in zip(rest, expected):
        again = collate_examples([dataset[int(i)] for i in indices], 0)
        assert torch.equal(batch.batch["input_ids"], again.batch["input_ids"])
    assert resumed.state_dict() == {"epoch": 1, "batches_done": 0, "seed": 3}


def test_grouping_by_length_reduces_padding(tiny_world, tmp_path, encoder):
    cold = str(_cold_start(tiny_world))
    files = [_subset(tiny_world, tmp_path, name, 16) for name in ("seethink.json", "think.json", "text_only.json")]
    dataset = SFTDataset(files, encoder, max_length=4096, image_dir=cold)
    lengths = np.array(dataset.lengths)

    def padding(group_by_length: bool) -> int:
        loader = SFTLoader(dataset, 8, 0, seed=1, group_by_length=group_by_length)
        return sum(int(lengths[b].max() * len(b) - lengths[b].sum()) for b in loader.epoch_batches(0))

    assert padding(True) < padding(False) / 2


def test_over_long_examples_are_dropped_not_truncated(tiny_world, tmp_path, encoder):
    cold = _cold_start(tiny_world)
    rows = json.loads((cold / "think.json").read_text())[:3] + json.loads((cold / "seethink.json").read_text())[:2]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows))
    path = str(path)
    lengths = SFTDataset([path], encoder, 4096, str(_cold_start(tiny_world))).lengths
    kept = SFTDataset([path], encoder, max(lengths) - 1, str(_cold_start(tiny_world)))
    assert len(kept) == sum(length < max(lengths) for length in lengths)
    # Each kept example keeps its row number in the file, so the account of trained rows names file rows.
    assert kept.row_ids == [row for row, length in enumerate(lengths) if length < max(lengths)]
    both = SFTDataset([path, path], encoder, max(lengths) - 1, str(_cold_start(tiny_world)))
    assert both.row_ids == kept.row_ids + [len(rows) + row for row in kept.row_ids]  # the second file follows the first


# ---------------------------------------------------------------- the model step
# 7-15 s per family: Qwen3-VL, Qwen3-VL-MoE's dense twin, runs in the slow tier only.
@pytest.mark.parametrize(
    "model_dir",
    [pytest.param(f, marks=pytest.mark.slow) if f == "qwen3_vl" else f for f in VL_FAMILIES],
    indirect=True,
)
def test_loss_decreases_over_twenty_steps(tiny_world, tmp_path, encoder, model_dir):
    cold = str(_cold_start(tiny_world))
    files = [_subset(tiny_world, tmp_path, name, 16) for name in ("seethink.json", "text_only.json")]
    loader = SFTLoader(SFTDataset(files, encoder, 4096, cold), 16, encoder.tokenizer.pad_token_id, seed=1)
    worker = _worker(model_dir, freeze_vision_tower=False, freeze_projector=False)
    losses = []
    while len(losses) < 20:
        for batch in loader:
            losses.append(worker.train_step(batch).meta_info["metrics"]["train/loss"])
    assert np.mean(losses[-3:]) < 0.5 * losses[0]


@on_every_family
def test_frozen_vision_tower_and_projector_keep_their_weights(tiny_world, tmp_path, encoder, model_dir):
    path = _subset(tiny_world, tmp_path, "seethink.json", 8)
    batch = collate_examples(
        [encoder.encode(c) for c in read_conversations(path, str(_cold_start(tiny_world)))],
        encoder.tokenizer.pad_token_id,
    )

    def changed_after_training(**overrides) -> dict[str, bool]:
        worker = _worker(model_dir, **overrides)
        before = {name: p.detach().clone() for name, p in worker.model.named_parameters()}
        for _ in range(3):
            worker.train_step(batch)
        return {name: not torch.equal(before[name], p) for name, p in worker.model.named_parameters()}

    changed = changed_after_training()  # defaults: tower and projector frozen, as in the original recipe
    visual = [name for name in changed if ".visual." in f".{name}"]
    assert visual and not any(changed[name] for name in visual)
    # Layer 0 is attention in most families and gated delta-net in Qwen3.5: some weight of it trained.
    assert any(changed[name] for name in changed if name.startswith("model.language_model.layers.0."))

    # The projector is every module the family names (Qwen3-VL: the merger and the deepstack mergers).
    projectors = family_of_path(model_dir).projector_modules
    projector_names = {
        module: [name for name in visual if name.startswith(f"model.visual.{module}.")] for module in projectors
    }
    changed = changed_after_training(freeze_vision_tower=True, freeze_projector=False)
    for module, names in projector_names.items():
        assert names and any(changed[name] for name in names), f"projector `visual.{module}` did not train"
    in_projector = {name for names in projector_names.values() for name in names}
    assert not any(changed[name] for name in visual if name not in in_projector)


# ---------------------------------------------------------------- the trainer: checkpoints and evaluation
def _short_run_args(tiny_world: Path, model_dir: str, out: Path) -> list[str]:
    """CLI arguments of a run of the trainer on small subsets (12 rows per file), checked on 12 test prompts."""
    cold = _cold_start(tiny_world)
    train = [_subset(tiny_world, out, name, 12) for name in ("seethink.json", "think.json", "text_only.json")]
    val = _subset(tiny_world, out, "seethink_val.json", 8)
    test_rows = out / "test.parquet"
    pq.write_table(pq.read_table(tiny_world / "data" / "digit_sum" / "test.parquet").slice(0, 12), test_rows)
    return [
        f"config={ROOT / 'examples' / 'sft_config.yaml'}",
        f"data.train_files=[{','.join(train)}]",
        f"data.val_files=[{val}]",
        f"data.image_dir={cold}",
        "data.batch_size=8",
        f"model.model_path={model_dir}",
        "optim.lr=1e-3",
        f"eval.generation_files={test_rows}",
        f"eval.format_prompt={ROOT / 'examples' / 'format_prompt' / 'see_think.jinja'}",
        f"eval.reward_function={ROOT / 'examples' / 'reward_function' / 'digit_sum.py'}:compute_score",
        "eval.max_new_tokens=24",
        "trainer.max_steps=3",
        "trainer.device=cpu",
        "trainer.logger=[file]",
        f"trainer.save_checkpoint_path={out / 'checkpoints'}",
    ]


@pytest.fixture(scope="module")
def short_run(tiny_world, model_dir, tmp_path_factory):
    """Three steps of the CLI's trainer on small subsets, evaluated and saved at the end."""
    out = tmp_path_factory.mktemp("sft_run")
    config = load_config(_short_run_args(tiny_world, model_dir, out), SFTConfig)
    trainer = build_trainer(config)
    metrics = trainer.fit()
    return out / "checkpoints", trainer, metrics


@on_every_family
def test_checkpoint_loads_with_transformers_and_the_rl_worker(short_run):
    root, trainer, _ = short_run
    actor = root / "global_step_3" / "actor"
    assert (root / "global_step_3" / "trainer_state.json").is_file()
    trained = trainer.wg.worker.model.state_dict()

    plain = AutoModelForImageTextToText.from_pretrained(actor)
    assert all(torch.equal(trained[name], value) for name, value in plain.state_dict().items())

    rl_config = WorkerConfig()
    rl_config.actor.model = ModelConfig(model_path=str(actor))
    rl_worker = ActorRolloutRefWorker(rl_config, device="cpu", need_ref=False)
    rl_worker.init_model()
    assert all(torch.equal(trained[name], value) for name, value in rl_worker.model.state_dict().items())
    assert rl_worker.processor is not None and rl_worker.tokenizer.padding_side == "left"
    assert rl_worker.model.generation_config.eos_token_id == plain.generation_config.eos_token_id

    merger = _script_module("model_merger")
    merger.merge_checkpoint(str(actor), str(root / "merged"))  # verifies every tensor against the checkpoint


@on_every_family
def test_evaluation_metrics_agree_with_the_written_generations(short_run):
    root, _, metrics = short_run
    saved = json.loads((root / "global_step_3" / "eval_metrics.json").read_text())
    assert saved["global_step"] == 3 and saved["val/loss"] == metrics["val/loss"] > 0
    rows = [json.loads(line) for line in (root / "generations_step_3.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert saved["gen/format"] == pytest.approx(np.mean([see_think_format_ok(r["response"]) for r in rows]))
    accuracy = np.mean([grade_answer(extract_boxed(r["response"]), r["ground_truth"]) for r in rows])
    assert saved["gen/accuracy"] == pytest.approx(accuracy)
    assert 0.0 <= saved["gen/perception"] <= 1.0


@on_every_family
def test_a_rerun_resumes_from_the_last_checkpoint(short_run):
    _, trainer, _ = short_run
    config = copy.deepcopy(trainer.config)
    config.trainer.max_steps = 4
    resumed = build_trainer(config)
    resumed._resume()
    assert resumed.global_step == 3
    assert resumed.train_loader.state_dict() == trainer.train_loader.state_dict()
    torch.testing.assert_close(
        resumed.wg.worker.optimizer.state_dict()["state"][0]["exp_avg"],
        trainer.wg.worker.optimizer.state_dict()["state"][0]["exp_avg"],
    )


def _read_rows(root: Path) -> dict[int, list[int]]:
    return {
        record["step"]: record["rows"] for record in map(json.loads, (root / "rows.jsonl").read_text().splitlines())
    }


def test_a_resumed_run_trains_on_the_same_rows_across_an_epoch_boundary(tiny_world, model_dir, tmp_path):
    """6 rows, 2 per step: an epoch is 3 steps and the run 5. A run stopped after step 2 and rerun
    to step 5 logs the rows of an uninterrupted run, and each epoch sees every row at most once."""
    train = _subset(tiny_world, tmp_path, "text_only.json", 6)

    def run(out: Path, steps: int) -> None:
        args = [
            f"data.train_files=[{train}]",
            "data.val_files=[]",
            "data.batch_size=2",
            f"model.model_path={model_dir}",
            "eval.generation_files=null",
            f"trainer.max_steps={steps}",
            "trainer.save_freq=1",
            "trainer.device=cpu",
            "trainer.logger=[file]",
            f"trainer.save_checkpoint_path={out}",
        ]
        build_trainer(load_config(args, SFTConfig)).fit()

    run(tmp_path / "reference", 5)
    run(tmp_path / "stopped", 2)
    assert sorted(_read_rows(tmp_path / "stopped")) == [1, 2]
    run(tmp_path / "stopped", 5)  # resumes from global_step_2
    reference, resumed = _read_rows(tmp_path / "reference"), _read_rows(tmp_path / "stopped")
    assert resumed == reference and sorted(resumed) == [1, 2, 3, 4, 5]
    assert all(len(rows) == 2 for rows in resumed.values())
    assert sorted(resumed[1] + resumed[2] + resumed[3]) == list(range(6))  # no row skipped or repeated
    assert len(set(resumed[4] + resumed[5])) == 4  # the next epoch starts afresh, no repeats within it
    records = [json.loads(line) for line in (tmp_path / "stopped" / "rows.jsonl").read_text().splitlines()]
    assert all(set(record) == {"step", "rows", "sha256"} for record in records)  # the RL trainer's format


def test_a_run_stops_at_the_first_check_that_meets_the_target_and_stays_stopped(
    tiny_world, model_dir, tmp_path, capsys
):
    # Format >= 0 is met by any check: the run must end at the first one (step 2), not at the cap (6).
    args = _short_run_args(tiny_world, model_dir, tmp_path)
    args += ["trainer.max_steps=6", "trainer.val_freq=2", "eval.stop_at={gen/format: 0.0, gen/accuracy: 0.0}"]
    trainer = build_trainer(load_config(args, SFTConfig))
    metrics = trainer.fit()
    root = tmp_path / "checkpoints"
    assert trainer.global_step == 2 and trainer.stopped_at == 2 and "gen/accuracy" in metrics
    assert sorted(p.name for p in root.glob("global_step_*")) == ["global_step_2"]
    assert json.loads((root / "global_step_2" / "trainer_state.json").read_text())["stopped_at"] == 2
    saved = json.loads((root / "global_step_2" / "eval_metrics.json").read_text())
    printed = capsys.readouterr().out
    assert "SFT stopped at step 2: target gen/format>=0.0, gen/accuracy>=0.0 reached" in printed
    assert f"gen/accuracy={saved['gen/accuracy']:.3f}" in printed
    # Run again (as after a crash between the save and the exit): it finds the stop and trains no further.
    again = build_trainer(load_config(args, SFTConfig))
    again.fit()
    assert again.global_step == 2 and sorted(p.name for p in root.glob("global_step_*")) == ["global_step_2"]
    assert "SFT stopped at step 2" in capsys.readouterr().out


def test_an_unmet_target_runs_to_the_cap_and_says_so(tiny_world, model_dir, tmp_path, capsys):
    args = _short_run_args(tiny_world, model_dir, tmp_path)
    args += ["trainer.max_steps=2", "trainer.val_freq=1", "eval.stop_at={gen/accuracy: 1.01}"]
    trainer = build_trainer(load_config(args, SFTConfig))
    trainer.fit()
    assert trainer.global_step == 2 and trainer.stopped_at is None
    assert "SFT ended at the step cap (2) without reaching the target gen/accuracy>=1.01" in capsys.readouterr().out
    assert "stopped_at" not in json.loads(
        (tmp_path / "checkpoints" / "global_step_2" / "trainer_state.json").read_text()
    )


# ---------------------------------------------------------------- config
def test_reference_sft_yaml_is_generated_from_the_code():
    module = _script_module("print_reference_config")
    lines = (ROOT / "examples" / "sft_config.yaml").read_text().strip().splitlines()
    generated: list[str] = []
    module.emit(SFTConfig, 0, generated)
    assert lines[2:] == generated, "examples/sft_config.yaml is stale: regenerate it with emit(SFTConfig, ...)"
    load_config([f"config={ROOT / 'examples' / 'sft_config.yaml'}"], SFTConfig)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.backend=torchrun", "`trainer.backend`: .torchrun. is not one of: auto, local, ray"),
        (
            "trainer.backend=ray trainer.n_gpus_per_node=3",
            r"data.batch_size`: \(128\) must divide evenly over the 3 workers",
        ),
        ("data.train_ratios=[1.0]", "1 values for 3 train_files"),
        ("data.train_ratios=[1.0,0.0,1.0]", "every ratio must be positive"),
        ("eval.format_prompt=missing.jinja", "file not found: missing.jinja"),
        ("trainer.val_freq=10 eval.stop_at.accuracy=0.3", "key 'accuracy' must name a generation-check metric"),
        ("eval.stop_at.gen/accuracy=0.3", "eval.stop_at`: needs trainer.val_freq > 0"),
        ("trainer.val_freq=10 eval.generation_files=null eval.stop_at.gen/accuracy=0.3", "needs the greedy-generation"),
    ],
)
def test_bad_config_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(override.split(), SFTConfig)


# ---------------------------------------------------------------- the LLaMA-Factory route
# Keys of Vision-SR1-Cold-Start.yaml, by the argument class that defines them in LLaMA-Factory 0.9.5
# (transformers 5.6.0 for the inherited TrainingArguments), read from their source.
LLAMA_FACTORY_KEYS = {
    "ModelArguments": {"model_name_or_path", "image_max_pixels", "video_max_pixels", "trust_remote_code"},
    "FinetuningArguments": {
        "stage",
        "finetuning_type",
        "freeze_vision_tower",
        "freeze_multi_modal_projector",
        "freeze_language_model",
        "plot_loss",
    },
    "DataArguments": {
        "dataset",
        "dataset_dir",
        "template",
        "cutoff_len",
        "max_samples",
        "overwrite_cache",
        "preprocessing_num_workers",
    },
    "TrainingArguments": {
        "do_train",
        "deepspeed",
        "dataloader_num_workers",
        "output_dir",
        "logging_steps",
        "save_steps",
        "overwrite_output_dir",
        "save_only_model",
        "report_to",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "num_train_epochs",
        "lr_scheduler_type",
        "warmup_steps",
        "bf16",
        "ddp_timeout",
        "resume_from_checkpoint",
    },
}


def _llama_factory_yaml() -> dict:
    return yaml.safe_load((LLAMA_FACTORY_DIR / "Vision-SR1-Cold-Start.yaml").read_text())


def _dataset_info() -> dict:
    return json.loads((LLAMA_FACTORY_DIR / "dataset_info.json").read_text())


def test_llama_factory_yaml_keeps_the_original_recipe_with_known_keys():
    config = _llama_factory_yaml()
    known = set().union(*LLAMA_FACTORY_KEYS.values())
    assert set(config) <= known, f"keys unknown to LLaMA-Factory 0.9.5: {sorted(set(config) - known)}"
    recipe = {
        "finetuning_type": "full",
        "freeze_vision_tower": True,
        "freeze_multi_modal_projector": True,
        "learning_rate": 1e-5,
        "num_train_epochs": 3.0,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.1,
        "cutoff_len": 4092,
        "image_max_pixels": 262144,
        "template": "qwen2_vl",
    }
    assert {key: config[key] for key in recipe} == recipe
    assert (LLAMA_FACTORY_DIR / config["deepspeed"]).is_file()
    assert set(config["dataset"].split(",")) == set(_dataset_info())


def test_dataset_info_describes_the_three_cold_start_subsets():
    info = _dataset_info()
    formats = {name: entry["formatting"] for name, entry in info.items()}
    assert formats == {
        "vision_see_think": "sharegpt",
        "vision_reasoner": "sharegpt",
        "caption_reasoners_text": "alpaca",
    }
    for entry in info.values():
        columns = set(entry["columns"])
        if entry["formatting"] == "sharegpt":
            assert columns == {"messages", "images"}
            assert entry["tags"] == {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
            }
        else:
            assert columns == {"prompt", "query", "response"}


def test_prepare_data_converts_the_tiny_world_offline_and_our_reader_agrees(tiny_world, tmp_path):
    out = tmp_path / "data-tiny"
    result = subprocess.run(
        [
            sys.executable,
            str(LLAMA_FACTORY_DIR / "prepare_data.py"),
            "--tiny-world",
            str(tiny_world),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    sizes = json.loads((tiny_world / "manifest.json").read_text())["sizes"]
    info = json.loads((out / "dataset_info.json").read_text())
    for name, entry in info.items():
        assert f"{name}: {sizes['cold_start']} rows" in result.stdout
        conversations = read_conversations(str(out / entry["file_name"]))
        assert len(conversations) == sizes["cold_start"]
        assert all(os.path.isfile(os.path.join(c.image_dir, image)) for c in conversations[:20] for image in c.images)


def test_prepare_data_says_what_it_needs_when_the_hub_is_unreachable(tmp_path):
    result = subprocess.run(
        [sys.executable, str(LLAMA_FACTORY_DIR / "prepare_data.py"), "--out", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode != 0
    for needed in ("network access to https://huggingface.co", "HF_ENDPOINT", "--check", "--tiny-world"):
        assert needed in result.stderr


# Parses our YAML with LLaMA-Factory's own argument classes and resolves the datasets through its own
# dataset_info reader. `get_train_args` is not used: it refuses to run outside a torchrun launch.
LLAMA_FACTORY_PARSE = """
import importlib.util, json, sys, torch, yaml
from transformers import HfArgumentParser
from llamafactory.data.parser import get_dataset_list
from llamafactory.hparams import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments, TrainingArguments
config = yaml.safe_load(open(sys.argv[1]))
if importlib.util.find_spec("deepspeed") is None:
    config.pop("deepspeed")  # TrainingArguments imports deepspeed to read its config
if not torch.cuda.is_available():
    config["use_cpu"] = True  # bf16 on a machine without GPU needs it
parser = HfArgumentParser([ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, GeneratingArguments])
model_args, data_args, training_args, finetuning_args, _ = parser.parse_dict(config, allow_extra_keys=False)
datasets = get_dataset_list(data_args.dataset, sys.argv[2])
# A file-based entry's dataset_name is its file name.
entries = {name: [d.dataset_name, d.formatting] for name, d in zip(data_args.dataset, datasets)}
print(json.dumps({"datasets": entries, "lr": training_args.learning_rate}))
"""


def _llama_factory_python() -> str:
    if importlib.util.find_spec("llamafactory") is not None:
        return sys.executable
    python = os.environ.get("LLAMAFACTORY_PYTHON")
    if python:
        return os.path.abspath(python)  # the check runs in a temporary folder
    pytest.skip(
        "llamafactory is not importable here and LLAMAFACTORY_PYTHON is unset: LLaMA-Factory 0.9.5 requires "
        "transformers<=5.6.0 and datasets<=4.0.0, which conflict with this project's transformers 5.19.0 and "
        "datasets 5.2.0, so it lives in its own environment (LLaMA-Factory-Cold-Start/README.md); rerun with "
        "LLAMAFACTORY_PYTHON=<that environment>/bin/python"
    )


def test_llama_factory_parser_accepts_our_yaml_and_dataset_info(tmp_path):
    python = _llama_factory_python()
    result = subprocess.run(
        [
            python,
            "-c",
            LLAMA_FACTORY_PARSE,
            str(LLAMA_FACTORY_DIR / "Vision-SR1-Cold-Start.yaml"),
            str(LLAMA_FACTORY_DIR),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {name: [entry["file_name"], entry["formatting"]] for name, entry in _dataset_info().items()}
    assert parsed["datasets"] == expected
    assert parsed["lr"] == 1e-5


# ---------------------------------------------------------------- the tiny-world cold start
@pytest.mark.slow
def test_tiny_cold_start_learns_the_format_and_leaves_room_for_rl(tiny_world, tmp_path):
    out = tmp_path / "cold_start"
    result = subprocess.run(
        ["bash", str(ROOT / "train_examples" / "0-tiny_coldstart_sft.sh"), "trainer.logger=[file]"],
        capture_output=True,
        text=True,
        env={**os.environ, "TINY_WORLD": str(tiny_world), "COLD_START_DIR": str(out), "PYTHON": sys.executable},
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "eval_metrics.json").read_text())
    # Stopped by the measured target on the validation split, before the cap: the format is learned ...
    assert f"SFT stopped at step {metrics['global_step']}: target" in result.stdout
    assert metrics["global_step"] < 1500 and metrics["gen/format"] >= 0.9
    assert 0.3 <= metrics["gen/accuracy"] <= 0.8  # ... the answers only partly
    assert metrics["gen/perception"] <= 0.8
    AutoModelForImageTextToText.from_pretrained(out / "model")


def test_tiny_cold_start_for_digit_mix_trains_on_both_kinds_of_question(tiny_world, tmp_path):
    """TASK=digit_mix wires the mixed see-think set and digit_mix's validation split through the real
    script; two steps only (the full run is what scripts/tiny_experiment.py --task digit_mix starts from)."""
    out = tmp_path / "cold_start"
    env = {**os.environ, "TINY_WORLD": str(tiny_world), "COLD_START_DIR": str(out), "PYTHON": sys.executable}
    script = str(ROOT / "train_examples" / "0-tiny_coldstart_sft.sh")
    result = subprocess.run(
        ["bash", script, "trainer.logger=[file]", "trainer.max_steps=2", "trainer.val_freq=2"],
        capture_output=True,
        text=True,
        env={**env, "TASK": "digit_mix"},
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SFT ended at the step cap (2)" in result.stdout
    config = json.loads((out / "checkpoints" / "global_step_2" / "actor" / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    checked = [json.loads(line) for line in (out / "checkpoints" / "generations_step_2.jsonl").read_text().splitlines()]
    assert any(re.search(r": \d+ or \d+\?$", row["question"]) for row in checked)  # digit_mix's choice questions

    bad = subprocess.run(
        ["bash", script], capture_output=True, text=True, env={**env, "TASK": "digit_choice"}, cwd=ROOT
    )
    assert bad.returncode == 2 and "TASK must be digit_sum or digit_mix, not 'digit_choice'" in bad.stderr
