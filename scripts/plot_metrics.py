"""Summarise runs' metrics.jsonl and plot their reward curves to one PNG (the drawing lives in
verl/utils/plot_metrics.py, which every training run also uses to leave reward_curves.png beside
its metrics).

python scripts/plot_metrics.py RUN_DIR [RUN_DIR ...] --out curves.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from verl.utils.plot_metrics import CURVES_FILE, plot, read_metrics, summarise  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help=f"PNG path (default: RUN_DIR/{CURVES_FILE})")
    args = parser.parse_args()
    runs = {}
    for run_dir in args.run_dirs:
        try:
            rows = read_metrics(run_dir)
        except FileNotFoundError as error:
            raise SystemExit(str(error)) from None
        print(summarise(run_dir, rows))
        runs[run_dir.name] = rows
    out = args.out or args.run_dirs[0] / CURVES_FILE
    plot(runs, out)
    print(f"reward curves: {out}")


if __name__ == "__main__":
    main()
