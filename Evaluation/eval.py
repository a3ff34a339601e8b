"""Accuracy tables and a chart from graded folders: rules only and rules + judge side by side.

    cd Evaluation
    python eval.py --graded_dir ./Raw-Outputs/LLM-Eval-out/<model_a> --graded_dir ... --out_dir ./Raw-Outputs/Tables

Each graded folder is one model (named after the folder). Writes `results.md`, `results.csv` and
`results.png` into --out_dir and prints the markdown.
"""

import argparse
import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
from schema import GENERATION_SUMMARY_FILE, JUDGE_CACHE_FILE, load_graded  # noqa: E402

# Aggregate name -> member benchmarks (spelled as the generation step names the files). Its
# accuracy pools the members' rows, i.e. weights each member by its row count. In the overall
# mean the aggregate replaces its members.
WEIGHTED_AGGREGATES: dict[str, tuple[str, ...]] = {
    "MMMU-Pro (weighted)": ("mmmu-pro-4", "mmmu-pro-10", "mmmu-pro-vision"),
}
OVERALL = "Overall (mean)"
CSV_COLUMNS = (
    "model",
    "benchmark",
    "n",
    "rule_accuracy",
    "rule_judge_accuracy",
    "unparsed",
    "errors",
    "too_long",
)


@dataclass
class Counts:
    """Row counts of one benchmark (or of several pooled)."""

    n: int = 0
    rule_correct: int = 0
    final_correct: int = 0
    unparsed: int = 0
    errors: int = 0
    too_long: int = 0
    """Questions not answered (prompt over the generation's max_prompt_length): not in n, not scored."""

    def add(self, other: "Counts") -> None:
        self.n += other.n
        self.rule_correct += other.rule_correct
        self.final_correct += other.final_correct
        self.unparsed += other.unparsed
        self.errors += other.errors
        self.too_long += other.too_long


@dataclass(frozen=True)
class TableRow:
    """One line of a model's table; accuracies in percent."""

    name: str
    n: int
    rule_accuracy: float
    final_accuracy: float
    unparsed: int
    errors: int
    too_long: int = 0

    @classmethod
    def from_counts(cls, name: str, counts: Counts) -> "TableRow":
        return cls(
            name,
            counts.n,
            100.0 * counts.rule_correct / counts.n,
            100.0 * counts.final_correct / counts.n,
            counts.unparsed,
            counts.errors,
            counts.too_long,
        )


def count_by_benchmark(rows: list[dict[str, Any]]) -> dict[str, Counts]:
    """Counts per `benchmark` field of graded rows."""
    counts: dict[str, Counts] = {}
    for row in rows:
        verdict = row["judge_verdict"]
        counts.setdefault(row["benchmark"], Counts()).add(
            Counts(
                1,
                int(row["rule_correct"]),
                int(row["final_correct"]),
                int(verdict == "unparsed"),
                int(verdict == "error"),
            )
        )
    return counts


def load_model_counts(graded_dir: Path) -> dict[str, Counts]:
    """Counts per benchmark over every graded `<benchmark>.jsonl` of one model's folder."""
    paths = sorted(path for path in Path(graded_dir).glob("*.jsonl") if path.name != JUDGE_CACHE_FILE)
    if not paths:
        raise FileNotFoundError(f"no graded <benchmark>.jsonl files in {graded_dir} (run LLM_eval.py first)")
    counts = count_by_benchmark([row for path in paths for row in load_graded(path)])
    summary_path = Path(graded_dir) / GENERATION_SUMMARY_FILE
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        for name, entry in summary.items():
            if name in counts:
                counts[name].too_long = int(entry.get("too_long", 0))
    return counts


def table_rows(counts: dict[str, Counts]) -> list[TableRow]:
    """Benchmarks (sorted), then the weighted aggregates present, then the overall mean.

    The overall row averages benchmark accuracies with equal weight, each aggregate standing
    in for its members; its n, unparsed and errors are totals over all rows.
    """
    rows = [TableRow.from_counts(name, counts[name]) for name in sorted(counts)]
    averaged = [row for row in rows if not any(row.name in members for members in WEIGHTED_AGGREGATES.values())]
    for name, members in WEIGHTED_AGGREGATES.items():
        pooled = Counts()
        for member in members:
            if member in counts:
                pooled.add(counts[member])
        if pooled.n:
            aggregate = TableRow.from_counts(name, pooled)
            rows.append(aggregate)
            averaged.append(aggregate)
    total = Counts()
    for benchmark_counts in counts.values():
        total.add(benchmark_counts)
    rows.append(
        TableRow(
            OVERALL,
            total.n,
            sum(row.rule_accuracy for row in averaged) / len(averaged),
            sum(row.final_accuracy for row in averaged) / len(averaged),
            total.unparsed,
            total.errors,
            total.too_long,
        )
    )
    return rows


def render_markdown(tables: dict[str, list[TableRow]]) -> str:
    """One table per model and, for several models, a comparison of rules + judge accuracy."""
    lines = [
        "# Accuracy (%)",
        "",
        "rules: rule-based grading only. rules + judge: a row is also correct when the judge said CORRECT.",
        "unparsed / errors: judge replies that were not a verdict / judge requests that failed (both count as wrong).",
        "too long: questions not answered because their prompt exceeded the generation's max_prompt_length "
        "(not in n; accuracy is over the n answered).",
    ]
    for model, rows in tables.items():
        lines += ["", f"## {model}", "", "| benchmark | n | rules | rules + judge | unparsed | errors | too long |"]
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for row in rows:
            lines.append(
                f"| {row.name} | {row.n} | {row.rule_accuracy:.1f} | {row.final_accuracy:.1f} | {row.unparsed} | {row.errors} | {row.too_long} |"
            )
    if len(tables) > 1:
        names = _row_names(tables)
        lines += ["", "## Comparison (rules + judge)", "", "| benchmark | " + " | ".join(tables) + " |"]
        lines.append("|---|" + "---:|" * len(tables))
        for name in names:
            cells = []
            for rows in tables.values():
                row = next((row for row in rows if row.name == name), None)
                cells.append("-" if row is None else f"{row.final_accuracy:.1f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(tables: dict[str, list[TableRow]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        for model, rows in tables.items():
            for row in rows:
                writer.writerow(
                    [
                        model,
                        row.name,
                        row.n,
                        f"{row.rule_accuracy:.2f}",
                        f"{row.final_accuracy:.2f}",
                        row.unparsed,
                        row.errors,
                        row.too_long,
                    ]
                )


def _row_names(tables: dict[str, list[TableRow]]) -> list[str]:
    """Every row name across models, in table order (benchmarks sorted, then aggregates, overall)."""
    benchmarks = sorted({row.name for rows in tables.values() for row in rows} - {*WEIGHTED_AGGREGATES, OVERALL})
    aggregates = [
        name for name in WEIGHTED_AGGREGATES if any(row.name == name for rows in tables.values() for row in rows)
    ]
    return benchmarks + aggregates + [OVERALL]


def plot_comparison(tables: dict[str, list[TableRow]], path: Path) -> None:
    """Grouped bars: rules + judge accuracy per benchmark, one bar per model; a tick marks rules only."""
    names = _row_names(tables)
    width = 0.8 / len(tables)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(names) * max(1, len(tables) / 2)), 4.5))
    for index, (model, rows) in enumerate(tables.items()):
        by_name = {row.name: row for row in rows}
        positions = [position + (index - (len(tables) - 1) / 2) * width for position in range(len(names))]
        final = [by_name[name].final_accuracy if name in by_name else math.nan for name in names]
        rule = [by_name[name].rule_accuracy if name in by_name else math.nan for name in names]
        axes.bar(positions, final, width, label=model)
        axes.scatter(positions, rule, marker="_", color="black", s=120, zorder=3)
    axes.scatter([], [], marker="_", color="black", label="rules only")
    axes.set_xticks(range(len(names)), names, rotation=35, ha="right")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_title("Accuracy per benchmark (bars: rules + judge)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Accuracy tables (rules only and rules + judge) from graded folders.")
    parser.add_argument(
        "--graded_dir",
        "--llm_eval_dir",
        "--mcq_dir",
        dest="graded_dirs",
        type=Path,
        action="append",
        required=True,
        help="a model's folder of graded <benchmark>.jsonl files (from LLM_eval.py); repeat for each model. "
        "The model is named after the folder. --llm_eval_dir and --mcq_dir are other names for it.",
    )
    parser.add_argument("--out_dir", type=Path, default=Path("Raw-Outputs/Tables"), help="default: %(default)s")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    graded_dirs = list(dict.fromkeys(path.resolve() for path in args.graded_dirs))  # the same folder twice counts once
    names = [path.name for path in graded_dirs]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        print(
            f"error: several graded folders are named {duplicated}; models are named after their folder",
            file=sys.stderr,
        )
        return 1
    try:
        tables = {path.name: table_rows(load_model_counts(path)) for path in graded_dirs}
    except (OSError, ValueError) as error:  # missing folders, rows that are not graded
        print(f"error: {error}", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(tables)
    (args.out_dir / "results.md").write_text(markdown, encoding="utf-8")
    write_csv(tables, args.out_dir / "results.csv")
    plot_comparison(tables, args.out_dir / "results.png")
    print(markdown)
    print(f"wrote results.md, results.csv and results.png to {args.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
