"""Supervised fine-tuning data: sharegpt and alpaca rows as chat-formatted tokens with assistant-only labels.

Row formats (LLaMA-Factory's, the ones the Vision-SR1 cold start uses), detected per file:
- sharegpt: `messages` (or `conversations`), a list of turns `{role, content}` (or `{from, value}`
  with human/gpt roles), and an optional `images` list. `<image>` in a user turn marks where each
  image goes; a row without any placeholder gets its images before the first user turn's text.
- alpaca: `instruction`, optional `input` (appended on a new line) and `output`; text only.

An example is the model's own chat template applied turn by turn. Only the assistant replies and
the end-of-turn token closing each of them carry labels; the system prompt, user turns and image
tokens are context. Context and replies are tokenized separately, so a reply's tokens are exactly
what the model generates after the same prompt at inference time.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase, ProcessorMixin

from verl.protocol import DataProto, as_object_array
from verl.utils.dataset import (
    IMAGE_PLACEHOLDER,
    DataError,
    EpochLoader,
    RowNames,
    build_messages,
    describe_image,
    image_factor,
    load_rows,
    open_image,
    resize_within,
)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (context and padding)."""
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
# Batches of similar length are formed within windows of this many batches, so the data order stays random.
LENGTH_GROUP_WINDOW = 64


@dataclass
class Conversation:
    """One training example before tokenization: turns of (role, text) and the images the user turns show."""

    turns: list[tuple[str, str]]
    images: list[Any]
    image_dir: str | None
    origin: str
    """`file row N`, for error messages."""


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    """IGNORE_INDEX except on assistant reply tokens (and each reply's end-of-turn token)."""
    multi_modal_inputs: dict[str, torch.Tensor]
    """`pixel_values` and `image_grid_thw` of the example's images; empty when it has none."""


def _default_image_dir(spec: str) -> str | None:
    if os.path.isdir(spec):
        return spec
    if os.path.isfile(spec):
        return os.path.dirname(spec)
    return None  # `name@split`: images must be bytes or absolute paths


def _sharegpt_turns(turns: Any, origin: str) -> list[tuple[str, str]]:
    parsed = []
    for index, turn in enumerate(turns or []):
        role = turn.get("role") or turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if role not in ROLES or content is None:
            raise DataError(
                f"{origin} turn {index}: expected role/content (or from/value) with a role in {sorted(ROLES)}"
            )
        parsed.append((ROLES[role], str(content)))
    roles = [role for role, _ in parsed]
    dialogue = roles[1:] if roles[:1] == ["system"] else roles
    # An odd number of turns never equals the pairs.
    if not dialogue or dialogue != ["user", "assistant"] * (len(dialogue) // 2):
        raise DataError(
            f"{origin}: turns must be an optional system turn, then user/assistant pairs ending with the assistant; got {roles}"
        )
    return parsed


def read_conversations(spec: str, image_dir: str | None = None) -> list[Conversation]:
    """All rows of a sharegpt or alpaca data file (`file`, folder or `name@split`) as conversations.

    Relative image paths resolve against `image_dir`, by default the data file's folder.
    """
    rows = load_rows(spec)
    row_name = RowNames(spec)
    columns = set(rows.column_names)
    base_dir = image_dir if image_dir is not None else _default_image_dir(spec)
    conversations = []
    if "messages" in columns or "conversations" in columns:
        key = "messages" if "messages" in columns else "conversations"
        for index, row in enumerate(rows):
            origin = row_name(index)
            turns = _sharegpt_turns(row[key], origin)
            conversations.append(Conversation(turns, list(row.get("images") or []), base_dir, origin))
    elif {"instruction", "output"} <= columns:
        for index, row in enumerate(rows):
            prompt = str(row["instruction"])
            if row.get("input"):
                prompt = f"{prompt}\n{row['input']}"
            turns = [("user", prompt), ("assistant", str(row["output"]))]
            conversations.append(Conversation(turns, [], base_dir, row_name(index)))
    else:
        raise DataError(
            f"{spec}: neither sharegpt (a `messages` or `conversations` column) nor alpaca "
            f"(`instruction` and `output` columns); its columns: {sorted(columns)}"
        )
    return conversations


class ConversationEncoder:
    """Tokenizes conversations with the model's chat template and image processor."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        processor: ProcessorMixin | None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.processor = processor
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.end_of_turn_id = tokenizer.eos_token_id
        if self.end_of_turn_id is None:
            raise ValueError("the tokenizer has no eos token; SFT needs it to close each assistant reply")

    def encode(self, conversation: Conversation) -> EncodedExample:
        images = self._open_images(conversation)
        messages = self._chat_messages(conversation, len(images))
        multi_modal_inputs: dict[str, torch.Tensor] = {}
        image_token_counts: list[int] = []
        if images:
            multi_modal_inputs = dict(self.processor.image_processor(images=images, return_tensors="pt"))
            merge = self.processor.image_processor.merge_size
            image_token_counts = (multi_modal_inputs["image_grid_thw"].prod(-1) // merge**2).tolist()
            multi_modal_inputs = {k: multi_modal_inputs[k] for k in ("pixel_values", "image_grid_thw")}

        input_ids: list[int] = []
        labels: list[int] = []
        rendered = ""
        for index, (role, _) in enumerate(conversation.turns):
            if role != "assistant":
                continue
            prompt = self._render(messages[:index], add_generation_prompt=True)
            full = self._render(messages[: index + 1], add_generation_prompt=False)
            if not (prompt.startswith(rendered) and full.startswith(prompt)):
                raise DataError(
                    f"{conversation.origin}: the chat template does not render the conversation turn by turn "
                    "(a longer conversation must extend the shorter one's text)"
                )
            context = self._expand_image_tokens(prompt[len(rendered) :], image_token_counts, conversation.origin)
            context_ids = self._tokenize(context)
            input_ids += context_ids
            labels += [IGNORE_INDEX] * len(context_ids)
            reply_ids = self._tokenize(full[len(prompt) :])
            if self.end_of_turn_id not in reply_ids:
                raise DataError(
                    f"{conversation.origin}: the chat template does not close the assistant turn with the eos token "
                    f"{self.tokenizer.eos_token!r}"
                )
            end = reply_ids.index(self.end_of_turn_id) + 1  # e.g. the newline after <|im_end|> is context
            input_ids += reply_ids
            labels += reply_ids[:end] + [IGNORE_INDEX] * (len(reply_ids) - end)
            rendered = full
        if image_token_counts:
            raise DataError(f"{conversation.origin}: the chat template placed fewer image tokens than there are images")
        return EncodedExample(input_ids, labels, multi_modal_inputs)

    def _open_images(self, conversation: Conversation) -> list[Image.Image]:
        if not conversation.images:
            return []
        if self.processor is None:
            raise DataError(f"{conversation.origin}: has images but the model is text-only")
        factor = image_factor(self.processor)
        images = []
        for number, value in enumerate(conversation.images, start=1):
            try:
                image = open_image(value, conversation.image_dir)
                images.append(resize_within(image, self.min_pixels, self.max_pixels, factor))
            except (OSError, TypeError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
                # The value is described, not repr'd: undecoded images carry their bytes.
                raise DataError(
                    f"{conversation.origin}: bad image ({exc}) in column 'images', image {number} of "
                    f"{len(conversation.images)} ({describe_image(value)})"
                ) from exc
        return images

    def _chat_messages(self, conversation: Conversation, num_images: int) -> list[dict[str, Any]]:
        """Chat-template messages; user turns get an image part where each `<image>` stood."""
        turns = list(conversation.turns)
        placeholders = [text.count(IMAGE_PLACEHOLDER) for _, text in turns]
        if any(count and role != "user" for (role, _), count in zip(turns, placeholders)):
            raise DataError(f"{conversation.origin}: `<image>` placeholders may appear only in user turns")
        if num_images and not any(placeholders):
            first_user = next(i for i, (role, _) in enumerate(turns) if role == "user")
            turns[first_user] = ("user", IMAGE_PLACEHOLDER * num_images + turns[first_user][1])
            placeholders[first_user] = num_images
        if sum(placeholders) != num_images:
            raise DataError(
                f"{conversation.origin}: {sum(placeholders)} `<image>` placeholders but {num_images} images"
            )
        messages = []
        for (role, text), count in zip(turns, placeholders):
            if role == "user":
                messages.append(build_messages(text, count)[0])
            else:
                messages.append({"role": role, "content": text})
        return messages

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        owner = self.processor if self.processor is not None else self.tokenizer
        if not messages:
            return ""
        return owner.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _expand_image_tokens(self, text: str, counts: list[int], origin: str) -> str:
        """One image placeholder token per merged patch, as the Qwen-VL processors expand them.

        Consumes the counts of the images `text` shows from the front of `counts`.
        """
        if self.processor is None:
            return text
        token = self.processor.image_token
        pieces = text.split(token)
        if len(pieces) - 1 > len(counts):
            raise DataError(f"{origin}: the chat template placed more image tokens than there are images")
        expanded = [pieces[0]]
        for piece in pieces[1:]:
            expanded.append(token * counts.pop(0) + piece)
        return "".join(expanded)

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


class SFTDataset(torch.utils.data.Dataset):
    """The conversations of several files, encoded when accessed.

    Loading encodes every row once to learn its length: rows longer than `max_length` are dropped
    (and counted in the log), so no example is ever cut through its image tokens or reply.
    `row_ids[i]` is example i's dataset row: its row number in the files read one after another
    (every row counted, dropped ones too), so with one file it is the row in that file.
    """

    def __init__(
        self, specs: list[str], encoder: ConversationEncoder, max_length: int, image_dir: str | None = None
    ) -> None:
        self.encoder = encoder
        self.conversations: list[Conversation] = []
        self.lengths: list[int] = []
        self.file_rows: list[np.ndarray] = []  # per file, the indices of its kept examples
        self.row_ids: list[int] = []
        rows_before = 0  # rows of the files before this one
        for spec in specs:
            kept, dropped = [], 0
            conversations = read_conversations(spec, image_dir)
            for row, conversation in enumerate(conversations):
                length = len(encoder.encode(conversation).input_ids)
                if length > max_length:
                    dropped += 1
                    continue
                kept.append(len(self.conversations))
                self.conversations.append(conversation)
                self.lengths.append(length)
                self.row_ids.append(rows_before + row)
            rows_before += len(conversations)
            if dropped:
                logger.warning("%s: dropped %d examples longer than max_length=%d tokens", spec, dropped, max_length)
            if not kept:
                raise DataError(f"{spec}: no examples left (all longer than max_length={max_length} tokens?)")
            logger.info("%s: %d examples", spec, len(kept))
            self.file_rows.append(np.array(kept))

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> EncodedExample:
        return self.encoder.encode(self.conversations[index])


def collate_examples(examples: list[EncodedExample], pad_token_id: int) -> DataProto:
    """Right-pad to the longest example: `input_ids`, `attention_mask`, `labels`, plus per-row image inputs."""
    max_len = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), max_len), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), max_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), max_len), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        labels[row, :length] = torch.tensor(example.labels)
        attention_mask[row, :length] = 1
    return DataProto.from_dict(
        tensors={"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels},
        non_tensors={"multi_modal_inputs": [example.multi_modal_inputs for example in examples]},
    )


def _sample_rows(rows: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """`ratio` x the rows: every row int(ratio) times, plus a random subset for the fractional part."""
    whole = int(ratio)
    extra = round((ratio - whole) * len(rows))
    return np.concatenate([np.tile(rows, whole), rng.choice(rows, extra, replace=False)]).astype(int)


class SFTLoader(EpochLoader):
    """Batches of conversations.

    Epoch `e` draws each file's share (`ratios`, 1.0 each by default) and shuffles with a generator
    seeded by (seed, e); with `group_by_length`, examples are sorted by length inside windows of
    LENGTH_GROUP_WINDOW batches and the batches are then visited in random order. The state is
    (epoch, batches consumed), so a resumed run sees exactly the batches the interrupted one had not.
    """

    def __init__(
        self,
        dataset: SFTDataset,
        batch_size: int,
        pad_token_id: int,
        shuffle: bool = True,
        seed: int = 1,
        ratios: list[float] | None = None,
        group_by_length: bool = False,
        drop_last: bool = True,
    ) -> None:
        super().__init__(seed)
        self.dataset = dataset
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self.shuffle = shuffle
        self.ratios = list(ratios) if ratios else [1.0] * len(dataset.file_rows)
        if len(self.ratios) != len(dataset.file_rows):
            raise ValueError(f"SFTLoader: {len(self.ratios)} ratios for {len(dataset.file_rows)} files")
        self.group_by_length = group_by_length
        self.drop_last = drop_last
        if len(self) == 0:
            raise DataError(f"an epoch holds {self.examples_per_epoch} examples, fewer than one batch of {batch_size}")

    @property
    def examples_per_epoch(self) -> int:
        return sum(
            int(ratio) * len(rows) + round((ratio - int(ratio)) * len(rows))
            for ratio, rows in zip(self.ratios, self.dataset.file_rows)
        )

    def __len__(self) -> int:
        full, rest = divmod(self.examples_per_epoch, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The example indices of every batch of `epoch`, in visiting order."""
        rng = np.random.default_rng([self.seed, epoch])
        order = np.concatenate([_sample_rows(rows, r, rng) for r, rows in zip(self.ratios, self.dataset.file_rows)])
        if self.shuffle:
            order = rng.permutation(order)
        if self.group_by_length:
            window = self.batch_size * LENGTH_GROUP_WINDOW
            lengths = np.array(self.dataset.lengths)
            order = np.concatenate(
                [
                    chunk[np.argsort(-lengths[chunk], kind="stable")]
                    for chunk in np.split(order, range(window, len(order), window))
                ]
            )
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        batches = batches[: len(self)]
        if self.shuffle and self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def collate(self, indices: np.ndarray) -> DataProto:
        """The examples at `indices`, with their dataset rows in `row_index` (for the trainer's account)."""
        batch = collate_examples([self.dataset[int(i)] for i in indices], self.pad_token_id)
        batch.non_tensor_batch["row_index"] = as_object_array([self.dataset.row_ids[int(i)] for i in indices])
        return batch
