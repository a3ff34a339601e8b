"""Time a few GRPO steps on the tiny world: median seconds per stage, tokens/s and peak memory.

Each variant runs in its own process (so peak RSS is its own) and the results print side by side:

    python scripts/benchmark_grpo.py --steps 5 \
        --variant base: --variant ckpt:worker.actor.model.enable_gradient_checkpointing=true

A variant is `name:key=value,key=value`. No pass/fail: numbers to compare within one run.
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


CHILD = """
import json, resource, sys
from verl.trainer.main import main
main(sys.argv[2:])
print("PEAK_RSS_MIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def run_variant(world: Path, steps: int, overrides: list[str], threads: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
        args = base_args(world, Path(out), steps) + overrides + [f"trainer.torch_threads={threads}"]
        result = subprocess.run(
            [sys.executable, "-c", CHILD, "-", *args], cwd=ROOT, env=env, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise SystemExit(f"variant failed:\n{result.stderr[-3000:]}")
        peak = float(result.stdout.split("PEAK_RSS_MIB")[-1].split()[0])
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    measured = rows[1:] if len(rows) > 1 else rows  # the first step includes warm-up
    summary = {stage: statistics.median(r.get(f"timing_s/{stage}", 0.0) for r in measured) for stage in STAGES}
    summary["tokens/s"] = statistics.median(r["perf/tokens_per_s"] for r in measured)
    summary["gen tokens/s"] = statistics.median(r.get("perf/gen_tokens_per_s", 0.0) for r in measured)
    summary["peak RSS MiB"] = peak
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, default=ROOT / "tiny_world", help="built tiny world (built if missing)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", action="append", default=None, help="name:key=value,key=value")
    sys.path.insert(0, str(ROOT))
    from verl.utils.cli_help import exit_if_no_arguments

    # Its defaults alone build tiny_world/ in the repository when missing and time a run.
    exit_if_no_arguments(parser)
    args = parser.parse_args()
    if not (args.world / "manifest.json").is_file():
        subprocess.run([sys.executable, "scripts/make_tiny_world.py", "--out", str(args.world)], cwd=ROOT, check=True)
    variants = args.variant or ["default:"]
    results = {}
    for spec in variants:
        name, _, overrides = spec.partition(":")
        results[name] = run_variant(args.world, args.steps, [o for o in overrides.split(",") if o], args.threads)
    keys = [f"{s} s" for s in STAGES] + ["tokens/s", "gen tokens/s", "peak RSS MiB"]
    print(f"median over steps 2..{args.steps}, {args.threads} thread(s), torch {__import__('torch').__version__}")
    print("| metric | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for key in keys:
        source = key[:-2] if key.endswith(" s") else key
        print(f"| {key} | " + " | ".join(f"{r[source]:.3f}" for r in results.values()) + " |")


if __name__ == "__main__":
    main()
