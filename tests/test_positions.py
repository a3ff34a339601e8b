"""3-D rope positions for every Qwen-VL family: ours equal what the model computes for itself.

`compute_position_ids` calls the model's own `get_rope_index`; Qwen3-VL and Qwen3.5 interleave the
time, height and width frequencies and see 16-pixel patches, so a family whose positions went wrong
would show here first: the logits of a left-padded batch (an image prompt beside a text-only one)
given our positions must equal the model's forward that derives them from the token types itself.
"""

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from verl.models.loading import load_tokenizer_and_processor
from verl.models.positions import compute_position_ids, multimodal_token_types

VISION_FAMILIES = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5"]


def _batch(processor, image: Image.Image) -> dict[str, torch.Tensor]:
    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the sum?"}]}]
    text_only = [{"role": "user", "content": "What is 3 + 4? Answer with the sum of the two numbers."}]
    texts = [
        processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in (with_image, text_only)
    ]
    # One image for the first row only: the processor matches images to placeholders in order.
    return processor(text=texts, images=[image], padding=True, return_tensors="pt")


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_positions_equal_the_models_own(tiny_world: Path, family: str):
    path = tiny_world / "models" / family
    tokenizer, processor = load_tokenizer_and_processor(str(path))
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
    image = Image.new("RGB", (56, 28), (200, 30, 30))
    batch = _batch(processor, image)
    assert not bool(batch["attention_mask"].all()), "the rows should differ in length (one left-padded)"

    positions = compute_position_ids(model, batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"])
    assert positions.shape == (2, 3, batch["input_ids"].shape[1])
    config = model.config
    types = multimodal_token_types(batch["input_ids"], config.image_token_id, config.video_token_id)
    with torch.no_grad():
        ours = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=positions.transpose(0, 1),
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
        ).logits
        model.model.rope_deltas = None  # the first forward cached its deltas
        theirs = model(**{**batch, "mm_token_type_ids": types}).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)

    # The image's tokens span a 2-D grid: their height and width positions differ, their time does not.
    image_slots = batch["input_ids"][0] == config.image_token_id
    grid = positions[0, :, image_slots]
    assert int(image_slots.sum()) == int(batch["image_grid_thw"][0].prod()) // processor.image_processor.merge_size**2
    assert grid[0].unique().numel() == 1 and grid[2].unique().numel() > 1
    # Text-only row: all three axes advance together, counting from 0 at the first real token.
    text_row = positions[1, :, real[1]]
    expected = torch.arange(int(real[1].sum()))
    for axis in range(3):
        assert torch.equal(text_row[axis], expected)
