"""Convert the original Vision-SR1 release's evaluation outputs into this folder's formats (schema.py).

    cd Evaluation
    python convert_original_outputs.py --original_dir ./Raw-Outputs --references ./references \\
        --output_dir ./Raw-Outputs-converted
    EVAL_OUT_DIR=./Raw-Outputs-converted/LLM-Eval-out ./get_eval_result.sh

The original layout (what `download_precomputed_evaluation_files.py` fetches):

    <original_dir>/<model>/<dataset>.jsonl               generations: dataset_index, prompt, response
    <original_dir>/LLM-Eval-out/<model>/<dataset>.jsonl  the same rows judged: + gold_answer,
                                                         accuracy_output, accuracy_judgment

A row belongs to row `dataset_index` (its line number when absent) of the test split of the
dataset it was generated from, `zli12321/<dataset>` on the Hugging Face Hub: columns `answer`,
`problem` and, for the MLLM_test collection, `file_name` (the benchmark of each row).
`--references` names where those are: a folder of `<dataset>.parquet` / `.jsonl` / `.json`
files with these columns, or `hf:OWNER` to read `OWNER/<dataset>` from the Hub (network needed).
Without references, rows need their own `gold_answer` and are filed under their dataset's name.

Writes, per model, generation rows to `<output_dir>/<model>/<benchmark>.jsonl` (regrade them with
LLM_eval.py and any judge) and graded rows to `<output_dir>/LLM-Eval-out/<model>/<benchmark>.jsonl`:
graded by rule_grading.py, with the original judge's verdict kept for free-form rows the rules
mark wrong (a verdict other than correct/incorrect becomes `unparsed`); rows the original did not
judge have the verdict `skipped`.
"""

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from rule_grading import rule_grade
from schema import is_multiple_choice, load_generations, load_graded

from verl.utils.cli_help import exit_if_no_arguments

JUDGED_DIR = "LLM-Eval-out"
# Dataset files and MLLM_test `file_name`s whose names differ from the benchmark names used here
# (eval.py pools mmmu-pro-4/10/vision into its weighted MMMU-Pro, as the original did).
BENCHMARK_NAMES = {"mmmu-pro": "mmmu-pro-4", "mmmu_pro_10options": "mmmu-pro-10"}
# The datasets the original graded by string matching only (never sent to its judge).
MULTIPLE_CHOICE_DATASETS = frozenset({"mmmu_pro_10options", "mmmu-pro-vision", "MMMU", "visnumbench", "hallusionbench"})
_CHOICE_LETTER = re.compile(r"^\s*\(?([A-Z])\)?\s*$")
REFERENCE_SUFFIXES = (".parquet", ".jsonl", ".json")
REFERENCE_COLUMNS = ("answer", "problem", "file_name")


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file (and line) at fault."""


def read_original_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of one original jsonl file, each checked for the fields conversion needs."""
    rows = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConversionError(f"{where}: not valid JSON ({error})") from error
            if not isinstance(row, dict):
                raise ConversionError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
            if not isinstance(row.get("response"), str):
                raise ConversionError(f"{where}: field 'response' must be a string, got {row.get('response')!r}")
            index = row.get("dataset_index")
            if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
                raise ConversionError(f"{where}: field 'dataset_index' must be an integer >= 0, got {index!r}")
            for name in ("gold_answer", "accuracy_judgment", "prompt"):
                if name in row and not isinstance(row[name], str):
                    raise ConversionError(f"{where}: field {name!r} must be a string, got {row[name]!r}")
            rows.append((line_number, row))
    return rows


def load_reference(references: str | None, dataset: str) -> tuple[list[dict[str, Any]], str] | None:
    """The rows (answer, problem, file_name where present) of the dataset a file was generated from,
    and where they came from; None when `references` has nothing for it."""
    if references is None:
        return None
    if references.startswith("hf:"):
        repo_id = f"{references[3:]}/{dataset}"
        try:
            from datasets import load_dataset, load_dataset_builder

            # Read only the columns needed, not the images.
            present = load_dataset_builder(repo_id).info.features or {}
            columns = [name for name in REFERENCE_COLUMNS if name in present] or None
            table = load_dataset(repo_id, split="test", columns=columns)
        except Exception as error:  # offline, unknown repository: the same advice either way
            raise ConversionError(
                f"{repo_id}: cannot read the reference dataset from the Hub ({type(error).__name__}: {error}); "
                "pass --references with a folder of local files instead"
            ) from error
        return table.select_columns([c for c in REFERENCE_COLUMNS if c in table.column_names]).to_list(), repo_id
    folder = Path(references)
    path = next(
        (folder / f"{dataset}{suffix}" for suffix in REFERENCE_SUFFIXES if (folder / f"{dataset}{suffix}").is_file()),
        None,
    )
    if path is None:
        return None
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            present = pq.read_schema(path).names
            rows = pq.read_table(path, columns=[c for c in REFERENCE_COLUMNS if c in present]).to_pylist()
        elif path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path}: unreadable reference file ({error})") from error
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ConversionError(f"{path}: a reference file must hold a list of objects (one per dataset row)")
    return rows, str(path)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def convert_rows(
    path: Path, dataset: str, reference: tuple[list[dict[str, Any]], str] | None
) -> list[tuple[dict[str, Any], str | None]]:
    """(generation row of schema.py, the original judge's reply or None) for each row of one original file."""
    converted = []
    seen: dict[int, int] = {}
    for position, (line_number, row) in enumerate(read_original_rows(path)):
        where = f"{path}:{line_number}"
        index = row.get("dataset_index", position)
        if index in seen:
            raise ConversionError(f"{where}: dataset_index {index} already used on line {seen[index]}")
        seen[index] = line_number
        truth_row: dict[str, Any] = {}
        if reference is not None:
            reference_rows, source = reference
            if index >= len(reference_rows):
                raise ConversionError(
                    f"{where}: dataset_index {index} is beyond the {len(reference_rows)} rows of {source}"
                )
            truth_row = reference_rows[index]
            if truth_row.get("answer") is None:
                raise ConversionError(f"{source}: row {index} has no 'answer' (needed by {where})")
        ground_truth = row.get("gold_answer", truth_row.get("answer"))
        if ground_truth is None:
            raise ConversionError(
                f"{where}: no 'gold_answer' in the row and no reference rows for {dataset!r}; "
                "pass --references (a folder with the dataset's file, or hf:OWNER)"
            )
        benchmark = str(truth_row.get("file_name") or dataset)
        ground_truth = _text(ground_truth).strip()
        multiple_choice = dataset in MULTIPLE_CHOICE_DATASETS and _CHOICE_LETTER.match(ground_truth) is not None
        generation = {
            "id": index,
            "prompt": _text(truth_row.get("problem", row.get("prompt", ""))),
            "response": row["response"],
            "ground_truth": ground_truth,
            "benchmark": BENCHMARK_NAMES.get(benchmark, benchmark),
            "question_type": "multiple_choice" if multiple_choice else "free_form",
        }
        converted.append((generation, row.get("accuracy_judgment")))
    return converted


def original_verdict(judgment: str | None) -> str:
    """The original judge's reply as a verdict of schema.JUDGE_VERDICTS."""
    if judgment is None:
        return "skipped"
    normalized = judgment.strip().strip(".*").strip().lower()
    return normalized if normalized in ("correct", "incorrect") else "unparsed"


def grade(generation: dict[str, Any], judgment: str | None, where: str) -> dict[str, Any]:
    """The graded row: our rules, then the original judge's verdict where our pipeline asks a judge."""
    try:
        rule_correct, rule_answer = rule_grade(generation)
    except ValueError as error:
        raise ConversionError(f"{where}: {error}") from error
    asks_judge = not rule_correct and not is_multiple_choice(generation)
    verdict = original_verdict(judgment) if asks_judge else "skipped"
    return {
        **generation,
        "rule_correct": rule_correct,
        "rule_answer": rule_answer,
        "judge_verdict": verdict,
        "final_correct": rule_correct or verdict == "correct",
    }


def model_files(original_dir: Path) -> dict[str, dict[str, Path]]:
    """model -> dataset -> the file to convert (the judged one when both exist)."""
    models: dict[str, dict[str, Path]] = {}
    for base in (original_dir, original_dir / JUDGED_DIR):  # judged files override generation files
        if not base.is_dir():
            continue
        for folder in sorted(p for p in base.iterdir() if p.is_dir() and p.name != JUDGED_DIR):
            for path in sorted(folder.glob("*.jsonl")):
                models.setdefault(folder.name, {})[path.stem] = path
    return models


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def convert(
    original_dir: Path,
    output_dir: Path,
    references: str | None = None,
    exclude: tuple[str, ...] = (),
    models: tuple[str, ...] = (),
) -> dict[str, dict[str, int]]:
    """Convert every model folder of `original_dir`; returns model -> benchmark -> rows written."""
    found = model_files(Path(original_dir))
    if models:
        unknown = sorted(set(models) - set(found))
        if unknown:
            raise ConversionError(f"{original_dir}: no model folders named {unknown}; found {sorted(found)}")
        found = {name: found[name] for name in models}
    if not found:
        raise ConversionError(
            f"{original_dir}: no <model>/<dataset>.jsonl files (expected the original layout, "
            f"with judged files in {JUDGED_DIR}/<model>/)"
        )
    written: dict[str, dict[str, int]] = {}
    loaded_references: dict[str, tuple[list[dict[str, Any]], str] | None] = {}  # one read per dataset
    for model, datasets in found.items():
        by_benchmark: dict[str, list[dict[str, Any]]] = {}
        source_of: dict[str, Path] = {}
        for dataset, path in datasets.items():
            if dataset in exclude:
                continue
            if dataset not in loaded_references:
                loaded_references[dataset] = load_reference(references, dataset)
            for generation, judgment in convert_rows(path, dataset, loaded_references[dataset]):
                benchmark = generation["benchmark"]
                if source_of.setdefault(benchmark, path) != path:
                    raise ConversionError(
                        f"{path}: benchmark {benchmark!r} of model {model!r} also comes from {source_of[benchmark]}; "
                        "leave one of the two datasets out with --exclude"
                    )
                by_benchmark.setdefault(benchmark, []).append(
                    grade(generation, judgment, f"{path} (dataset_index {generation['id']})")
                )
        for benchmark, graded in by_benchmark.items():
            generations_path = output_dir / model / f"{benchmark}.jsonl"
            graded_path = output_dir / JUDGED_DIR / model / f"{benchmark}.jsonl"
            graded_keys = ("rule_correct", "rule_answer", "judge_verdict", "final_correct")
            write_jsonl(generations_path, [{k: v for k, v in row.items() if k not in graded_keys} for row in graded])
            write_jsonl(graded_path, graded)
            # What eval.py and LLM_eval.py will read must pass their loaders.
            load_generations(generations_path)
            load_graded(graded_path)
            written.setdefault(model, {})[benchmark] = len(graded)
    return written


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--original_dir", type=Path, default=Path("Raw-Outputs"), help="default: %(default)s")
    parser.add_argument(
        "--references",
        default=None,
        help="a folder of <dataset>.parquet/.jsonl/.json files (answer, problem, file_name), or hf:OWNER "
        "for the Hub datasets OWNER/<dataset> (the original's: hf:zli12321)",
    )
    parser.add_argument("--output_dir", type=Path, default=Path("Raw-Outputs-converted"), help="default: %(default)s")
    parser.add_argument("--model", dest="models", action="append", default=[], help="convert this model only (repeat)")
    parser.add_argument("--exclude", action="append", default=[], help="a dataset file stem to leave out (repeat)")
    # Every option has a default, but a bare run would convert (or fail on) whatever sits at those
    # relative paths: the usage says what to give instead.
    exit_if_no_arguments(parser, argv)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.output_dir.resolve() == args.original_dir.resolve():
        print("error: --output_dir must differ from --original_dir (the originals are kept)", file=sys.stderr)
        return 1
    try:
        written = convert(args.original_dir, args.output_dir, args.references, tuple(args.exclude), tuple(args.models))
    except (ConversionError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for model, benchmarks in written.items():
        listing = ", ".join(f"{name} ({count})" for name, count in sorted(benchmarks.items()))
        print(f"{model}: {listing}")
    print(
        f"wrote generations to {args.output_dir}/<model>/ and graded rows to {args.output_dir}/{JUDGED_DIR}/<model>/; "
        f"tables: EVAL_OUT_DIR={args.output_dir / JUDGED_DIR} ./get_eval_result.sh"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
