"""The row formats of the evaluation pipeline and their loaders.

Generation writes `Raw-Outputs/<model>/<benchmark>.jsonl`, one generation row per line:

    id            str | int   unique within the file
    prompt        str         the question shown to the model (may contain `<image>` placeholders)
    response      str         the model's full answer
    ground_truth  str         for multiple choice: the letter ("B" or "(B)") or the choice's text
    benchmark     str         benchmark name, e.g. "mathvista"
    choices       list[str]   optional: the options, in letter order A, B, C, ...
    question_type str         optional: "multiple_choice" or "free_form";
                              when absent a row with `choices` is multiple choice

`LLM_eval.py` writes `Raw-Outputs/LLM-Eval-out/<model>/<benchmark>.jsonl`: the same rows plus

    rule_correct  bool        the rule-based grade
    rule_answer   str | None  the answer the rules extracted (None: nothing extractable)
    judge_verdict str         one of JUDGE_VERDICTS; "skipped" when the judge was not asked
    final_correct bool        rule_correct or judge_verdict == "correct"

and keeps its judge cache beside them in JUDGE_CACHE_FILE.
"""

import json
from pathlib import Path
from typing import Any

JUDGE_VERDICTS = ("correct", "incorrect", "unparsed", "error", "skipped")
QUESTION_TYPES = ("multiple_choice", "free_form")
JUDGE_CACHE_FILE = "judge_cache.jsonl"
# Written by verl.trainer.generate beside the generations: per benchmark, the questions it did not
# answer because their prompt exceeded max_prompt_length ("too_long").
GENERATION_SUMMARY_FILE = "generation_summary.json"

_GENERATION_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str, int),
    "prompt": (str,),
    "response": (str,),
    "ground_truth": (str,),
    "benchmark": (str,),
}
_GRADED_FIELDS: dict[str, tuple[type, ...]] = {
    "rule_correct": (bool,),
    "rule_answer": (str, type(None)),
    "judge_verdict": (str,),
    "final_correct": (bool,),
}


class RowError(ValueError):
    """A jsonl row that does not follow the schema; the message names the file and line."""


def is_multiple_choice(row: dict[str, Any]) -> bool:
    """Whether a row is graded by its chosen letter (and never by the judge)."""
    if "question_type" in row:
        return row["question_type"] == "multiple_choice"
    return bool(row.get("choices"))


def _check_fields(row: dict[str, Any], fields: dict[str, tuple[type, ...]]) -> None:
    for name, types in fields.items():
        if name not in row:
            raise ValueError(f"missing field {name!r}")
        value = row[name]
        # bool is an int subclass; an id of True is a mistake, not a number.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ValueError(f"field {name!r} must be {expected}, got {value!r}")


def _check_generation_row(row: dict[str, Any]) -> None:
    _check_fields(row, _GENERATION_FIELDS)
    if "question_type" in row and row["question_type"] not in QUESTION_TYPES:
        raise ValueError(f"field 'question_type' must be one of {QUESTION_TYPES}, got {row['question_type']!r}")
    choices = row.get("choices")
    if choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
        raise ValueError(f"field 'choices' must be a list of strings, got {choices!r}")
    if choices is not None and len(choices) > 26:
        raise ValueError(f"field 'choices' has {len(choices)} options; letters only go to Z")


def _check_graded_row(row: dict[str, Any]) -> None:
    _check_generation_row(row)
    _check_fields(row, _GRADED_FIELDS)
    if row["judge_verdict"] not in JUDGE_VERDICTS:
        raise ValueError(f"field 'judge_verdict' must be one of {JUDGE_VERDICTS}, got {row['judge_verdict']!r}")
    if row["final_correct"] != (row["rule_correct"] or row["judge_verdict"] == "correct"):
        raise ValueError("final_correct must equal rule_correct or (judge_verdict == 'correct')")


def _load(path: Path, check_row) -> list[dict[str, Any]]:
    rows = []
    seen_ids: dict[str | int, int] = {}
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("a row must be a JSON object")
                check_row(row)
            except ValueError as error:  # json.JSONDecodeError is a ValueError too
                raise RowError(f"{path}:{line_number}: {error}") from error
            if row["id"] in seen_ids:
                raise RowError(f"{path}:{line_number}: id {row['id']!r} already used on line {seen_ids[row['id']]}")
            seen_ids[row["id"]] = line_number
            rows.append(row)
    return rows


def load_generations(path: Path) -> list[dict[str, Any]]:
    """Rows of one generation file; RowError names the file and line of the first bad row."""
    return _load(Path(path), _check_generation_row)


def load_graded(path: Path) -> list[dict[str, Any]]:
    """Rows of one graded file (generation fields plus grades); RowError names file and line."""
    return _load(Path(path), _check_graded_row)
