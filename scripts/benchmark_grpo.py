"""Time a few GRPO steps on the tiny world: median seconds per stage, tokens/s and peak memory.

Each variant runs in its own process (so peak RSS is its own) and the results print side by side:

    python scripts/benchmark_grpo.py --steps 5 \
        --variant base: --variant ckpt:worker.actor.model.enable_gradient_checkpointing=true

A variant is `name:key=value,key=value`. No pass/fail: numbers to compare within one run; the last
row gives each variant's step time over the first variant's.

`--config` runs a recipe instead of the built-in settings (only data, model and run length are
overridden), and `--rounds` repeats the variants interleaved (A B A B ...), pooling each one's
steps, so that load from other processes on a shared machine falls on all of them alike. The
self-reward stage's cost on the main job, from the cold start, before and after its dedupe:

    python scripts/benchmark_grpo.py --config examples/tiny_world/self_reward.yaml \
        --world /tmp/tw_mine --steps 6 --rounds 3 --variant without:self_reward.enable=false \
        --variant undeduped:self_reward.dedupe=false --variant with:
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["gen", "self_reward", "reward", "old_log_prob", "ref", "adv", "update_actor", "step"]


def base_args(world: Path, out: Path, steps: int) -> list[str]:
    return [
        f"data.train_files={world / 'data/digit_sum/train.parquet'}",
        "data.val_files=null",
        f"worker.actor.model.model_path={world / 'models/qwen2_5_vl'}",
        "data.format_prompt=examples/format_prompt/see_think.jinja",
        "data.rollout_batch_size=16",
        "worker.actor.global_batch_size=16",
        "worker.actor.micro_batch_size_per_device_for_update=64",
        "worker.actor.micro_batch_size_per_device_for_experience=128",
        "worker.rollout.n=8",
        "worker.rollout.micro_batch_size=128",
        "data.max_response_length=40",
        "worker.reward.reward_function=tests/rewards/digit_density.py:compute_score",
        "trainer.logger=[file]",
        f"trainer.save_checkpoint_path={out}",
        f"trainer.max_steps={steps}",
        "trainer.save_freq=-1",
    ]


def recipe_args(config: Path, world: Path, model: Path, out: Path, steps: int) -> list[str]:
    """A recipe as it is, on this tiny world and model, for `steps` steps, without validation or saving."""
    return [
        f"config={config}",
        f"data.train_files={world / 'data/digit_sum/train.parquet'}",
        "data.val_files=null",
        f"worker.actor.model.model_path={model}",
        "trainer.logger=[file]",
        f"trainer.save_checkpoint_path={out}",
        f"trainer.max_steps={steps}",
        "trainer.save_freq=-1",
    ]


CHILD = """
import json, resource, sys
from verl.trainer.main import main
main(sys.argv[2:])
print("PEAK_RSS_MIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def run_steps(
    world: Path,
    steps: int,
    overrides: list[str],
    threads: int,
    config: Path | None = None,
    model: Path | None = None,
) -> tuple[list[dict[str, float]], float]:
    """One training run in a child process: its measured steps' metrics (the first step, which
    includes warm-up, left out) and its peak RSS in MiB."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
        if config is None:
            args = base_args(world, Path(out), steps)
            if model is not None:
                args.append(f"worker.actor.model.model_path={model}")
        else:
            args = recipe_args(config, world, model or world / "cold_start/model", Path(out), steps)
        args += overrides + [f"trainer.torch_threads={threads}"]
        result = subprocess.run(
            [sys.executable, "-c", CHILD, "-", *args], cwd=ROOT, env=env, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise SystemExit(f"variant failed:\n{result.stderr[-3000:]}")
        peak = float(result.stdout.split("PEAK_RSS_MIB")[-1].split()[0])
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return (rows[1:] if len(rows) > 1 else rows), peak


def summarize(measured: list[dict[str, float]], peak: float) -> dict[str, float]:
    summary = {stage: statistics.median(r.get(f"timing_s/{stage}", 0.0) for r in measured) for stage in STAGES}
    # The step as it would be without the self-reward stage, from the same steps (less noisy than
    # a second run, though the rewards, and so later steps, would differ without it).
    summary["step - self_reward"] = statistics.median(
        r.get("timing_s/step", 0.0) - r.get("timing_s/self_reward", 0.0) for r in measured
    )
    summary["tokens/s"] = statistics.median(r["perf/tokens_per_s"] for r in measured)
    summary["gen tokens/s"] = statistics.median(r.get("perf/gen_tokens_per_s", 0.0) for r in measured)
    summary["peak RSS MiB"] = peak
    summary["measured steps"] = float(len(measured))
    return summary


def run_variant(
    world: Path,
    steps: int,
    overrides: list[str],
    threads: int,
    config: Path | None = None,
    model: Path | None = None,
) -> dict[str, float]:
    return summarize(*run_steps(world, steps, overrides, threads, config, model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, default=ROOT / "tiny_world", help="built tiny world (built if missing)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", action="append", default=None, help="name:key=value,key=value")
    parser.add_argument(
        "--config", type=Path, default=None, help="a recipe YAML to run instead of the built-in settings"
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model (default: WORLD/cold_start/model with --config, else the random one)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="run the variants this many times, interleaved")
    sys.path.insert(0, str(ROOT))
    from verl.utils.cli_help import exit_if_no_arguments

    # Its defaults alone build tiny_world/ in the repository when missing and time a run.
    exit_if_no_arguments(parser)
    args = parser.parse_args()
    if not (args.world / "manifest.json").is_file():
        subprocess.run([sys.executable, "scripts/make_tiny_world.py", "--out", str(args.world)], cwd=ROOT, check=True)
    variants = [spec.partition(":") for spec in args.variant or ["default:"]]
    measured: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in variants}
    peaks: dict[str, float] = {name: 0.0 for name, _, _ in variants}
    for _ in range(args.rounds):
        for name, _, overrides in variants:
            rows, peak = run_steps(
                args.world, args.steps, [o for o in overrides.split(",") if o], args.threads, args.config, args.model
            )
            measured[name] += rows
            peaks[name] = max(peaks[name], peak)
    results = {name: summarize(measured[name], peaks[name]) for name in measured}
    keys = [f"{s} s" for s in STAGES] + ["step - self_reward s", "tokens/s", "gen tokens/s", "peak RSS MiB"]
    recipe = args.config or "built-in settings"
    print(
        f"{recipe}: median over steps 2..{args.steps} of {args.rounds} interleaved round(s), "
        f"{args.threads} thread(s), torch {__import__('torch').__version__}"
    )
    print("| metric | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for key in keys + ["measured steps"]:
        source = key[:-2] if key.endswith(" s") else key
        print(f"| {key} | " + " | ".join(f"{r[source]:.3f}" for r in results.values()) + " |")
    # The same ratio from each variant's own steps, immune to load that differs between runs.
    print(
        "| step / (step - self_reward) | "
        + " | ".join(f"{r['step'] / r['step - self_reward']:.3f}" for r in results.values())
        + " |"
    )
    first = next(iter(results))
    print(
        f"| step / step of {first} | "
        + " | ".join(f"{r['step'] / results[first]['step']:.3f}" for r in results.values())
        + " |"
    )


if __name__ == "__main__":
    main()
