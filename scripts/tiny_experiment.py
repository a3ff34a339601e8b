"""The tiny-world Vision-SR1 experiment: reward setups x seeds, equal budgets, from one cold start.

    python scripts/tiny_experiment.py --steps 30 --seeds 1 2 3 --out docs/results
    python scripts/tiny_experiment.py --lr 1e-3 --variants self_reward self_reward_gain \\
        self_reward_gain_consistency --report_name tiny_world_counterfactual_lr1e-3

Variants: (a) cot — Vision-R1 style `<think>` + `\\boxed{}` reward; (b) see_think — see-think format
without self-reward; (c) self_reward — see-think with the self-reward stage; (d) self_reward_decoupled
— (c) with per-component (decoupled) advantages; (e) self_reward_gain — (c) with the counterfactual
baseline: the visual reward is what the description adds over the question alone; (f)
self_reward_gain_consistency — (e) plus a reward for the answer agreeing with the description's.
Every model (the cold start and each trained one) is evaluated greedily on the held-out test split:
- answer accuracy with the variant's own prompt format;
- perception accuracy: with the see-think prompt, the description names both digits in order;
- description accuracy: the model answers text-only from its own description (the self-reward
  second pass) and the boxed answer is right;
- consistency: the see-think response's boxed answer equals the answer its own description leads to
  in that text-only pass (0 without a description), as the reward function defines it;
- prior accuracy: the same text-only pass asked with the question alone (the counterfactual
  baseline), i.e. what the question's answer prior gives without any image information.
Each metric is summarised per variant by its mean over seeds and a 95% t-interval (n - 1 degrees of
freedom; with 2 seeds t = 12.7, so such an interval is wide by construction).
Writes `<report_name>.md`, `.json` and `.png` into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "cot": {
        "format": "examples/format_prompt/cot.jinja",
        "reward": "examples/reward_function/cot.py:compute_score",
        "extra": [],
    },
    "see_think": {
        "format": "examples/format_prompt/see_think.jinja",
        "reward": "examples/reward_function/see_think.py:compute_score",
        "extra": [],
    },
    "self_reward": {
        "format": "examples/format_prompt/see_think.jinja",
        "reward": "examples/reward_function/see_think_self_reward.py:compute_score",
        "extra": [],
    },
    "self_reward_decoupled": {
        "format": "examples/format_prompt/see_think.jinja",
        "reward": "examples/reward_function/see_think_self_reward.py:compute_score",
        "extra": [
            "algorithm.advantage_mode=decoupled",
            "algorithm.decoupled_weights={accuracy: 0.9, format: 0.1, visual: 1.0}",
        ],
    },
    "self_reward_gain": {
        "format": "examples/format_prompt/see_think.jinja",
        "reward": "examples/reward_function/see_think_self_reward.py:compute_score",
        "extra": [
            "self_reward.counterfactual_baseline=true",
            "worker.reward.reward_function_kwargs={visual_reward: gain}",
        ],
    },
    # Consistency weight 0.5: below the accuracy weight (0.9), so a right answer that disagrees with
    # the description still outscores a wrong one that agrees with it (agreeing cannot be traded for
    # being right), yet of the size of the gain term (at most 1 - prior accuracy), so it is felt.
    "self_reward_gain_consistency": {
        "format": "examples/format_prompt/see_think.jinja",
        "reward": "examples/reward_function/see_think_self_reward.py:compute_score",
        "extra": [
            "self_reward.counterfactual_baseline=true",
            "worker.reward.reward_function_kwargs={visual_reward: gain, consistency_weight: 0.5}",
        ],
    },
}
# Two-sided 95% Student t quantiles by degrees of freedom (seeds - 1); beyond the table, 30's.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
T_975_LARGE = 2.042
SEE_THINK = "examples/format_prompt/see_think.jinja"
METRICS = ["answer_accuracy", "perception_accuracy", "description_accuracy", "consistency", "prior_accuracy"]


def names_both_digits(description: str | None, digits: list[int]) -> bool:
    if not description:
        return False
    found = [int(d) for d in re.findall(r"\d", description)]
    return found[:2] == list(digits)


def t_interval(values: list[float]) -> tuple[float, float, float] | None:
    """Mean and 95% t-interval of `values` (seeds as the sample); None with fewer than two."""
    if len(values) < 2:
        return None
    mean = statistics.mean(values)
    half = T_975.get(len(values) - 1, T_975_LARGE) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def evaluate(model_dir: str, world: Path, format_prompt: str, limit: int) -> dict[str, float]:
    """Greedy held-out metrics of one model (see the module docstring)."""
    import torch

    from verl.models.loading import load_model, load_tokenizer_and_processor
    from verl.protocol import SamplingParams
    from verl.trainer.config import SelfRewardConfig
    from verl.trainer.self_reward import SelfRewardStage
    from verl.utils.dataset import PromptDataset, PromptDatasetConfig, collate_prompts
    from verl.utils.grading import answers_accuracy, extract_boxed, grade_answer, leading_answer
    from verl.workers.rollout.hf_rollout import HFRollout

    tokenizer, processor = load_tokenizer_and_processor(model_dir)
    model = load_model(model_dir, torch.float32, "sdpa")
    engine = HFRollout(model, tokenizer, micro_batch_size=128)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=48)
    test = str(world / "data/digit_sum/test.parquet")

    def answers(prompt_file: str) -> tuple[list[str], PromptDataset]:
        ds = PromptDataset(test, tokenizer, processor, PromptDatasetConfig(format_prompt=prompt_file))
        texts = []
        for start in range(0, min(limit, len(ds)), 128):
            batch = collate_prompts(
                [ds[i] for i in range(start, min(start + 128, limit, len(ds)))], tokenizer.pad_token_id
            )
            out = engine.generate(batch, greedy)
            ids = out.batch["responses"].masked_fill(out.batch["response_mask"] == 0, tokenizer.pad_token_id)
            texts += tokenizer.batch_decode(ids, skip_special_tokens=True)
        return texts, ds

    own, ds = answers(format_prompt)
    truths = [ds[i]["ground_truth"] for i in range(len(own))]
    accuracy = statistics.mean(grade_answer(extract_boxed(r), t) for r, t in zip(own, truths))
    see_think, _ = answers(SEE_THINK) if format_prompt != SEE_THINK else (own, ds)
    stage = SelfRewardStage(
        SelfRewardConfig(
            enable="true",
            prompt_template="examples/format_prompt/perception_prompt.jinja",
            counterfactual_baseline=True,
        ),
        tokenizer,
        True,
    )
    questions = [ds[i]["question"] for i in range(len(see_think))]
    # Every test question is its own prompt: one greedy question-alone answer each.
    uids = [str(i) for i in range(len(see_think))]
    result = stage.run(
        see_think, questions, truths, lambda p: engine.generate(p, p.meta_info["sampling"]), greedy, uids
    )
    digits = [list(ds[i]["extra"]["digits"]) for i in range(len(see_think))]
    perception = statistics.mean(names_both_digits(d, g) for d, g in zip(result.descriptions, digits))
    description_accuracy = statistics.mean(
        bool(a) and grade_answer(extract_boxed(a[0]), t) for a, t in zip(result.answers, truths)
    )
    led_to = [leading_answer(a or []) for a in result.answers]
    consistency = statistics.mean(
        answer is not None and grade_answer(extract_boxed(r), answer) for r, answer in zip(see_think, led_to)
    )
    assert result.prior_answers is not None
    prior_accuracy = statistics.mean(answers_accuracy(a, t) for a, t in zip(result.prior_answers, truths))
    return {
        "answer_accuracy": accuracy,
        "perception_accuracy": perception,
        "description_accuracy": description_accuracy,
        "consistency": consistency,
        "prior_accuracy": prior_accuracy,
        "description_rate": result.metrics["self_reward/description_rate"],
    }


def train(
    variant: str, seed: int, steps: int, cold_start: str, world: Path, run_dir: Path, jobs: int, lr: float | None
) -> float | None:
    """Train one run and return its wall time; a run whose final checkpoint exists is not trained
    again (its recorded time is returned, or None when there is none)."""
    seconds_file = run_dir / "train_seconds.txt"
    if (run_dir / f"global_step_{steps}" / "trainer_state.json").is_file():
        print(f"{run_dir.name}: finished earlier; reusing its checkpoint", flush=True)
        return float(seconds_file.read_text()) if seconds_file.is_file() else None
    spec = VARIANTS[variant]
    args = [
        "-m",
        "verl.trainer.main",
        "config=examples/tiny_world/self_reward.yaml",
        f"data.train_files={world / 'data/digit_sum/train.parquet'}",
        f"data.val_files={world / 'data/digit_sum/val.parquet'}",
        f"data.format_prompt={spec['format']}",
        f"worker.reward.reward_function={spec['reward']}",
        f"worker.actor.model.model_path={cold_start}",
        f"trainer.save_checkpoint_path={run_dir}",
        f"trainer.max_steps={steps}",
        f"trainer.val_freq={max(steps // 3, 1)}",
        f"trainer.save_freq={steps}",
        f"trainer.seed={seed}",
        f"data.seed={seed}",
        f"worker.rollout.seed={seed}",
        "trainer.logger=[file]",
        *([f"worker.actor.optim.lr={lr}"] if lr is not None else []),
        *spec["extra"],
    ]
    start = time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    if jobs > 1:
        env["OMP_NUM_THREADS"] = "1"
    subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.time() - start
    seconds_file.write_text(f"{seconds:.1f}\n")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, default=ROOT / "tiny_world")
    parser.add_argument("--cold_start", default=None, help="default: <world>/cold_start/model")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1, help="training runs in parallel (one torch thread each)")
    parser.add_argument("--eval_limit", type=int, default=256, help="test questions evaluated")
    parser.add_argument("--lr", type=float, default=None, help="worker.actor.optim.lr (default: the YAML's)")
    parser.add_argument("--runs", type=Path, default=ROOT / "checkpoints/tiny_experiment")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results")
    parser.add_argument("--report_name", default="tiny_world_experiment", help="file stem of the .md/.json/.png")
    parser.add_argument(
        "--report_only", action="store_true", help="rewrite the .md and .png from the .json of an earlier run"
    )
    args = parser.parse_args()
    if args.report_only:
        write_report(json.loads((args.out / f"{args.report_name}.json").read_text()), args)
        return
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    cold_start = args.cold_start or str(args.world / "cold_start" / "model")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {"cold_start": {}}
    cold_by_format: dict[str, dict[str, float]] = {}  # variants sharing a prompt format share the cold start's
    for variant in args.variants:
        fmt = VARIANTS[variant]["format"]
        if fmt not in cold_by_format:
            cold_by_format[fmt] = evaluate(cold_start, args.world, fmt, args.eval_limit)
        results["cold_start"][variant] = cold_by_format[fmt]
    runs = [(variant, seed) for variant in args.variants for seed in args.seeds]
    # The lr is part of a run's name when given, so runs at different lrs never reuse each other.
    lr_tag = f"_lr{args.lr:g}" if args.lr is not None else ""

    def run_dir(variant: str, seed: int) -> Path:
        return args.runs / f"{variant}{lr_tag}_seed{seed}"

    def train_one(run: tuple[str, int]) -> float | None:
        variant, seed = run
        return train(variant, seed, args.steps, cold_start, args.world, run_dir(variant, seed), args.jobs, args.lr)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        seconds = dict(zip(runs, pool.map(train_one, runs)))
    for variant, seed in runs:
        model = str(run_dir(variant, seed) / f"global_step_{args.steps}" / "actor")
        metrics = evaluate(model, args.world, VARIANTS[variant]["format"], args.eval_limit)
        metrics["train_seconds"] = seconds[(variant, seed)]
        results.setdefault(variant, {})[seed] = metrics
        print(variant, seed, json.dumps(metrics), flush=True)
    results["summary"] = {
        variant: {key: t_interval([r[key] for r in results[variant].values()]) for key in METRICS}
        for variant in args.variants
    }
    (args.out / f"{args.report_name}.json").write_text(json.dumps(results, indent=2))
    write_report(results, args)


def write_report(results: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = METRICS
    command = (
        f"python scripts/tiny_experiment.py --steps {args.steps} --seeds {' '.join(map(str, args.seeds))}"
        f" --variants {' '.join(args.variants)}"
        + (f" --lr {args.lr:g}" if args.lr is not None else "")
        + f" --report_name {args.report_name}"
    )
    lr_text = f"lr {args.lr:g}" if args.lr is not None else "the YAML's lr"
    lines = [
        f"# Tiny-world experiment: {', '.join(args.variants)} ({lr_text})",
        "",
        f"Reproduce: `{command}`",
        f"(cold start: `bash train_examples/0-tiny_coldstart_sft.sh`). {args.steps} GRPO steps per run,",
        f"16 prompts x 8 samples, {lr_text}, seeds {args.seeds}; greedy evaluation on {args.eval_limit} held-out",
        "test images.",
        "",
        "| model | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    cold = results["cold_start"]
    for variant in args.variants:
        lines.append(f"| cold start ({variant} prompt) | " + " | ".join(f"{cold[variant][k]:.3f}" for k in keys) + " |")
    means = {}
    for variant in args.variants:
        runs = list(results[variant].values())
        means[variant] = {k: statistics.mean(r[k] for r in runs) for k in keys}
        cells = []
        for k in keys:
            interval = results["summary"][variant][k]
            cells.append(f"{means[variant][k]:.3f}" + (f" [{interval[1]:.3f}, {interval[2]:.3f}]" if interval else ""))
        lines.append(f"| {variant} (mean of {len(runs)}) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| run | " + " | ".join(k.replace("_", " ") for k in keys) + " | train s |",
        "|---|" + "---|" * (len(keys) + 1),
    ]
    for variant in args.variants:
        for seed, r in results[variant].items():
            seconds = r["train_seconds"]
            lines.append(
                f"| {variant} seed {seed} | "
                + " | ".join(f"{r[k]:.3f}" for k in keys)
                + f" | {'-' if seconds is None else f'{seconds:.0f}'} |"
            )
    if len(args.seeds) < 2:
        interval_note = "One seed: no interval."
    else:
        interval_note = f"Brackets: 95% t-interval over seeds (t with {len(args.seeds) - 1} degrees of freedom" + (
            "; with 2 seeds t = 12.7, so the interval is wide by construction)." if len(args.seeds) == 2 else ")."
        )
    lines += [
        "",
        interval_note,
        "",
        f"![results]({args.report_name}.png)",
    ]
    (args.out / f"{args.report_name}.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(11, 4))
    labels = ["cold start"] + list(args.variants)
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        values = [cold[args.variants[-1]][key]] + [means[v][key] for v in args.variants]
        # Error bars: the t-interval, clipped to [0, 1] (a metric's range) for drawing.
        errors = [[0.0], [0.0]]
        for v in args.variants:
            interval = results["summary"][v][key]
            errors[0].append(means[v][key] - max(0.0, interval[1]) if interval else 0.0)
            errors[1].append(min(1.0, interval[2]) - means[v][key] if interval else 0.0)
        positions = [x + i * width for x in range(len(labels))]
        ax.bar(positions, values, width, yerr=errors, capsize=2, label=key.replace("_", " "))
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels, rotation=15)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("held-out test split, greedy; bars: mean over seeds, whiskers: 95% t-interval")
    fig.tight_layout()
    fig.savefig(args.out / f"{args.report_name}.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
