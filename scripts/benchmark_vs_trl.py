"""Our GRPO step against TRL's GRPOTrainer, side by side in one run, on TRL's own anchor workload.

The anchor (a folder holding `run_trl_anchor.sh`, `tiny_assets.py` and `bench_grpo.py`) builds its
own environment (TRL, torch +cpu), a tiny random Qwen2.5-VL (1.31M parameters, 16 image tokens a
picture) and 64 "How many squares?" prompts, and times TRL's GRPOTrainer: 8 prompts x 8 samples x
32 tokens per step, KL 0.04, HF generation, fp32, one thread; its number is the median step of
steps 3..N. This script runs it (with and without TRL's default gradient checkpointing), converts
the same model and prompts into our formats, and times our trainer on the same workload in a
subprocess per variant (scripts/benchmark_grpo.py), median of steps 2..N. Prints one table.

    python scripts/benchmark_vs_trl.py --anchor PATH/TO/trl_anchor [--steps 10] [--trl-base /tmp/trlbase]

Not a test: numbers to compare within one run, on one machine, with the same thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_grpo import STAGES, run_variant  # noqa: E402

# Our variants: the plain path, the defaults less prompt sharing, the defaults.
VARIANTS = {
    "ours: plain (separate old pass, full logits, no prompt sharing)": [
        "worker.actor.skip_old_log_prob_when_on_policy=false",
        "worker.actor.logprob_chunk_size=0",
        "worker.actor.shared_prompt=false",
    ],
    "ours: defaults without shared_prompt": ["worker.actor.shared_prompt=false"],
    "ours: defaults (shared_prompt on)": [],
}


def run_trl(anchor: Path, trl_base: Path, steps: int, gradient_checkpointing: bool) -> float:
    env = {**os.environ, "THREADS": "1", "STEPS": str(steps), "TRLBASE": str(trl_base)}
    env["EXTRA"] = "" if gradient_checkpointing else "--no-grad-ckpt"
    result = subprocess.run(["bash", str(anchor / "run_trl_anchor.sh")], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the TRL anchor failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    match = re.search(r"TRL_GRPO_STEP_S=([0-9.]+)", result.stdout)
    if match is None:
        raise SystemExit(f"the TRL anchor printed no TRL_GRPO_STEP_S:\n{result.stdout[-2000:]}")
    return float(match.group(1))


def convert_assets(assets: Path, out: Path) -> tuple[Path, Path]:
    """The anchor's model folder and dataset in our formats: a model folder whose processor is the
    standard Qwen2.5-VL one, and a parquet file with problem / images / answer columns."""
    import datasets
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    model = out / "model"
    shutil.copytree(assets / "model", model)
    # The anchor saves an image-only processor class of its own (its environment has no
    # torchvision); the standard processor is rebuilt here with the same image settings.
    processor_config = model / "processor_config.json"
    image_settings = json.loads(processor_config.read_text())["image_processor"]
    image_settings.pop("image_processor_type", None)
    processor_config.unlink()
    tokenizer = AutoTokenizer.from_pretrained(model)
    patching = {key: image_settings[key] for key in ("patch_size", "merge_size", "temporal_patch_size")}
    Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**image_settings),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**patching),
        chat_template=tokenizer.chat_template,
    ).save_pretrained(model)

    rows = datasets.load_from_disk(str(assets / "data"))
    problems, images = [], []
    for row in rows:
        (message,) = row["prompt"]
        parts = message["content"]
        text = "".join("<image>" if part["type"] == "image" else part["text"] for part in parts)
        problems.append(text)
        images.append([row["image"]])
    table = datasets.Dataset.from_dict(
        {"problem": problems, "images": images, "answer": rows["answer"]},
        features=datasets.Features(
            {
                "problem": datasets.Value("string"),
                "images": datasets.List(datasets.Image()),
                "answer": datasets.Value("string"),
            }
        ),
    )
    data = out / "train.parquet"
    table.to_parquet(str(data))
    return model, data


def our_overrides(model: Path, data: Path) -> list[str]:
    """TRL anchor's workload in our keys (its GRPOConfig: 64 completions per step in one micro-batch)."""
    return [
        f"data.train_files={data}",
        f"worker.actor.model.model_path={model}",
        "data.format_prompt=null",
        "data.rollout_batch_size=8",
        "data.max_response_length=32",
        # The anchor's processor bounds: its 112 x 112 pictures stay 16 merged tokens.
        "data.min_pixels=3136",
        "data.max_pixels=12544",
        "worker.actor.global_batch_size=8",
        "worker.actor.micro_batch_size_per_device_for_update=64",
        "worker.actor.micro_batch_size_per_device_for_experience=64",
        "worker.ref.micro_batch_size_per_device_for_experience=64",
        "worker.rollout.n=8",
        "worker.rollout.temperature=1.0",
        "worker.rollout.top_p=1.0",
        "worker.rollout.micro_batch_size=64",
        "worker.actor.optim.lr=1.0e-6",
        "algorithm.use_kl_loss=true",
        "algorithm.kl_penalty=low_var_kl",
        "algorithm.kl_coef=0.04",
        "worker.reward.reward_function=examples/reward_function/cot.py:compute_score",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anchor", type=Path, required=True, help="folder holding run_trl_anchor.sh")
    parser.add_argument("--trl-base", type=Path, default=Path(tempfile.gettempdir()) / "trlbase")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if not (args.anchor / "run_trl_anchor.sh").is_file():
        raise SystemExit(f"--anchor {args.anchor}: no run_trl_anchor.sh there")

    results: dict[str, dict[str, float]] = {}
    for checkpointing in (True, False):
        name = f"TRL GRPOTrainer, gradient checkpointing {'on (its default)' if checkpointing else 'off'}"
        results[name] = {"step": run_trl(args.anchor, args.trl_base, args.steps, checkpointing)}
        print(f"{name}: {results[name]['step']:.3f} s/step", flush=True)
    assets = args.trl_base / "work" / "qwen2_5_vl"
    with tempfile.TemporaryDirectory() as tmp:
        model, data = convert_assets(assets, Path(tmp))
        base = our_overrides(model, data)
        for name, overrides in VARIANTS.items():
            results[name] = run_variant(ROOT / "tiny_world", args.steps, base + overrides, threads=1)
            print(f"{name}: {results[name]['step']:.3f} s/step", flush=True)

    trl_default = next(iter(results.values()))["step"]
    print(f"\nmedian s/step (TRL: steps 3..{args.steps}; ours: steps 2..{args.steps}), 1 thread")
    print("| run | " + " | ".join(STAGES) + " | vs TRL default |")
    print("|---|" + "---|" * (len(STAGES) + 1))
    for name, row in results.items():
        cells = " | ".join(f"{row[stage]:.3f}" if stage in row else "-" for stage in STAGES)
        print(f"| {name} | {cells} | {row['step'] / trl_default:.2f}x |")


if __name__ == "__main__":
    main()
