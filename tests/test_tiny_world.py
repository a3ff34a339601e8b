"""The tiny world loads offline as ordinary Hugging Face folders, runs, and its data is sound and reproducible."""

import hashlib
import io
import json
import re
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)

from verl.tiny_world import DataSizes, build_tiny_world

VL_MODELS = {
    "qwen2_5_vl": (Qwen2_5_VLProcessor, Qwen2_5_VLForConditionalGeneration),
    "qwen2_vl": (Qwen2VLProcessor, Qwen2VLForConditionalGeneration),
}
SPLITS = ("train", "val", "test")
# Qwen2-VL's special tokens in the order of their ids (151643.. in the real vocabulary).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _image_message(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _test_images(world: Path, count: int) -> list[Image.Image]:
    rows = pq.read_table(world / "data" / "digit_sum" / "test.parquet").slice(0, count).to_pylist()
    return [Image.open(io.BytesIO(row["images"][0]["bytes"])) for row in rows]


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "manifest.json"
    }


@pytest.mark.parametrize("name", VL_MODELS)
def test_vision_models_load_offline_with_the_real_qwen_processor(tiny_world, name):
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    processor_class, model_class = VL_MODELS[name]
    folder = tiny_world / "models" / name
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(processor) is processor_class
    assert type(model) is model_class
    tokenizer = processor.tokenizer
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<|endoftext|>"
    config = model.config
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tokenizer.convert_tokens_to_ids("<|vision_end|>")
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.text_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert config.text_config.pad_token_id == tokenizer.pad_token_id
    end_ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert model.generation_config.eos_token_id == end_ids
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    manifest = json.loads((tiny_world / "manifest.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == manifest["parameters"][name]
    assert 1_000_000 <= manifest["parameters"][name] <= 2_000_000


def test_special_tokens_follow_the_bpe_ranks_in_qwen_order(tiny_world):
    tokenizer = AutoTokenizer.from_pretrained(tiny_world / "models" / "qwen2_5_vl")
    bpe_ranks = len(tokenizer) - len(QWEN_SPECIAL_TOKENS)
    assert 400 <= bpe_ranks <= 600
    assert tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS) == list(range(bpe_ranks, len(tokenizer)))
    # Special tokens are atomic inside ordinary text.
    assert tokenizer("a<|im_end|>b").input_ids[1] == bpe_ranks + 2


def test_chat_template_renders_the_qwen2_vl_format(tiny_world):
    tokenizer = AutoTokenizer.from_pretrained(tiny_world / "models" / "qwen2_5_vl")
    with_image = tokenizer.apply_chat_template(_image_message("Sum?"), tokenize=False, add_generation_prompt=True)
    assert with_image == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Sum?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1 + 2?"},
        {"role": "assistant", "content": "\\boxed{3}"},
    ]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n1 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n\\boxed{3}<|im_end|>\n"
    )


@pytest.mark.parametrize("name", VL_MODELS)
def test_one_image_becomes_one_token_per_merged_patch(tiny_world, name):
    processor = AutoProcessor.from_pretrained(tiny_world / "models" / name)
    text = processor.apply_chat_template(_image_message("What is the sum?"), add_generation_prompt=True)
    [image] = _test_images(tiny_world, 1)
    assert image.size == (56, 28)
    batch = processor(text=[text], images=[image], return_tensors="pt")
    # 28x56 pixels are 2x4 patches of 14; each 2x2 block merges into one token.
    assert batch["image_grid_thw"].tolist() == [[1, 2, 4]]
    expected_tokens = int(batch["image_grid_thw"].prod()) // processor.image_processor.merge_size**2
    image_pad_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert expected_tokens == 2
    assert int((batch["input_ids"] == image_pad_id).sum()) == expected_tokens


@pytest.mark.parametrize("name", VL_MODELS)
def test_generate_continues_a_left_padded_batch_of_image_prompts(tiny_world, name):
    folder = tiny_world / "models" / name
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    texts = [
        processor.apply_chat_template(_image_message(question), add_generation_prompt=True)
        for question in ("Sum?", "What is the sum of the two digits in the image?")
    ]
    batch = processor(text=texts, images=_test_images(tiny_world, 2), padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=4, do_sample=False)
    prompt_length = batch["input_ids"].shape[1]
    assert output.shape[0] == 2 and output.shape[1] > prompt_length
    assert torch.equal(output[:, :prompt_length], batch["input_ids"])


@pytest.mark.parametrize("name", VL_MODELS)
def test_training_step_reaches_both_the_vision_tower_and_the_language_model(tiny_world, name):
    folder = tiny_world / "models" / name
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).train()
    messages = _image_message("What is the sum?") + [{"role": "assistant", "content": "\\boxed{8}"}]
    text = processor.apply_chat_template(messages)
    batch = processor(text=[text, text], images=_test_images(tiny_world, 2), return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    vision_grad = sum(p.grad.abs().sum() for p in model.model.visual.parameters() if p.grad is not None)
    language_grad = sum(p.grad.abs().sum() for p in model.model.language_model.parameters() if p.grad is not None)
    assert vision_grad > 0
    assert language_grad > 0


def test_text_model_loads_and_generates_with_head_dim_64(tiny_world):
    folder = tiny_world / "models" / "qwen2_text"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.hidden_size // model.config.num_attention_heads == 64
    assert tokenizer.padding_side == "left"
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        for text in ("What is the sum of 3 and 5?", "Hi")
    ]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > batch["input_ids"].shape[1]


def test_splits_share_no_source_scan_and_rows_match_the_scans(tiny_world):
    labels = load_digits().target
    sources = {}
    for split in SPLITS:
        rows = pq.read_table(tiny_world / "data" / "digit_sum" / f"{split}.parquet").to_pylist()
        sources[split] = {source for row in rows for source in row["source_ids"]}
        for row in rows:
            assert row["digits"] == [int(labels[source]) for source in row["source_ids"]]
            assert row["answer"] == str(sum(row["digits"]))
    assert not sources["train"] & sources["val"]
    assert not sources["train"] & sources["test"]
    assert not sources["val"] & sources["test"]


def test_data_rows_follow_the_schema(tiny_world):
    sizes = DataSizes(**json.loads((tiny_world / "manifest.json").read_text())["sizes"])
    for split, expected_rows in zip(SPLITS, (sizes.train, sizes.val, sizes.test)):
        image_path = tiny_world / "data" / "digit_sum" / f"{split}.parquet"
        image_table = pq.read_table(image_path)
        assert image_table.column_names == ["problem", "answer", "images", "digits", "source_ids"]
        assert image_table.num_rows == expected_rows
        row = image_table.slice(0, 1).to_pylist()[0]
        assert row["problem"] == "<image>What is the sum of the two digits in the image?"
        assert len(row["images"]) == 1 and row["images"][0]["path"] is None
        image = Image.open(io.BytesIO(row["images"][0]["bytes"]))
        assert (image.mode, image.size) == ("RGB", (56, 28))
        features = datasets.Features.from_arrow_schema(pq.read_schema(image_path))
        assert features["images"] == datasets.List(datasets.Image())

        text_rows = pq.read_table(tiny_world / "data" / "text_sum" / f"{split}.parquet").to_pylist()
        assert [row["digits"] for row in text_rows] == image_table.column("digits").to_pylist()
        left, right = text_rows[0]["digits"]
        twin = {
            "problem": f"What is the sum of {left} and {right}?",
            "answer": str(left + right),
            "digits": [left, right],
        }
        assert text_rows[0] == twin


def test_digit_mix_asks_the_same_images_half_of_them_as_a_two_option_choice(tiny_world):
    for split in SPLITS:
        plain = pq.read_table(tiny_world / "data" / "digit_sum" / f"{split}.parquet").to_pylist()
        mixed = pq.read_table(tiny_world / "data" / "digit_mix" / f"{split}.parquet").to_pylist()
        assert len(mixed) == len(plain)
        choices = 0
        for row, twin in zip(mixed, plain):
            assert {k: v for k, v in row.items() if k not in ("problem", "kind")} == {
                k: v for k, v in twin.items() if k != "problem"
            }
            if row["kind"] == "sum":
                assert row["problem"] == twin["problem"]
                continue
            assert row["kind"] == "choice"
            choices += 1
            match = re.fullmatch(
                r"<image>What is the sum of the two digits in the image: (\d+) or (\d+)\?", row["problem"]
            )
            assert match, row["problem"]
            options = [match.group(1), match.group(2)]
            assert row["answer"] in options and options[0] != options[1]
            assert all(0 <= int(option) <= 18 for option in options)
        # About half are choices (binomial: 4 standard deviations for the smallest split).
        assert abs(choices / len(mixed) - 0.5) < 4 * (0.25 / len(mixed)) ** 0.5


def test_cold_start_files_are_llama_factory_datasets_with_consistent_targets(tiny_world):
    cold = tiny_world / "data" / "cold_start"
    sizes = DataSizes(**json.loads((tiny_world / "manifest.json").read_text())["sizes"])
    info = json.loads((cold / "dataset_info.json").read_text())
    expected_counts = {
        "digit_sum_seethink": sizes.cold_start,
        "digit_mix_seethink": sizes.cold_start,
        "digit_sum_think": sizes.cold_start,
        "digit_sum_text_only": sizes.cold_start,
        "digit_sum_seethink_val": sizes.val,
    }
    assert set(info) == set(expected_counts)
    see_think = re.compile(r"<description>The image shows the digits (\d) and (\d)\.</description> (.*)")
    think = re.compile(r"<think>(\d) \+ (\d) = (\d+)\.</think> \\boxed\{(\d+)\}")
    for name, count in expected_counts.items():
        entry = info[name]
        examples = json.loads((cold / entry["file_name"]).read_text())
        assert len(examples) == count
        if entry["formatting"] == "alpaca":
            assert entry["columns"] == {"prompt": "instruction", "query": "input", "response": "output"}
            example = examples[0]
            left, right, total, boxed = think.fullmatch(example["output"]).groups()
            assert f"The image shows the digits {left} and {right}." in example["instruction"]
            assert "<image>" not in example["instruction"]
            continue
        assert entry["columns"] == {"messages": "messages", "images": "images"}
        assert entry["tags"]["user_tag"] == "user" and entry["tags"]["assistant_tag"] == "assistant"
        for example in examples[:20]:
            user, assistant = example["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            assert user["content"].startswith("<image>") and user["content"].count("<image>") == 1
            assert (cold / example["images"][0]).is_file()
            target = assistant["content"]
            if "seethink" in name:
                described_left, described_right, target = see_think.fullmatch(target).groups()
            left, right, total, boxed = think.fullmatch(target).groups()
            assert int(left) + int(right) == int(total) == int(boxed)
            if "seethink" in name:
                assert (described_left, described_right) == (left, right)
    # The mixed set: the same images and targets as the see-think set, about half asked as a choice
    # whose options hold the true sum.
    plain = json.loads((cold / "seethink.json").read_text())
    mixed = json.loads((cold / "seethink_mix.json").read_text())
    choice = re.compile(r"<image>What is the sum of the two digits in the image: (\d+) or (\d+)\? First describe .*")
    choices = 0
    for plain_example, mixed_example in zip(plain, mixed, strict=True):
        assert mixed_example["images"] == plain_example["images"]
        assert mixed_example["messages"][1] == plain_example["messages"][1]
        user = mixed_example["messages"][0]["content"]
        if user == plain_example["messages"][0]["content"]:
            continue
        options = choice.fullmatch(user).groups()
        total = think.search(plain_example["messages"][1]["content"]).group(4)
        assert total in options and options[0] != options[1]
        choices += 1
    assert abs(choices / len(mixed) - 0.5) < 4 * (0.25 / len(mixed)) ** 0.5


def test_same_seed_builds_identical_files_and_another_seed_does_not(tmp_path):
    sizes = DataSizes(train=8, val=4, test=4, cold_start=4)
    first = build_tiny_world(str(tmp_path / "first"), seed=3, sizes=sizes)
    build_tiny_world(str(tmp_path / "second"), seed=3, sizes=sizes)
    build_tiny_world(str(tmp_path / "other"), seed=4, sizes=sizes)
    first_hashes = _file_hashes(tmp_path / "first")
    assert first_hashes == _file_hashes(tmp_path / "second")
    other_hashes = _file_hashes(tmp_path / "other")
    for changed in ("models/qwen2_5_vl/model.safetensors", "data/digit_sum/train.parquet"):
        assert first_hashes[changed] != other_hashes[changed]
    assert first["seed"] == 3 and first["sizes"]["train"] == 8


def test_build_refuses_a_folder_that_is_not_a_tiny_world(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes|not empty"):
        build_tiny_world(str(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_real_vocabulary_puts_special_tokens_at_qwens_ids(tmp_path):
    manifest = build_tiny_world(str(tmp_path), real_vocab=True, sizes=DataSizes(train=4, val=2, test=2, cold_start=2))
    folder = tmp_path / "models" / "qwen2_5_vl"
    processor = AutoProcessor.from_pretrained(folder)
    tokenizer = processor.tokenizer
    assert manifest["vocab_size"] == len(tokenizer) == 151657
    assert tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS) == list(range(151643, 151657))
    assert tokenizer("hello world").input_ids == [14990, 1879]  # Qwen's own ids for these words
    config = json.loads((folder / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == len(tokenizer)
    assert config["image_token_id"] == 151655
