"""The tiny-world Vision-SR1 experiment: reward setups x seeds, equal budgets, from one cold start.

    python scripts/tiny_experiment.py --jobs 2 --variants cot see_think self_reward self_reward_decoupled
    TASK=digit_mix bash train_examples/0-tiny_coldstart_sft.sh   # digit_mix's cold start, then:
    python scripts/tiny_experiment.py --task digit_mix --jobs 2 \\
        --variants cot see_think self_reward self_reward_decoupled --report_name tiny_world_guessing
    python scripts/tiny_experiment.py --steps 30 --seeds 1 2 3 --lr 1e-3 --variants self_reward self_reward_gain \\
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
  baseline), i.e. what the question's answer prior gives without any image information;
- right answer, wrong description: the share of test rows whose answer is right while the
  see-think description does not name both digits (a right answer the model did not see).
With `--task digit_mix` (the digit_sum images, about half asked as "...: 7 or 12?", where a blind
guess is right half the time) training and evaluation use digit_mix, every metric is also
reported per kind of question (`sum_...`, `choice_...`), and the cold start is digit_mix's own
(`TASK=digit_mix bash train_examples/0-tiny_coldstart_sft.sh`: its see-think examples are asked
both ways, so it describes the image on choice questions too).
Variants are compared with `--baseline` seed by seed (same seed = same first rollout and data
order): the mean paired difference and its 95% t-interval.
Each metric is summarised per variant by its mean over seeds and a 95% t-interval (n - 1 degrees of
freedom; with 2 seeds t = 12.7, so such an interval is wide by construction).
Writes `<report_name>.md`, `.json`, `.png` (end points) and `_curves.png` (validation curves) into --out.
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
METRICS = [
    "answer_accuracy",
    "perception_accuracy",
    "description_accuracy",
    "consistency",
    "prior_accuracy",
    "right_answer_wrong_description",
]
KINDS = ("sum", "choice")
# The cold start of each task (TASK=... bash train_examples/0-tiny_coldstart_sft.sh): digit_mix's also saw
# see-think examples asked as choice questions.
COLD_START_FOLDERS = {"digit_sum": "cold_start", "digit_mix": "cold_start_digit_mix"}
KIND_METRICS = ["answer_accuracy", "perception_accuracy", "prior_accuracy", "right_answer_wrong_description"]
CURVE_KEYS = ("val/reward/accuracy", "val/reward/description_accuracy")


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


def metric_keys(results: dict, variants: list[str]) -> list[str]:
    """METRICS, then the per-kind metrics (digit_mix), each where the runs have it (older reports lack some)."""
    first = next(iter(results[variants[0]].values()))
    return [k for k in METRICS + [f"{kind}_{m}" for kind in KINDS for m in KIND_METRICS] if k in first]


def val_curve(run_dir: Path) -> dict[str, dict[str, float]]:
    """The run's validation metrics (CURVE_KEYS) by step, from its metrics.jsonl."""
    curve: dict[str, dict[str, float]] = {}
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        return curve
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        values = {k: record[k] for k in CURVE_KEYS if k in record}
        if values:
            curve.setdefault(str(record["step"]), {}).update(values)
    return curve


def evaluate(model_dir: str, world: Path, format_prompt: str, limit: int, task: str = "digit_sum") -> dict[str, float]:
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
    test = str(world / "data" / task / "test.parquet")

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
    right = [grade_answer(extract_boxed(r), t) for r, t in zip(own, truths)]
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
    seen = [names_both_digits(d, g) for d, g in zip(result.descriptions, digits)]
    led_to = [leading_answer(a or []) for a in result.answers]
    assert result.prior_answers is not None
    per_row = {
        "answer_accuracy": right,
        "perception_accuracy": seen,
        "description_accuracy": [
            bool(a) and grade_answer(extract_boxed(a[0]), t) for a, t in zip(result.answers, truths)
        ],
        "consistency": [a is not None and grade_answer(extract_boxed(r), a) for r, a in zip(see_think, led_to)],
        "prior_accuracy": [answers_accuracy(a, t) for a, t in zip(result.prior_answers, truths)],
        "right_answer_wrong_description": [r and not v for r, v in zip(right, seen)],
    }
    metrics = {key: statistics.mean(map(float, values)) for key, values in per_row.items()}
    metrics["description_rate"] = result.metrics["self_reward/description_rate"]
    kinds = [ds[i]["extra"].get("kind") for i in range(len(see_think))]
    for kind in KINDS if "choice" in kinds else ():
        rows = [i for i, k in enumerate(kinds) if k == kind]
        for key in KIND_METRICS:
            metrics[f"{kind}_{key}"] = statistics.mean(float(per_row[key][i]) for i in rows)
    return metrics


def train(
    variant: str,
    seed: int,
    steps: int,
    cold_start: str,
    world: Path,
    run_dir: Path,
    jobs: int,
    lr: float | None,
    task: str = "digit_sum",
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
        f"data.train_files={world / 'data' / task / 'train.parquet'}",
        f"data.val_files={world / 'data' / task / 'val.parquet'}",
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
    from verl.utils.cli_help import exit_if_no_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, default=ROOT / "tiny_world")
    parser.add_argument(
        "--cold_start",
        default=None,
        help="default: <world>/cold_start/model, with --task digit_mix <world>/cold_start_digit_mix/model "
        "(made by `TASK=digit_mix bash train_examples/0-tiny_coldstart_sft.sh`)",
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1, help="training runs in parallel (one torch thread each)")
    parser.add_argument("--eval_limit", type=int, default=256, help="test questions evaluated")
    parser.add_argument("--lr", type=float, default=None, help="worker.actor.optim.lr (default: the YAML's)")
    parser.add_argument(
        "--task", choices=("digit_sum", "digit_mix"), default="digit_sum", help="dataset under <world>/data"
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="variant the others are compared with, seed by seed (default: see_think if run)",
    )
    parser.add_argument("--runs", type=Path, default=ROOT / "checkpoints/tiny_experiment")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results")
    parser.add_argument("--report_name", default="tiny_world_experiment", help="file stem of the .md/.json/.png")
    parser.add_argument(
        "--report_only", action="store_true", help="rewrite the .md and .png from the .json of an earlier run"
    )
    # Its defaults alone are hours of training that end by rewriting docs/results/tiny_world_experiment.*.
    exit_if_no_arguments(parser)
    args = parser.parse_args()
    if args.report_only:
        write_report(json.loads((args.out / f"{args.report_name}.json").read_text()), args)
        return
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if args.baseline is not None and args.baseline not in args.variants:
        parser.error(f"--baseline {args.baseline} is not among --variants {args.variants}")
    if not (args.world / "data" / args.task / "train.parquet").is_file():
        parser.error(f"{args.world / 'data' / args.task} has no train.parquet; rebuild with scripts/make_tiny_world.py")
    if args.jobs > 1:
        # Evaluations run in the pool's threads; one torch thread each keeps them from fighting.
        import torch

        torch.set_num_threads(1)
    cold_start = args.cold_start or str(args.world / COLD_START_FOLDERS[args.task] / "model")
    if not Path(cold_start, "config.json").is_file():
        parser.error(f"no cold-start model at {cold_start}; see --cold_start")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {"cold_start": {}}
    cold_by_format: dict[str, dict[str, float]] = {}  # variants sharing a prompt format share the cold start's
    for variant in args.variants:
        fmt = VARIANTS[variant]["format"]
        if fmt not in cold_by_format:
            cold_by_format[fmt] = evaluate(cold_start, args.world, fmt, args.eval_limit, args.task)
        results["cold_start"][variant] = cold_by_format[fmt]
    runs = [(variant, seed) for variant in args.variants for seed in args.seeds]
    # The lr is part of a run's name when given, so runs at different lrs never reuse each other.
    lr_tag = f"_lr{args.lr:g}" if args.lr is not None else ""
    task_tag = f"_{args.task}" if args.task != "digit_sum" else ""

    def run_dir(variant: str, seed: int) -> Path:
        return args.runs / f"{variant}{task_tag}{lr_tag}_seed{seed}"

    def train_and_evaluate(run: tuple[str, int]) -> dict:
        variant, seed = run
        folder = run_dir(variant, seed)
        seconds = train(variant, seed, args.steps, cold_start, args.world, folder, args.jobs, args.lr, args.task)
        model = str(folder / f"global_step_{args.steps}" / "actor")
        metrics = evaluate(model, args.world, VARIANTS[variant]["format"], args.eval_limit, args.task)
        print(variant, seed, json.dumps(metrics), flush=True)
        return {**metrics, "train_seconds": seconds, "curve": val_curve(folder)}

    # Each pool thread trains a run (a subprocess) and then evaluates it, so evaluations overlap training.
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for (variant, seed), metrics in zip(runs, pool.map(train_and_evaluate, runs)):
            results.setdefault(variant, {})[seed] = metrics
    keys = metric_keys(results, args.variants)
    results["summary"] = {
        variant: {key: t_interval([r[key] for r in results[variant].values()]) for key in keys}
        for variant in args.variants
    }
    (args.out / f"{args.report_name}.json").write_text(json.dumps(results, indent=2))
    write_report(results, args)


def paired_lines(results: dict, args: argparse.Namespace, keys: list[str]) -> list[str]:
    """Markdown: each variant minus the baseline, seed by seed: mean difference, 95% t-interval, wins."""
    baseline = args.baseline or ("see_think" if "see_think" in args.variants else args.variants[0])
    others = [v for v in args.variants if v != baseline]
    if not others or len(args.seeds) < 2:
        return []
    lines = [
        "",
        f"Paired differences against `{baseline}` (same seed: same data order and first rollout), mean over"
        " seeds with the 95% t-interval of the difference, and how many seeds the variant is ahead:",
        "",
        "| variant - " + baseline + " | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    base = {str(seed): r for seed, r in results[baseline].items()}
    for variant in others:
        cells = []
        for key in keys:
            diffs = [r[key] - base[str(seed)][key] for seed, r in results[variant].items() if str(seed) in base]
            interval = t_interval(diffs)
            ahead = sum(d > 0 for d in diffs)
            cell = f"{statistics.mean(diffs):+.3f}"
            cells.append(
                cell + (f" [{interval[1]:+.3f}, {interval[2]:+.3f}]" if interval else "") + f" {ahead}/{len(diffs)}"
            )
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def plot_curves(results: dict, args: argparse.Namespace, path: Path) -> None:
    """Validation accuracy and description accuracy by step: one line per run, the seeds' mean bold."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_KEYS), figsize=(11, 4), sharey=True)
    for ax, key in zip(axes, CURVE_KEYS):
        for index, variant in enumerate(args.variants):
            color = f"C{index}"
            by_step: dict[int, list[float]] = {}
            for run in results[variant].values():
                points = sorted(
                    (int(step), values[key]) for step, values in run.get("curve", {}).items() if key in values
                )
                for step, value in points:
                    by_step.setdefault(step, []).append(value)
                if points:
                    ax.plot(*zip(*points), color=color, alpha=0.25, linewidth=0.8)
            if by_step:
                steps = sorted(by_step)
                ax.plot(steps, [statistics.mean(by_step[s]) for s in steps], color=color, linewidth=2, label=variant)
        ax.set_title(key)
        ax.set_xlabel("GRPO step")
        ax.set_ylim(0, 1)
    if axes[0].get_legend_handles_labels()[0]:  # reports of earlier runs carry no curves
        axes[0].legend(fontsize=8)
    fig.suptitle("validation split, greedy: thin lines are runs, bold lines the mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = metric_keys(results, args.variants)
    command = (
        f"python scripts/tiny_experiment.py --task {args.task} --steps {args.steps}"
        f" --seeds {' '.join(map(str, args.seeds))} --variants {' '.join(args.variants)}"
        + (f" --lr {args.lr:g}" if args.lr is not None else "")
        + f" --report_name {args.report_name}"
    )
    lr_text = f"lr {args.lr:g}" if args.lr is not None else "the YAML's lr"
    lines = [
        f"# Tiny-world experiment on {args.task}: {', '.join(args.variants)} ({lr_text})",
        "",
        f"Reproduce: `{command}`",
        f"(cold start: `{'TASK=digit_mix ' if args.task == 'digit_mix' else ''}bash train_examples/0-tiny_coldstart_sft.sh`)."
        f" {args.steps} GRPO steps per run,",
        f"16 prompts x 8 samples, {lr_text}, seeds {args.seeds}; greedy evaluation on {args.eval_limit} held-out",
        f"test images of {args.task}.",
        "",
        "| model | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    cold = results["cold_start"]
    for variant in args.variants:
        lines.append(
            f"| cold start ({variant} prompt) | "
            + " | ".join(f"{cold[variant].get(k, float('nan')):.3f}" for k in keys)
            + " |"
        )
    means = {}
    for variant in args.variants:
        runs = list(results[variant].values())
        means[variant] = {k: statistics.mean(r[k] for r in runs) for k in keys}
        cells = []
        for k in keys:
            interval = results["summary"][variant][k]
            cells.append(f"{means[variant][k]:.3f}" + (f" [{interval[1]:.3f}, {interval[2]:.3f}]" if interval else ""))
        lines.append(f"| {variant} (mean of {len(runs)}) | " + " | ".join(cells) + " |")
    lines += paired_lines(results, args, keys)
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
        "",
        f"![validation curves]({args.report_name}_curves.png)",
    ]
    (args.out / f"{args.report_name}.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(max(11, len(keys) * 1.3), 4))
    labels = ["cold start"] + list(args.variants)
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        values = [cold[args.variants[-1]].get(key, 0.0)] + [means[v][key] for v in args.variants]
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
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("held-out test split, greedy; bars: mean over seeds, whiskers: 95% t-interval")
    fig.tight_layout()
    fig.savefig(args.out / f"{args.report_name}.png", dpi=120)
    plt.close(fig)
    plot_curves(results, args, args.out / f"{args.report_name}_curves.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
