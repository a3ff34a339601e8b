"""Image pre-resize: qwen-vl-utils' smart_resize, so the processor keeps the grid it is given."""

import io
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from qwen_vl_utils import fetch_image

from verl.models.loading import load_tokenizer_and_processor
from verl.utils.dataset import DataError, PromptDataset, PromptDatasetConfig, image_factor, resize_within

# Qwen's own lower bound (4 tokens) and 256 tokens, which keeps the processor fast.
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 256 * 28 * 28

# (width, height): tiny, within bounds, huge, and aspect ratios up to 199 whose grid size stays within
# the limit of 200 (the processor rejects a larger one; see the error test).
SIZES = [
    *[(1, 1), (5, 7), (13, 13), (27, 29), (30, 20), (50, 50), (2, 300), (300, 2), (1, 150), (60, 40)],
    *[(56, 56), (100, 60), (224, 224), (300, 200), (333, 250), (400, 300), (448, 448), (123, 457)],
    *[(640, 280), (199, 201), (250, 251), (85, 700), (57, 57), (255, 255), (420, 69)],
    *[(449, 449), (500, 500), (640, 480), (1024, 768), (1920, 1080), (2048, 2048), (3000, 2000)],
    *[(1000, 1001), (1080, 1920)],
    *[(28, 5000), (5000, 28), (30, 5500), (5500, 30), (60, 9000), (9000, 60), (10, 1990), (1990, 10)],
    *[(100, 12000), (12000, 100), (2, 390), (390, 2), (60, 3000), (3000, 60), (15, 2900)],
]


def old_resize(image, min_pixels, max_pixels):
    """The EasyR1-style resize this replaced: pixel count scaled into bounds, sides truncated."""
    pixels = image.width * image.height
    scale = 1.0
    if max_pixels is not None and pixels > max_pixels:
        scale = math.sqrt(max_pixels / pixels)
    elif min_pixels is not None and pixels < min_pixels:
        scale = math.sqrt(min_pixels / pixels)
    if scale != 1.0:
        size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
        image = image.resize(size, resample=Image.Resampling.BICUBIC)
    return image.convert("RGB")


def png(width, height, seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def vl(tiny_world):
    """The tiny world's Qwen2.5-VL processor, its pixel bounds set to the ones under test."""
    tokenizer, processor = load_tokenizer_and_processor(str(tiny_world / "models" / "qwen2_5_vl"))
    processor.image_processor.size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    return tokenizer, processor


def test_dataset_grid_equals_qwen_vl_utils_fetch_image(tmp_path, vl):
    tokenizer, processor = vl
    assert all(max(w, h) / min(w, h) < 200 for w, h in SIZES)
    rows = [{"problem": "<image>?", "answer": "1", "images": [{"bytes": png(w, h), "path": None}]} for w, h in SIZES]
    path = tmp_path / "sizes.parquet"
    pd.DataFrame(rows).to_parquet(path)
    config = PromptDatasetConfig(max_prompt_length=4096, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    ds = PromptDataset(str(path), tokenizer, processor, config)
    assert len(ds) == len(SIZES)

    def grid(image):
        return processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()

    patch = processor.image_processor.patch_size
    changed = []
    for index, (width, height) in enumerate(SIZES):
        original = Image.open(io.BytesIO(rows[index]["images"][0]["bytes"]))
        reference = fetch_image(
            {"image": original, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}, image_patch_size=patch
        )
        ours = ds[index]
        assert ours["multi_modal_data"]["images"][0].size == reference.size, (width, height)
        assert ours["multi_modal_inputs"]["image_grid_thw"][0].tolist() == grid(reference), (width, height)
        old = grid(old_resize(original, MIN_PIXELS, MAX_PIXELS))
        if old != grid(reference):
            changed.append(((width, height), old, grid(reference)))
    # Printed, not asserted: the old resize gave a different grid ([t, h, w] patches, old -> new) for
    # 16 of these sizes. Tiny ones: 5x7, 27x29 [1,4,4] -> [1,6,4]; 30x20, 60x40 [1,4,4] -> [1,4,6];
    # 2x300, 300x2 54 -> 22 patches long; 1x150 54 -> 10; 2x390, 390x2 56 -> 28; 10x1990, 1990x10
    # 58 -> 142 (qwen-vl-utils keeps a side under 14 pixels at one cell; transformers rounds it to 0
    # and upscales). Downscaled ones, where truncating then rounding again overshot the model's grid:
    # 640x480, 1024x768 [1,28,36] -> [1,26,36]; 1000x1001 [1,32,32] -> [1,32,30]; 60x9000, 9000x60
    # 392 -> 390 patches long.
    print(f"\n{len(changed)} of {len(SIZES)} sizes got a different grid under the old resize:")
    for size, old, new in changed:
        print(f"  {size[0]}x{size[1]}: {old} -> {new}")


def test_images_on_the_grid_within_bounds_are_untouched(tiny_world):
    # Every grid size up to 64 tokens, under the RL and SFT defaults, the tiny world's bounds and none.
    for height in range(28, 64 * 28 + 1, 28):
        for width in range(28, 64 * 28 * 28 // height + 1, 28):
            image = Image.fromarray(
                np.random.default_rng(width + height).integers(0, 256, (height, width, 3), np.uint8)
            )
            for min_pixels, max_pixels in ((784, 4194304), (784, 262144), (784, 50176), (None, None)):
                resized = resize_within(image, min_pixels, max_pixels, 28)
                assert resized.size == image.size and resized.tobytes() == image.tobytes(), (width, height)

    # The tiny world's images (56x28 digit pairs) under the RL and SFT defaults and the tests' 784.
    rows = pd.read_parquet(tiny_world / "data" / "digit_sum" / "val.parquet")
    for value in rows["images"].head(8):
        image = Image.open(io.BytesIO(value[0]["bytes"]))
        assert image.size == (56, 28)
        for max_pixels in (4194304, 262144, 50176):
            resized = resize_within(image, 784, max_pixels, 28)
            assert resized.tobytes() == image.tobytes()


def test_no_bound_only_snaps_to_the_grid_and_converts_to_rgb():
    image = Image.new("RGBA", (30, 5000), (0, 0, 0, 0))
    resized = resize_within(image, None, None, 28)
    assert resized.mode == "RGB" and resized.size == (28, 5012)
    assert resized.getpixel((0, 0)) == (255, 255, 255)  # transparent is white, as qwen-vl-utils makes it
    assert resize_within(Image.new("L", (1, 1)), None, None, 28).size == (28, 28)


def test_too_elongated_images_are_errors_naming_size_limit_and_row(tmp_path, vl):
    with pytest.raises(ValueError, match=r"^1x250 image: absolute aspect ratio must be smaller than 200, got 250"):
        resize_within(Image.new("RGB", (1, 250)), None, None, 28)
    # Below the limit, but the grid size is not: 28x5908 (ratio 211) and, downscaled, 6272x28 (224).
    for size, grid, max_pixels in (((30, 5900), "28x5908", None), ((7900, 40), "6272x28", MAX_PIXELS)):
        with pytest.raises(
            ValueError, match=rf"^{size[0]}x{size[1]} image: too elongated; .* becomes {grid}, .* of 200"
        ):
            resize_within(Image.new("RGB", size), MIN_PIXELS, max_pixels, 28)
    with pytest.raises(ValueError, match=r"^10x1990 image: too elongated; .*max_pixels=3136 it becomes 0x784"):
        resize_within(Image.new("RGB", (10, 1990)), None, 3136, 28)

    tokenizer, processor = vl
    rows = [
        {"problem": "<image>?", "answer": "1", "images": [{"bytes": png(56, 28), "path": None}]},
        {"problem": "<image>?", "answer": "2", "images": [{"bytes": png(3, 900), "path": None}]},
    ]
    path = tmp_path / "elongated.parquet"
    pd.DataFrame(rows).to_parquet(path)
    with pytest.raises(DataError, match=r"elongated\.parquet row 1: bad image \(3x900 image: .* smaller than 200"):
        PromptDataset(str(path), tokenizer, processor, PromptDatasetConfig())
    assert len(PromptDataset(str(path), tokenizer, processor, PromptDatasetConfig(skip_bad_samples=True))) == 1
    assert image_factor(processor) == 28
