"""Generate a model's answers on benchmarks, straight into the layout Evaluation/ scores.

    python -m verl.trainer.generate model_path=PATH benchmarks=[a.parquet,name@test] output_dir=Evaluation/Raw-Outputs

writes `<output_dir>/<model_name>/<benchmark>.jsonl`, one row per question: id, prompt, response,
ground_truth, benchmark (plus `choices`/`question_type` when the data has them). Rows are appended
batch by batch, so an interrupted run loses at most one batch and a rerun skips the ids it finished.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch

from verl.models.loading import load_model, load_tokenizer_and_processor, resolve_attn_implementation
from verl.protocol import SamplingParams
from verl.utils.cli_help import handle_help
from verl.utils.config import ConfigError, load_config
from verl.utils.dataset import PromptDataset, PromptDatasetConfig, collate_prompts
from verl.utils.device import resolve_device
from verl.utils.progress import progress
from verl.workers.rollout.hf_rollout import HFRollout

logger = logging.getLogger(__name__)
PASSTHROUGH_COLUMNS = ("choices", "question_type")


@dataclass
class GenerateConfig:
    model_path: str = "tiny_world/cold_start/model"
    """HF folder or our checkpoint's `global_step_N/actor` folder."""
    model_name: str | None = None
    """Output sub-folder name; default: the model folder's name (parent's name for `actor`)."""
    benchmarks: list[str] = field(default_factory=lambda: ["tiny_world/data/digit_sum/test.parquet"])
    """Files, folders or `name@split`; a benchmark's name is its file stem (or `name_split`)."""
    output_dir: str = "Evaluation/Raw-Outputs"
    format_prompt: str | None = "examples/format_prompt/see_think.jinja"
    prompt_key: str = "problem"
    answer_key: str = "answer"
    image_key: str = "images"
    id_key: str = "id"
    """Column with a stable question id; the row number is used when absent."""
    max_prompt_length: int = 4096
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 is greedy."""
    top_p: float = 1.0
    seed: int = 1
    batch_size: int = 64
    min_pixels: int | None = 784
    max_pixels: int | None = 4194304
    device: str = "auto"


def benchmark_name(spec: str) -> str:
    if "@" in spec and not os.path.exists(spec):
        name, split = spec.rsplit("@", 1)
        return f"{name.replace('/', '_')}_{split}"
    return os.path.splitext(os.path.basename(spec.rstrip("/")))[0]


def default_model_name(model_path: str) -> str:
    path = os.path.normpath(model_path)
    base = os.path.basename(path)
    if base == "actor":  # <run>/global_step_N/actor -> <run>-global_step_N
        step_dir = os.path.dirname(path)
        return f"{os.path.basename(os.path.dirname(step_dir))}-{os.path.basename(step_dir)}"
    return base


def finished_ids(path: str) -> set[str]:
    """Ids already written (a torn last line from a crash is ignored and rewritten)."""
    if not os.path.isfile(path):
        return set()
    done, keep = set(), []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done.add(str(row["id"]))
            keep.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)
    return done


def generate_benchmark(config: GenerateConfig, spec: str, engine: HFRollout, tokenizer, processor, out_dir: str) -> int:
    """Answer every unanswered question of one benchmark; returns how many were written now."""
    dataset = PromptDataset(
        spec,
        tokenizer,
        processor,
        PromptDatasetConfig(
            prompt_key=config.prompt_key,
            answer_key=config.answer_key,
            image_key=config.image_key,
            format_prompt=config.format_prompt,
            max_prompt_length=config.max_prompt_length,
            min_pixels=config.min_pixels,
            max_pixels=config.max_pixels,
        ),
    )
    name = benchmark_name(spec)
    path = os.path.join(out_dir, f"{name}.jsonl")
    done = finished_ids(path)

    def question_id(item: int) -> str:
        row = dataset.rows[dataset.indices[item]]
        return str(row[config.id_key]) if config.id_key in row else str(dataset.indices[item])

    todo = [i for i in range(len(dataset)) if question_id(i) not in done]
    logger.info("%s: %d questions, %d already answered", name, len(dataset), len(dataset) - len(todo))
    sampling = SamplingParams(
        n=1, temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens, seed=config.seed
    )
    written = 0
    batch_starts = range(0, len(todo), config.batch_size)
    for start in progress(batch_starts, f"generate {spec}", len(batch_starts)):
        items = todo[start : start + config.batch_size]
        batch = collate_prompts([dataset[i] for i in items], tokenizer.pad_token_id)
        output = engine.generate(batch, sampling)
        responses = output.batch["responses"].masked_fill(output.batch["response_mask"] == 0, tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        with open(path, "a", encoding="utf-8") as f:
            for item, text in zip(items, texts):
                row = dataset.rows[dataset.indices[item]]
                record = {
                    "id": question_id(item),
                    "prompt": str(row[config.prompt_key]),
                    "response": text,
                    "ground_truth": str(row[config.answer_key]),
                    "benchmark": name,
                }
                record.update({k: row[k] for k in PASSTHROUGH_COLUMNS if k in row})
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
        written += len(items)
    return written


def run(config: GenerateConfig) -> str:
    device = resolve_device(config.device)
    tokenizer, processor = load_tokenizer_and_processor(config.model_path)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(config.model_path, dtype, resolve_attn_implementation("auto", device)).to(device)
    engine = HFRollout(model, tokenizer, micro_batch_size=config.batch_size)
    out_dir = os.path.join(config.output_dir, config.model_name or default_model_name(config.model_path))
    os.makedirs(out_dir, exist_ok=True)
    for spec in config.benchmarks:
        written = generate_benchmark(config, spec, engine, tokenizer, processor, out_dir)
        logger.info("%s: wrote %d answers to %s", spec, written, out_dir)
    return out_dir


USAGE = (
    "usage: python -m verl.trainer.generate [config=FILE.yaml ...] [key=value ...] [-h]\n"
    "       vision-sr1-generate ...  (the same, once the package is installed)"
)


def main(argv: list[str] | None = None) -> str:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    handle_help(argv, USAGE, __doc__ or "", GenerateConfig, "GenerateConfig in verl/trainer/generate.py")
    try:
        config = load_config(argv, GenerateConfig)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return run(config)


def cli() -> None:
    """Console entry point `vision-sr1-generate`."""
    main()


if __name__ == "__main__":
    main()
