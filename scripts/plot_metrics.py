"""Summarise a run's metrics.jsonl and plot its reward curves to a PNG.

python scripts/plot_metrics.py RUN_DIR [RUN_DIR ...] --out curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"no metrics.jsonl in {run_dir}")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def reward_keys(rows: list[dict[str, float]], prefix: str) -> list[str]:
    keys = {k for row in rows for k in row if k.startswith(prefix)}
    return sorted(keys)


def summarise(run_dir: Path, rows: list[dict[str, float]]) -> str:
    lines = [f"run {run_dir}: {len(rows)} logged steps"]
    train = [r for r in rows if "reward/overall" in r]
    for key in reward_keys(train, "reward/"):
        first, last = train[0].get(key), train[-1].get(key)
        lines.append(f"  {key:32s} first {first:.3f}  last {last:.3f}")
    val = [r for r in rows if "val/reward/overall" in r]
    for key in reward_keys(val, "val/"):
        lines.append(
            f"  {key:32s} first {val[0][key]:.3f}  last {val[-1][key]:.3f}  (steps {val[0]['step']}..{val[-1]['step']})"
        )
    return "\n".join(lines)


def plot(runs: dict[str, list[dict[str, float]]], out: Path) -> None:
    fig, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rows in runs.items():
        for key in reward_keys(rows, "reward/"):
            points = [(r["step"], r[key]) for r in rows if key in r]
            train_ax.plot(*zip(*points), label=f"{name} {key}")
        for key in reward_keys(rows, "val/reward/"):
            points = [(r["step"], r[key]) for r in rows if key in r]
            val_ax.plot(*zip(*points), marker="o", label=f"{name} {key}")
    for ax, title in ((train_ax, "training rewards"), (val_ax, "validation rewards")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN_DIR/reward_curves.png)")
    args = parser.parse_args()
    runs = {}
    for run_dir in args.run_dirs:
        rows = read_metrics(run_dir)
        print(summarise(run_dir, rows))
        runs[run_dir.name] = rows
    out = args.out or args.run_dirs[0] / "reward_curves.png"
    plot(runs, out)
    print(f"reward curves: {out}")


if __name__ == "__main__":
    main()
