"""Interrupt a tiny GRPO run at random moments and check that resuming gives the uninterrupted run.

    python scripts/kill_trials.py --trials 10 [--world DIR] [--workdir DIR] [--seed 0]

One uninterrupted reference run first (`python -m verl.trainer.main` on the tiny world, a 12-row
training file so the run crosses an epoch boundary). Then each trial starts the same command,
sends SIGKILL or SIGTERM (chosen at random) at a random moment of a random step (timed from that
run's own logged steps, so mid-step or mid-save), and reruns the same command until it finishes.
It compares with the reference: the rows each step trained on and left out (rows.jsonl), every logged metric
except timings and throughput, and the final weights. Prints one line per trial and a summary;
exits 1 if any trial differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REWARD = str(ROOT / "tests" / "rewards" / "digit_density.py") + ":compute_score"
STEPS, SAVE_FREQ, TRAIN_ROWS = 5, 2, 12
TIME_DEPENDENT = ("timing_s/", "perf/")


def run_args(world: Path, train: Path, save_dir: Path) -> list[str]:
    return [
        f"data.train_files={train}",
        "data.val_files=null",
        f"worker.actor.model.model_path={world / 'models/qwen2_5_vl'}",
        "data.format_prompt=examples/format_prompt/see_think.jinja",
        "data.rollout_batch_size=4",
        "worker.actor.global_batch_size=4",
        "worker.actor.micro_batch_size_per_device_for_update=8",
        "worker.rollout.n=4",
        "data.max_response_length=16",
        "worker.actor.optim.lr=1e-3",
        f"worker.reward.reward_function={REWARD}",
        "trainer.logger=[file]",
        f"trainer.save_checkpoint_path={save_dir}",
        "trainer.val_before_train=false",
        "trainer.total_epochs=2",
        f"trainer.max_steps={STEPS}",
        f"trainer.save_freq={SAVE_FREQ}",
    ]


def start(world: Path, train: Path, save_dir: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-m", "verl.trainer.main", *run_args(world, train, save_dir)]
    with open(log, "a") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def read_jsonl(path: Path) -> dict[int, dict]:
    if not path.exists():
        return {}
    records = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line being written right now
                continue
            records[record["step"]] = record
    return records


def final_weights(save_dir: Path):
    from safetensors.torch import load_file

    return load_file(str(save_dir / f"global_step_{STEPS}" / "actor" / "model.safetensors"))


def compare(reference: Path, trial: Path) -> dict[str, object]:
    """Rows, metrics and final weights of `trial` against `reference`."""
    ref_rows, rows = read_jsonl(reference / "rows.jsonl"), read_jsonl(trial / "rows.jsonl")
    ref_metrics, metrics = read_jsonl(reference / "metrics.jsonl"), read_jsonl(trial / "metrics.jsonl")
    metric_diff, metric_keys_equal = 0.0, sorted(ref_metrics) == sorted(metrics)
    for step, ref in ref_metrics.items():
        got = metrics.get(step, {})
        keys = {k for k in ref if not k.startswith(TIME_DEPENDENT)}
        metric_keys_equal &= keys == {k for k in got if not k.startswith(TIME_DEPENDENT)}
        for key in keys & set(got):
            metric_diff = max(metric_diff, abs(float(ref[key]) - float(got[key])))
    ref_w, w = final_weights(reference), final_weights(trial)
    weight_diff = max((ref_w[name].float() - w[name].float()).abs().max().item() for name in ref_w)
    return {
        "rows_equal": {s: (r["rows"], r.get("dropped")) for s, r in ref_rows.items()}
        == {s: (r["rows"], r.get("dropped")) for s, r in rows.items()},
        "metric_keys_equal": metric_keys_equal,
        "metric_max_abs_diff": metric_diff,
        "weights_equal": sorted(ref_w) == sorted(w) and weight_diff == 0.0,
        "weight_max_abs_diff": weight_diff,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--world", type=Path, default=None, help="a built tiny world (default: build one)")
    parser.add_argument("--workdir", type=Path, default=None, help="where runs are written (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    sys.path.insert(0, str(ROOT))
    from verl.utils.cli_help import exit_if_no_arguments

    exit_if_no_arguments(parser)  # its defaults alone are ten trials of training runs, minutes each
    args = parser.parse_args()
    rng = random.Random(args.seed)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kill_trials_"))
    workdir.mkdir(parents=True, exist_ok=True)
    world = args.world
    if world is None:
        from verl.tiny_world import build_tiny_world

        world = workdir / "tiny_world"
        if not (world / "manifest.json").is_file():
            build_tiny_world(str(world))

    import pandas as pd

    train = workdir / "train.parquet"
    pd.read_parquet(world / "data/digit_sum/val.parquet").head(TRAIN_ROWS).to_parquet(train)

    reference = workdir / "reference"
    started = time.time()
    process = start(world, train, reference, workdir / "reference.log")
    first_step = None
    while process.poll() is None:
        if first_step is None and (reference / "metrics.jsonl").exists():
            first_step = time.time() - started
        time.sleep(0.05)
    total = time.time() - started
    if process.returncode != 0:
        print(f"the reference run failed (exit {process.returncode}); see {workdir / 'reference.log'}")
        return 1
    first_step = first_step or total / 2
    step_s = (total - first_step) / max(STEPS - 1, 1)
    print(f"reference: {STEPS} steps in {total:.1f} s (first step logged at {first_step:.1f} s); runs in {workdir}")
    print(
        "trial  signal   kill_at_s  checkpoint_at_kill  exit  resumes  rows_equal  metrics_equal  "
        "metric_max_diff  weights_equal  weight_max_diff"
    )

    failures = 0
    for trial in range(1, args.trials + 1):
        save = workdir / f"trial_{trial}"
        log = workdir / f"trial_{trial}.log"
        signum = rng.choice([signal.SIGKILL, signal.SIGTERM])
        # A moment in this run's own progress (its speed varies on a shared machine): a random point
        # of step k+1, k uniform in 0..STEPS-1, reached once step k's metrics are logged.
        after_step = rng.randrange(STEPS)
        into_step = rng.uniform(0.0, step_s)
        process = start(world, train, save, log)
        begun = time.time()
        while process.poll() is None and len(read_jsonl(save / "metrics.jsonl")) < after_step:
            time.sleep(0.02)
        if after_step == 0:  # the first step begins after loading: aim around its start
            into_step = rng.uniform(max(first_step - step_s, 0.0), first_step)
        time.sleep(into_step)
        kill_at = time.time() - begun
        checkpoints = sorted(int(p.name.split("_")[-1]) for p in save.glob("global_step_*"))
        if process.poll() is None:
            process.send_signal(signum)
        code = process.wait()
        resumes = 0
        while not (save / f"global_step_{STEPS}" / "trainer_state.json").exists() and resumes < 3:
            resumes += 1
            if start(world, train, save, log).wait() != 0:
                break
        if not (save / f"global_step_{STEPS}").exists():
            print(f"{trial:>5}  trial did not finish; see {log}")
            failures += 1
            continue
        result = compare(reference, save)
        same = result["rows_equal"] and result["metric_keys_equal"] and result["metric_max_abs_diff"] == 0.0
        failures += not (same and result["weights_equal"])
        print(
            f"{trial:>5}  {signal.Signals(signum).name:<7}  {kill_at:>9.1f}  "
            f"{(checkpoints[-1] if checkpoints else 'none')!s:>18}  {code:>4}  {resumes:>7}  "
            f"{result['rows_equal']!s:>10}  {same!s:>13}  {result['metric_max_abs_diff']:>15.3g}  "
            f"{result['weights_equal']!s:>13}  {result['weight_max_abs_diff']:>15.3g}",
            flush=True,
        )
    print(f"{args.trials - failures}/{args.trials} trials resumed to the uninterrupted run (rows, metrics, weights)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
