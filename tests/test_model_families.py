"""Each new model family (Qwen3-VL, Qwen3-VL-MoE, Qwen3.5) through the real entry points: two GRPO
steps of `verl.trainer.main` on the tiny world's digit_sum data with the self-reward recipe's config,
`scripts/model_merger.py` on the saved checkpoint, the merged folder loaded by plain transformers
(weights equal to the checkpoint's, and it generates), and a resume from step 1 that repeats step 2.
In-process and on small subsets, each family takes 6-10 s on one CPU thread, so all run by default.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from verl.models.families import FAMILIES
from verl.trainer.main import main
from verl.utils.dataset import PromptDataset, PromptDatasetConfig, collate_prompts

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("model_merger", ROOT / "scripts" / "model_merger.py")
model_merger = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model_merger)

# A reward the random-init models earn now and then, so the group advantages (and the gradients)
# are not all zero; the recipe's self-reward function needs answers in the see/think format.
REWARD = f"{ROOT / 'tests' / 'rewards' / 'digit_density.py'}:compute_score"
COMPARED = ["reward/overall", "actor/pg_loss", "actor/grad_norm", "actor/kl_loss", "response_length/mean"]
# Parameter names each family's checkpoint must carry through the merge (current transformers names).
FAMILY_NAMES = {
    "qwen3_vl": [
        "model.visual.deepstack_merger_list.0.linear_fc1.weight",
        "model.language_model.layers.0.mlp.gate_proj.weight",
    ],
    "qwen3_vl_moe": [
        "model.visual.deepstack_merger_list.0.linear_fc1.weight",
        "model.language_model.layers.0.mlp.experts.gate_up_proj",
        "model.language_model.layers.0.mlp.experts.down_proj",
        "model.language_model.layers.0.mlp.gate.weight",
    ],
    "qwen3_5": [
        "model.language_model.layers.0.linear_attn.in_proj_qkv.weight",
        "model.language_model.layers.0.linear_attn.A_log",
    ],
}
NEW_FAMILIES = ["qwen3_vl", "qwen3_vl_moe", "qwen3_5"]


def _rows(world: Path, split: str, out: Path, count: int) -> Path:
    """The first `count` rows of a digit_sum split (a small file: the scan of 4000 rows costs seconds)."""
    path = out / f"{split}.parquet"
    pq.write_table(pq.read_table(world / "data" / "digit_sum" / f"{split}.parquet").slice(0, count), path)
    return path


def _run_args(world: Path, family: str, data: Path, save_dir: Path, *extra: str) -> list[str]:
    """The self-reward recipe's config, cut to two steps of four prompts x two samples."""
    return [
        f"config={ROOT / 'examples' / 'tiny_world' / 'self_reward.yaml'}",
        f"worker.actor.model.model_path={world / 'models' / family}",
        f"data.train_files={data / 'train.parquet'}",
        f"data.val_files={data / 'val.parquet'}",
        "data.rollout_batch_size=4",
        "data.max_response_length=16",
        "worker.rollout.n=2",
        "worker.actor.global_batch_size=4",
        "worker.actor.micro_batch_size_per_device_for_update=8",
        "worker.actor.optim.lr=1e-3",
        f"worker.reward.reward_function={REWARD}",
        "self_reward.max_response_length=8",
        "trainer.max_steps=2",
        "trainer.save_freq=1",
        "trainer.val_before_train=false",
        "trainer.logger=[file]",
        f"trainer.save_checkpoint_path={save_dir}",
        *extra,
    ]


def _metrics(save_dir: Path) -> dict[int, dict]:
    with open(save_dir / "metrics.jsonl") as f:
        return {row["step"]: row for row in map(json.loads, f)}


def _prompt(model_dir: Path, world: Path) -> tuple[dict, int]:
    """One digit_sum prompt as the trainer builds it: model inputs and the prompt length."""
    processor = AutoProcessor.from_pretrained(model_dir)
    config = PromptDatasetConfig(format_prompt=str(ROOT / "examples" / "format_prompt" / "see_think.jinja"))
    dataset = PromptDataset(str(world / "data" / "digit_sum" / "val.parquet"), processor.tokenizer, processor, config)
    batch = collate_prompts([dataset[0]], processor.tokenizer.pad_token_id)
    inputs = {"input_ids": batch.batch["input_ids"], "attention_mask": batch.batch["attention_mask"]}
    inputs.update(batch.non_tensor_batch["multi_modal_inputs"][0])
    return inputs, inputs["input_ids"].shape[1]


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_two_grpo_steps_merge_load_generate_and_resume(tiny_world, tmp_path, monkeypatch, capsys, family):
    monkeypatch.chdir(ROOT)  # the recipe's config names its prompt templates relative to the repository
    data = tmp_path / "data"
    data.mkdir()
    _rows(tiny_world, "train", data, 8)
    _rows(tiny_world, "val", data, 4)
    run = tmp_path / "run"
    main(_run_args(tiny_world, family, data, run))

    metrics = _metrics(run)
    assert sorted(metrics) == [1, 2]
    for step in (1, 2):
        assert torch.isfinite(torch.tensor([metrics[step][key] for key in COMPARED])).all(), step
    assert metrics[1]["actor/grad_norm"] > 0 and "val/reward/overall" in metrics[2]
    # Step 2 trains away from the reference, so the resume comparison below is not between zeros.
    assert metrics[2]["actor/grad_norm"] > 0 and metrics[2]["actor/kl_loss"] > 0
    actor = run / "global_step_2" / "actor"
    assert json.loads((actor / "config.json").read_text())["model_type"] in FAMILIES[family].model_types

    # The merger's command line, in this process (a new interpreter would mostly spend its time importing).
    merged = tmp_path / "merged"
    monkeypatch.setattr(sys, "argv", ["model_merger.py", f"--local_dir={actor}", f"--target_dir={merged}"])
    model_merger.main()
    assert "matches the checkpoint" in capsys.readouterr().out
    saved, written = load_file(actor / "model.safetensors"), load_file(merged / "model.safetensors")
    assert sorted(written) == sorted(saved)
    assert all(torch.equal(written[name], tensor) for name, tensor in saved.items())
    assert all(name in saved for name in FAMILY_NAMES[family])
    assert any(name.startswith("model.visual.blocks.") for name in saved)
    initial = load_file(tiny_world / "models" / family / "model.safetensors")
    assert any(not torch.equal(initial[name], tensor) for name, tensor in saved.items()), "no training happened"

    # Plain transformers loads the merged folder with the actor's weights, and it generates.
    model = AutoModelForImageTextToText.from_pretrained(merged)
    checkpoint = AutoModelForImageTextToText.from_pretrained(actor)
    merged_state, actor_state = model.state_dict(), checkpoint.state_dict()
    assert sorted(merged_state) == sorted(actor_state)
    assert all(torch.equal(merged_state[name], tensor) for name, tensor in actor_state.items())
    inputs, prompt_length = _prompt(merged, tiny_world)
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        expected = checkpoint.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert tokens.shape == (1, prompt_length + 8)
    assert torch.equal(tokens, expected)

    # Resumed from step 1's checkpoint into a new folder, step 2 repeats: same metrics, same weights.
    resumed = tmp_path / "resumed"
    main(_run_args(tiny_world, family, data, resumed, f"trainer.load_checkpoint_path={run / 'global_step_1'}"))
    again = _metrics(resumed)
    assert sorted(again) == [2]
    for key in COMPARED:
        assert again[2][key] == pytest.approx(metrics[2][key], rel=1e-5, abs=1e-7), key
    repeated = load_file(resumed / "global_step_2" / "actor" / "model.safetensors")
    for name, tensor in saved.items():
        torch.testing.assert_close(repeated[name], tensor, rtol=1e-5, atol=1e-7, msg=name)
