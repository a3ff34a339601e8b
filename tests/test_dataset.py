"""Prompt datasets: schemas, image handling, filtering, errors that name the row, resumable order."""

import io
import json
import re

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from verl.models.loading import load_tokenizer_and_processor
from verl.utils.dataset import (
    DataError,
    PromptDataset,
    PromptDatasetConfig,
    PromptLoader,
    build_messages,
    image_factor,
    strip_placeholders,
)
from verl.utils.sft_dataset import ConversationEncoder, SFTDataset

SEE_THINK = "examples/format_prompt/see_think.jinja"


@pytest.fixture(scope="module")
def vl(tiny_world):
    return load_tokenizer_and_processor(str(tiny_world / "models" / "qwen2_5_vl"))


def png(width=28, height=28, color=(255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_digit_sum_prompt_has_image_tokens_and_ground_truth(tiny_world, vl):
    tokenizer, processor = vl
    ds = PromptDataset(
        str(tiny_world / "data/digit_sum/val.parquet"),
        tokenizer,
        processor,
        PromptDatasetConfig(format_prompt=SEE_THINK),
    )
    item = ds[0]
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    grid = item["multi_modal_inputs"]["image_grid_thw"]
    expected_tokens = int(grid.prod()) // processor.image_processor.merge_size**2
    assert int((item["prompt_ids"] == image_token).sum()) == expected_tokens == 2
    text = tokenizer.decode(item["prompt_ids"])
    assert text.startswith("<|im_start|>system") and text.rstrip().endswith("<|im_start|>assistant")
    assert "<description>" in text  # the format prompt was applied
    assert item["question"] == "What is the sum of the two digits in the image?"
    assert item["ground_truth"].isdigit()
    assert "digits" in item["extra"]


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe", "qwen3_5"])
def test_qwen3_prompts_hold_one_image_token_per_merged_16_pixel_patch_and_the_length_scan_agrees(
    tiny_world, tmp_path, family
):
    """Qwen3's processors cut 16-pixel patches merged 2x2: images snap to a 32-pixel grid (digit_sum's
    56x28 images become 64x32), each 32x32 block is one `<|image_pad|>`, and the prompt-length scan
    that filters rows counts exactly the tokens the processor then produces."""
    tokenizer, processor = load_tokenizer_and_processor(str(tiny_world / "models" / family))
    assert image_factor(processor) == 32
    rows = pq.read_table(tiny_world / "data/digit_sum/val.parquet").slice(0, 2).to_pylist()
    for row in rows:
        row.pop("digits"), row.pop("source_ids")
    # Off-grid sizes, one bounded by max_pixels, and two images in one prompt.
    rows.append({"problem": "<image>Which digit?", "answer": "3", "images": [{"bytes": png(70, 45), "path": None}]})
    rows.append(
        {
            "problem": "<image> and <image>: same?",
            "answer": "no",
            "images": [{"bytes": png(300, 90), "path": None}, {"bytes": png(20, 33), "path": None}],
        }
    )
    path = _write(tmp_path, rows)

    def dataset(max_prompt_length: int) -> PromptDataset:
        config = PromptDatasetConfig(format_prompt=SEE_THINK, max_pixels=128 * 128, max_prompt_length=max_prompt_length)
        return PromptDataset(path, tokenizer, processor, config)

    ds = dataset(4096)
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert image_token == processor.image_token_id
    lengths = []
    for item in (ds[i] for i in range(len(ds))):
        grid = item["multi_modal_inputs"]["image_grid_thw"]
        assert all(image.width % 32 == 0 and image.height % 32 == 0 for image in item["multi_modal_data"]["images"])
        assert grid[:, 1:].mul(16).tolist() == [[im.height, im.width] for im in item["multi_modal_data"]["images"]]
        expected = int(grid.prod(-1).sum()) // processor.image_processor.merge_size**2
        assert int((item["prompt_ids"] == image_token).sum()) == expected
        lengths.append(len(item["prompt_ids"]))
    assert ds[0]["multi_modal_data"]["images"][0].size == (64, 32)
    # The scan keeps a row exactly when the processor's tokens fit: with a row's own length as the
    # limit it stays, one token less and it is filtered.
    for limit in sorted({length - shorter for length in lengths for shorter in (0, 1)}):
        kept = [i for i, length in enumerate(lengths) if length <= limit]
        if not kept:
            with pytest.raises(DataError, match="no usable rows left"):
                dataset(limit)
            continue
        assert dataset(limit).indices == kept, limit


def test_build_messages_places_images_at_placeholders():
    messages = build_messages("Compare <image> and <image> please", 2)
    assert [part["type"] for part in messages[0]["content"]] == ["text", "image", "text", "image", "text"]
    with pytest.raises(DataError, match="1 `<image>` placeholders but 2 images"):
        build_messages("one <image>", 2)
    assert strip_placeholders("<image>What is  shown?") == "What is shown?"


def _write(tmp_path, rows, name="data.parquet"):
    path = tmp_path / name
    if name.endswith(".parquet"):
        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_text_single_and_multi_image_rows_mix(tmp_path, vl):
    tokenizer, processor = vl
    rows = [
        {"problem": "What is 2 + 2?", "answer": "4", "images": []},  # math12k-like, text-only
        {"problem": "<image>What color?", "answer": "red", "images": [{"bytes": png(), "path": None}]},
        {
            "problem": "<image> vs <image>: same?",
            "answer": "no",
            "images": [{"bytes": png(), "path": None}, {"bytes": png(56, 28, (0, 0, 255)), "path": None}],
        },
    ]
    ds = PromptDataset(_write(tmp_path, rows), tokenizer, processor, PromptDatasetConfig())
    loader = PromptLoader(ds, batch_size=3, shuffle=False, seed=0, pad_token_id=tokenizer.pad_token_id)
    batch = next(iter(loader))
    assert batch.batch["input_ids"].shape[0] == 3
    # left padding: the last column is always a real token
    assert bool(batch.batch["attention_mask"][:, -1].all())
    grids = [m.get("image_grid_thw") for m in batch.non_tensor_batch["multi_modal_inputs"]]
    assert grids[0] is None and grids[1].shape[0] == 1 and grids[2].shape[0] == 2


def test_json_lines_and_folders_and_custom_keys(tmp_path, vl):
    tokenizer, _ = vl
    folder = tmp_path / "set"
    folder.mkdir()
    _write(folder, [{"q": "1+1?", "a": "2"}], "a.jsonl")
    _write(folder, [{"q": "2+2?", "a": "4"}], "b.jsonl")
    ds = PromptDataset(str(folder), tokenizer, None, PromptDatasetConfig(prompt_key="q", answer_key="a"))
    assert sorted(ds[i]["ground_truth"] for i in range(len(ds))) == ["2", "4"]
    with pytest.raises(DataError, match="column 'problem' not found"):
        PromptDataset(str(folder), tokenizer, None, PromptDatasetConfig())


def test_corrupt_image_names_the_row_or_is_skipped_when_asked(tmp_path, vl):
    tokenizer, processor = vl
    rows = [
        {"problem": "<image>ok?", "answer": "1", "images": [{"bytes": png(), "path": None}]},
        {"problem": "<image>broken?", "answer": "2", "images": [{"bytes": b"not an image", "path": None}]},
        {"problem": "<image>missing?", "answer": "3", "images": [{"bytes": None, "path": "nowhere.png"}]},
    ]
    path = _write(tmp_path, rows)
    with pytest.raises(DataError, match=r"data\.parquet row 1: bad image"):
        PromptDataset(path, tokenizer, processor, PromptDatasetConfig())
    ds = PromptDataset(path, tokenizer, processor, PromptDatasetConfig(skip_bad_samples=True))
    assert len(ds) == 1 and ds.num_bad == 2


def test_overlong_prompts_are_filtered_not_truncated(tmp_path, vl):
    tokenizer, processor = vl
    rows = [
        {"problem": "<image>short?", "answer": "1", "images": [{"bytes": png(), "path": None}]},
        # a large image: many image tokens, so the prompt is too long even though its text is short
        {"problem": "<image>big?", "answer": "2", "images": [{"bytes": png(224, 224), "path": None}]},
    ]
    path = _write(tmp_path, rows)
    config = PromptDatasetConfig(max_prompt_length=40, max_pixels=224 * 224)
    ds = PromptDataset(path, tokenizer, processor, config)
    assert len(ds) == 1 and ds.num_filtered == 1
    assert ds[0]["ground_truth"] == "1"
    with pytest.raises(DataError, match=r"row 1: prompt has \d+ tokens > max_prompt_length=40"):
        PromptDataset(
            path,
            tokenizer,
            processor,
            PromptDatasetConfig(max_prompt_length=40, filter_overlong_prompts=False, max_pixels=224 * 224),
        )


def test_missing_format_prompt_is_an_error(tiny_world, vl):
    tokenizer, processor = vl
    with pytest.raises(DataError, match="format prompt file not found"):
        PromptDataset(
            str(tiny_world / "data/digit_sum/val.parquet"),
            tokenizer,
            processor,
            PromptDatasetConfig(format_prompt="examples/format_prompt/nope.jinja"),
        )


def test_images_are_resized_within_pixel_limits(tmp_path, vl):
    tokenizer, processor = vl
    rows = [{"problem": "<image>?", "answer": "1", "images": [{"bytes": png(280, 280), "path": None}]}]
    ds = PromptDataset(_write(tmp_path, rows), tokenizer, processor, PromptDatasetConfig(max_pixels=56 * 56))
    image = ds[0]["multi_modal_data"]["images"][0]
    assert image.width * image.height <= 56 * 56


def test_loader_resumes_exactly_where_it_stopped(tiny_world, vl):
    tokenizer, processor = vl
    ds = PromptDataset(str(tiny_world / "data/digit_sum/val.parquet"), tokenizer, processor, PromptDatasetConfig())

    def rows_of(batch):
        return list(batch.non_tensor_batch["row_index"])

    full = PromptLoader(ds, 16, shuffle=True, seed=3, pad_token_id=tokenizer.pad_token_id)
    epochs = [[rows_of(b) for b in full] for _ in range(2)]
    assert epochs[0] != epochs[1]  # a new order each epoch
    assert sorted(sum(epochs[0], [])) == sorted(ds.indices)

    interrupted = PromptLoader(ds, 16, shuffle=True, seed=3, pad_token_id=tokenizer.pad_token_id)
    it = iter(interrupted)
    seen = [rows_of(next(it)) for _ in range(3)]
    state = interrupted.state_dict()
    resumed = PromptLoader(ds, 16, shuffle=True, seed=3, pad_token_id=tokenizer.pad_token_id)
    resumed.load_state_dict(state)
    rest = [rows_of(b) for b in resumed]
    assert seen + rest == epochs[0]
    assert [rows_of(b) for b in resumed] == epochs[1]
    assert torch.is_tensor(next(iter(resumed)).batch["input_ids"])


# ---------------------------------------------------------------- images decoded by `datasets` itself
def corrupt_digit_sum(tiny_world, path, rows: int = 6, bad: tuple[int, ...] = (3,)) -> str:
    """The first `rows` rows of the tiny world's digit_sum val file, written as the tiny world writes
    them (the Hugging Face `Image` feature in the schema metadata, so `datasets` would decode the
    images itself), with the image of each row in `bad` replaced by bytes that are no image."""
    table = pq.read_table(tiny_world / "data/digit_sum/val.parquet").slice(0, rows)
    assert b"huggingface" in table.schema.metadata  # the case under test: datasets' own decoding
    records = table.to_pylist()
    for index in bad:
        records[index]["images"] = [{"bytes": b"not an image", "path": f"scan_{index}.png"}]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records, schema=table.schema), path)
    return str(path)


def test_corrupt_image_in_an_hf_image_parquet_names_file_row_and_column(tiny_world, tmp_path, vl, caplog):
    tokenizer, processor = vl
    path = corrupt_digit_sum(tiny_world, tmp_path / "digits.parquet")
    with pytest.raises(DataError) as error:
        PromptDataset(path, tokenizer, processor, PromptDatasetConfig())
    message = str(error.value)
    assert message.startswith(f"{path} row 3: bad image (")
    assert "in column 'images', image 1 of 1 (path 'scan_3.png', 12 bytes)" in message

    ds = PromptDataset(path, tokenizer, processor, PromptDatasetConfig(skip_bad_samples=True))
    assert ds.num_bad == 1 and ds.indices == [0, 1, 2, 4, 5]
    assert f"{path} row 3: bad image" in caplog.text and "skipped 1 rows" in caplog.text
    item = ds[3]  # the rows left load with their images
    assert item["row_index"] == 4 and item["multi_modal_data"]["images"][0].mode == "RGB"


def test_corrupt_image_in_a_parquet_folder_names_its_file(tiny_world, tmp_path, vl):
    tokenizer, processor = vl
    folder = tmp_path / "set"
    corrupt_digit_sum(tiny_world, folder / "a.parquet", rows=4, bad=())
    second = corrupt_digit_sum(tiny_world, folder / "b.parquet", rows=4, bad=(1,))
    where = re.escape(f"{second} row 1 (row 5 of {folder}): bad image")
    with pytest.raises(DataError, match=rf"{where} .* column 'images'"):
        PromptDataset(str(folder), tokenizer, processor, PromptDatasetConfig())
    ds = PromptDataset(str(folder), tokenizer, processor, PromptDatasetConfig(skip_bad_samples=True))
    assert ds.indices == [0, 1, 2, 3, 4, 6, 7]


def test_corrupt_image_in_an_hf_image_sft_parquet_names_file_row_and_column(tmp_path, vl):
    tokenizer, processor = vl
    features = datasets.Features(
        {
            "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
            "images": datasets.List(datasets.Image()),
        }
    )
    turns = [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "red"}]
    rows = [
        {"messages": turns, "images": [{"bytes": png(), "path": None}]},
        {"messages": turns, "images": [{"bytes": b"\x89PNG broken", "path": "red.png"}]},
    ]
    path = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=features.arrow_schema), path)
    with pytest.raises(DataError) as error:
        SFTDataset([str(path)], ConversationEncoder(tokenizer, processor), max_length=4096)
    message = str(error.value)
    assert message.startswith(f"{path} row 1: bad image (")
    assert "in column 'images', image 1 of 1 (path 'red.png', 11 bytes)" in message
