"""A run's curves from its metrics.jsonl, drawn headless (matplotlib's Agg backend) to a PNG.

The file logger calls `write_curves` when a run finishes, so every run that logs to `file` leaves
`reward_curves.png` beside its `metrics.jsonl`; scripts/plot_metrics.py draws several runs together.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

CURVES_FILE = "reward_curves.png"
# (panel title, metric-name prefixes); a panel without any of its metrics is left out.
PANELS = (
    ("training rewards", ("reward/",)),
    ("validation rewards / accuracy", ("val/reward/", "gen/")),
    ("losses", ("train/loss", "val/loss", "actor/pg_loss", "actor/kl_loss")),
)
NOT_CURVES = ("gen/response_length",)


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The rows of `<run_dir>/metrics.jsonl` (a line torn by a crash is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def reward_keys(rows: list[dict[str, float]], prefix: str) -> list[str]:
    return sorted({k for row in rows for k in row if k.startswith(prefix) and k not in NOT_CURVES})


def summarise(run_dir: Path, rows: list[dict[str, float]]) -> str:
    """First and last value of each training and validation reward, one line each."""
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


def plot(runs: dict[str, list[dict[str, float]]], out: Path) -> list[str]:
    """Draw every run's curves into `out`, one panel per PANELS entry that has data; returns the
    panel titles drawn."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on training machines
    import matplotlib.pyplot as plt

    panels = []
    for title, prefixes in PANELS:
        series = []
        for name, rows in runs.items():
            for key in sorted({k for p in prefixes for k in reward_keys(rows, p)}):
                points = [(r["step"], r[key]) for r in rows if key in r]
                series.append((f"{name} {key}" if len(runs) > 1 else key, points))
        if series:
            panels.append((title, series))
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for label, points in series:
            ax.plot(*zip(*points), marker="o" if len(points) < 20 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return [title for title, _ in panels]


def write_curves(run_dir: str | Path) -> Path | None:
    """`<run_dir>/reward_curves.png` from its metrics.jsonl; None when there is nothing to draw."""
    run_dir = Path(run_dir)
    out = run_dir / CURVES_FILE
    return out if plot({run_dir.name: read_metrics(run_dir)}, out) else None
