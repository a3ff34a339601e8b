"""The tiny world's datasets: digit_sum (RL, with images), text_sum (its text-only twin) and cold_start (SFT).

digit_sum rows follow the Vision-SR1 RL schema (`problem` with one `<image>`, `answer`, `images`) plus
`digits` (the true digits, to score perception) and `source_ids` (the scans used, to prove the splits
are disjoint). The cold-start files follow LLaMA-Factory's sharegpt and alpaca formats.

digit_mix holds the same images as digit_sum, about half of them asked as a two-option question ("...: 7
or 12?", `kind` "choice", the other `kind` "sum"). A policy can answer those right half the time without
looking, which is what the visual reward is meant to stop paying for. Its cold-start set
(cold_start/seethink_mix.json) asks the see-think examples the same way, so that a model starts RL
describing the image on both kinds of question.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from verl.tiny_world import texts
from verl.tiny_world.digits import DigitScans, load_digit_scans, pair_png, sample_pairs, split_sources

DIGIT_SUM_FEATURES = datasets.Features(
    {
        "problem": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "images": datasets.List(datasets.Image()),
        "digits": datasets.List(datasets.Value("int64")),
        "source_ids": datasets.List(datasets.Value("int64")),
    }
)
DIGIT_MIX_FEATURES = datasets.Features({**DIGIT_SUM_FEATURES, "kind": datasets.Value("string")})
MAX_SUM = 18
TEXT_SUM_FEATURES = datasets.Features(
    {
        "problem": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "digits": datasets.List(datasets.Value("int64")),
    }
)
SHAREGPT_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}


@dataclass(frozen=True)
class DataSizes:
    """Rows per split of digit_sum/text_sum, and digit pairs in the cold-start set (three examples each)."""

    train: int = 4000
    val: int = 128
    test: int = 256
    cold_start: int = 1500


DEFAULT_SIZES = DataSizes()


def _write_parquet(path: Path, rows: list[dict], features: datasets.Features) -> None:
    # The schema carries the Hugging Face feature metadata, so `datasets` decodes `images` as images.
    table = pa.Table.from_pylist(rows, schema=features.arrow_schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _pair_rows(scans: DigitScans, pairs: np.ndarray) -> tuple[list[dict], list[dict]]:
    """One digit_sum row and its text_sum twin per (left, right) pair of scan indices."""
    image_rows, text_rows = [], []
    for left_id, right_id in pairs.tolist():
        left, right = int(scans.labels[left_id]), int(scans.labels[right_id])
        answer = str(left + right)
        image_rows.append(
            {
                "problem": texts.digit_sum_problem(),
                "answer": answer,
                "images": [{"bytes": pair_png(scans, left_id, right_id), "path": None}],
                "digits": [left, right],
                "source_ids": [left_id, right_id],
            }
        )
        text_rows.append({"problem": texts.text_sum_problem(left, right), "answer": answer, "digits": [left, right]})
    return image_rows, text_rows


def _choice_options(total: int, rng: np.random.Generator) -> tuple[int, int] | None:
    """With probability 1/2, the two options of a choice question on a pair summing to `total`: the sum
    and another sum (uniform over the other 18), in random order; otherwise None (asked as a sum)."""
    if rng.random() >= 0.5:
        return None
    distractor = int(rng.choice([s for s in range(MAX_SUM + 1) if s != total]))
    return (total, distractor) if rng.random() < 0.5 else (distractor, total)


def _mix_rows(image_rows: list[dict], rng: np.random.Generator) -> list[dict]:
    """digit_mix: each digit_sum row, asked with probability 1/2 as a choice question."""
    rows = []
    for row in image_rows:
        options = _choice_options(int(row["answer"]), rng)
        if options is None:
            rows.append({**row, "kind": "sum"})
        else:
            rows.append({**row, "problem": texts.digit_choice_problem(*options), "kind": "choice"})
    return rows


def _sharegpt_example(user_text: str, target: str, image_path: str) -> dict:
    messages = [
        {"role": "user", "content": texts.IMAGE_PLACEHOLDER + user_text},
        {"role": "assistant", "content": target},
    ]
    return {"messages": messages, "images": [image_path]}


def _write_json(path: Path, value: list | dict) -> None:
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_cold_start(
    cold_dir: Path, scans: DigitScans, train_pairs: np.ndarray, val_pairs: np.ndarray, mix_rng: np.random.Generator
) -> None:
    """Writes the three SFT formats for `train_pairs`, the see-think set asked as digit_mix asks it, a see-think
    validation set, the PNGs and dataset_info.json."""
    (cold_dir / "images").mkdir(parents=True, exist_ok=True)
    see_think_prompt = f"{texts.QUESTION} {texts.SEE_THINK_INSTRUCTION}"
    think_prompt = f"{texts.QUESTION} {texts.THINK_INSTRUCTION}"

    def image_file(split: str, index: int, left_id: int, right_id: int) -> str:
        relative = f"images/{split}_{index:05d}.png"
        (cold_dir / relative).write_bytes(pair_png(scans, left_id, right_id))
        return relative

    see_think, see_think_mix, think, text_only = [], [], [], []
    for index, (left_id, right_id) in enumerate(train_pairs.tolist()):
        left, right = int(scans.labels[left_id]), int(scans.labels[right_id])
        image = image_file("train", index, left_id, right_id)
        see_think.append(_sharegpt_example(see_think_prompt, texts.see_think_answer(left, right), image))
        # The same target on a choice question: the cold start of the digit_mix experiment describes the
        # image whichever way it is asked, so RL decides whether describing keeps paying.
        options = _choice_options(left + right, mix_rng)
        mix_prompt = (
            see_think_prompt
            if options is None
            else f"{texts.digit_choice_question(*options)} {texts.SEE_THINK_INSTRUCTION}"
        )
        see_think_mix.append(_sharegpt_example(mix_prompt, texts.see_think_answer(left, right), image))
        think.append(_sharegpt_example(think_prompt, texts.think_answer(left, right), image))
        text_only.append(
            {
                "instruction": texts.perception_prompt(left, right),
                "input": "",
                "output": texts.think_answer(left, right),
            }
        )
    see_think_val = []
    for index, (left_id, right_id) in enumerate(val_pairs.tolist()):
        left, right = int(scans.labels[left_id]), int(scans.labels[right_id])
        image = image_file("val", index, left_id, right_id)
        see_think_val.append(_sharegpt_example(see_think_prompt, texts.see_think_answer(left, right), image))

    _write_json(cold_dir / "seethink.json", see_think)
    _write_json(cold_dir / "seethink_mix.json", see_think_mix)
    _write_json(cold_dir / "think.json", think)
    _write_json(cold_dir / "text_only.json", text_only)
    _write_json(cold_dir / "seethink_val.json", see_think_val)

    def sharegpt_entry(file_name: str) -> dict:
        columns = {"messages": "messages", "images": "images"}
        return {"file_name": file_name, "formatting": "sharegpt", "columns": columns, "tags": SHAREGPT_TAGS}

    alpaca_columns = {"prompt": "instruction", "query": "input", "response": "output"}
    dataset_info = {
        "digit_sum_seethink": sharegpt_entry("seethink.json"),
        "digit_mix_seethink": sharegpt_entry("seethink_mix.json"),
        "digit_sum_think": sharegpt_entry("think.json"),
        "digit_sum_text_only": {"file_name": "text_only.json", "formatting": "alpaca", "columns": alpaca_columns},
        "digit_sum_seethink_val": sharegpt_entry("seethink_val.json"),
    }
    _write_json(cold_dir / "dataset_info.json", dataset_info)


def build_data(data_dir: Path, seed: int, sizes: DataSizes) -> dict[str, int]:
    """Writes digit_sum, digit_mix, text_sum and cold_start under `data_dir`; returns the source-scan count of each split."""
    scans = load_digit_scans()
    # Independent streams, so changing one size does not reshuffle the other datasets.
    split_rng, train_rng, val_rng, test_rng, cold_rng = (np.random.default_rng([seed, k]) for k in range(5))
    sources = split_sources(scans.labels, split_rng)
    split_pairs = {
        "train": sample_pairs(sources["train"], sizes.train, train_rng),
        "val": sample_pairs(sources["val"], sizes.val, val_rng),
        "test": sample_pairs(sources["test"], sizes.test, test_rng),
    }
    mix_rngs = {split: np.random.default_rng([seed, 5 + k]) for k, split in enumerate(split_pairs)}
    for split, pairs in split_pairs.items():
        image_rows, text_rows = _pair_rows(scans, pairs)
        _write_parquet(data_dir / "digit_sum" / f"{split}.parquet", image_rows, DIGIT_SUM_FEATURES)
        _write_parquet(
            data_dir / "digit_mix" / f"{split}.parquet", _mix_rows(image_rows, mix_rngs[split]), DIGIT_MIX_FEATURES
        )
        _write_parquet(data_dir / "text_sum" / f"{split}.parquet", text_rows, TEXT_SUM_FEATURES)
    cold_pairs = sample_pairs(sources["train"], sizes.cold_start, cold_rng)
    _write_cold_start(data_dir / "cold_start", scans, cold_pairs, split_pairs["val"], np.random.default_rng([seed, 8]))
    return {split: len(ids) for split, ids in sources.items()}
