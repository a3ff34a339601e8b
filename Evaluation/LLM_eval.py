"""Grade model generations: rules first, an LLM judge only where the rules fail.

    cd Evaluation
    python LLM_eval.py --input_dir ./Raw-Outputs/<model> --output_dir ./Raw-Outputs/LLM-Eval-out/<model>

Every row is graded by rules (`rule_grading.py`). Free-form rows the rules mark wrong, or whose
answer they cannot find, go to the judge; multiple-choice rows never do (string match only).
Each `<benchmark>.jsonl` in the input folder gives a graded `<benchmark>.jsonl` in the output
folder (row format in `schema.py`). Rows already in the output are skipped (except those whose
judge request failed), and judge replies are cached in the output folder, so an interrupted
run picks up where it stopped.
"""

import argparse
import json
import os
import shutil
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from judge import (
    API_KEY_ENV,
    Judge,
    JudgeCache,
    JudgeRequestError,
    OpenAICompatibleJudge,
    OpenAISDKJudge,
    build_judge_prompt,
    load_python_judge,
    parse_verdict,
)
from rule_grading import rule_grade
from schema import (
    GENERATION_SUMMARY_FILE,
    JUDGE_CACHE_FILE,
    RowError,
    is_multiple_choice,
    load_generations,
    load_graded,
)

from verl.utils.progress import progress

# The verdicts a judge request ends in ("skipped": no request).
JUDGE_VERDICTS = ("correct", "incorrect", "unparsed", "error")


def needs_judge(row: dict[str, Any], rule_correct: bool) -> bool:
    """Only free-form rows the rules did not accept are worth a judge call."""
    return not rule_correct and not is_multiple_choice(row)


def judge_verdict(
    judge: Judge,
    cache: JudgeCache,
    row: dict[str, Any],
    rule_answer: str | None,
    failures: list[str] | None = None,
) -> str:
    """The judge's verdict on one row: a cached reply if there is one, else a new request.

    A request that still fails after the judge's retries gives "error" (never correct); its
    message is appended to `failures` when given, for the run's summary.
    """
    prompt = build_judge_prompt(row, rule_answer)
    reply = cache.get(judge.name, prompt)
    if reply is None:
        try:
            reply = judge.ask(prompt)
        except JudgeRequestError as error:
            message = f"row id {row['id']!r}: judge request failed: {error}"
            print(f"warning: {message}", file=sys.stderr)
            if failures is not None:
                failures.append(message)
            return "error"
        cache.put(judge.name, prompt, reply)
    return parse_verdict(reply)


def finished_ids(output_path: Path) -> set[str | int]:
    """Ids already graded in `output_path`.

    Rows whose judge request failed ("error") are removed from the file, so a rerun asks again;
    the cache still holds every reply received, so nothing else is re-asked.
    """
    if not output_path.exists():
        return set()
    rows = load_graded(output_path)
    kept = [row for row in rows if row["judge_verdict"] != "error"]
    if len(kept) < len(rows):
        rewritten = output_path.with_name(output_path.name + ".tmp")
        rewritten.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in kept), encoding="utf-8")
        rewritten.replace(output_path)  # atomic: an interruption leaves the old file or the new one
    return {row["id"] for row in kept}


def grade_file(
    input_path: Path,
    output_path: Path,
    judge: Judge | None,
    cache: JudgeCache | None,
    concurrency: int,
    failures: list[str] | None = None,
) -> Counter:
    """Grade the rows of `input_path` not yet in `output_path` (see `finished_ids`), appending
    them there as they finish.

    With `judge=None` no judge is asked (every verdict is "skipped"). Returns counts: "graded",
    "already_done", "rule_correct" and one per judge verdict. Failed judge requests' messages are
    appended to `failures` when given.
    """
    rows = load_generations(input_path)
    done_ids = finished_ids(output_path)
    # Grade every pending row by rules before writing anything, so a bad row stops the run early.
    ruled = []
    for row in rows:
        if row["id"] in done_ids:
            continue
        try:
            ruled.append((row, *rule_grade(row)))
        except ValueError as error:
            raise RowError(f"{input_path}: {error}") from error

    counts = Counter(already_done=len(done_ids & {row["id"] for row in rows}))
    with open(output_path, "a", encoding="utf-8") as output:

        def write(row: dict[str, Any], rule_correct: bool, rule_answer: str | None, verdict: str) -> None:
            graded = {
                **row,
                "rule_correct": rule_correct,
                "rule_answer": rule_answer,
                "judge_verdict": verdict,
                "final_correct": rule_correct or verdict == "correct",
            }
            output.write(json.dumps(graded, ensure_ascii=False) + "\n")
            output.flush()
            counts.update(graded=1, rule_correct=int(rule_correct), **{verdict: 1})

        to_judge = []
        for row, rule_correct, rule_answer in ruled:
            if judge is not None and needs_judge(row, rule_correct):
                to_judge.append((row, rule_answer))
            else:
                write(row, rule_correct, rule_answer, "skipped")
        if to_judge:
            pool = ThreadPoolExecutor(max_workers=concurrency)
            try:
                futures = {
                    pool.submit(judge_verdict, judge, cache, row, rule_answer, failures): (row, rule_answer)
                    for row, rule_answer in to_judge
                }
                for future in progress(as_completed(futures), "judge", len(futures), unit="answer"):
                    row, rule_answer = futures[future]
                    write(row, False, rule_answer, future.result())
            finally:
                # On Ctrl-C, drop queued requests instead of waiting for all of them; replies
                # already received are in the cache and their rows in the output.
                pool.shutdown(cancel_futures=True)
    return counts


def grade_dir(
    input_dir: Path, output_dir: Path, judge: Judge | None, concurrency: int, failures: list[str] | None = None
) -> dict[str, Counter]:
    """Grade every `<benchmark>.jsonl` of `input_dir` into `output_dir`; counts per file name.
    Failed judge requests' messages are appended to `failures` when given."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if input_dir.resolve() == output_dir.resolve():
        raise ValueError(f"--input_dir and --output_dir are the same folder ({input_dir}); grade into another one")
    input_paths = sorted(path for path in input_dir.glob("*.jsonl") if path.name != JUDGE_CACHE_FILE)
    if not input_paths:
        raise FileNotFoundError(f"no <benchmark>.jsonl generation files in {input_dir}")
    output_dir.mkdir(parents=True, exist_ok=True)
    # The generation step's counts of questions it could not answer (prompt too long) go with the
    # graded rows, so the result tables can show them.
    summary = input_dir / GENERATION_SUMMARY_FILE
    if summary.is_file():
        shutil.copyfile(summary, output_dir / GENERATION_SUMMARY_FILE)
    cache = JudgeCache(output_dir / JUDGE_CACHE_FILE) if judge is not None else None
    results = {}
    for input_path in input_paths:
        counts = grade_file(input_path, output_dir / input_path.name, judge, cache, concurrency, failures)
        verdicts = ", ".join(f"{v} {counts[v]}" for v in JUDGE_VERDICTS if counts[v])
        print(
            f"{input_path.name}: graded {counts['graded']} ({counts['already_done']} already done), "
            f"rules correct {counts['rule_correct']}; judge: {verdicts or 'not asked'}"
        )
        results[input_path.name] = counts
    return results


JUDGE_KINDS = "openai, openai-sdk, none or python:path/to/file.py:function_name"


def build_judge(
    spec: str,
    base_url: str | None,
    model: str | None,
    timeout_s: float,
    max_retries: int,
    retry_backoff_s: float,
    allow_insecure_http: bool = False,
) -> Judge | None:
    """The judge a `--judge` value names: "openai" (stdlib client), "openai-sdk" (the openai SDK),
    "python:file.py:function", or "none" (None)."""
    if spec == "none":
        return None
    if spec.startswith("python:"):
        return Judge(spec, load_python_judge(spec), max_retries, retry_backoff_s)
    if spec in ("openai", "openai-sdk"):
        if not base_url or not model:
            raise ValueError(
                f"the {spec} judge needs a server and a model: pass --judge_base_url and --judge_model "
                "(or set JUDGE_BASE_URL and JUDGE_MODEL); use --judge none to grade by rules only"
            )
        api_key = os.environ.get(API_KEY_ENV)
        if spec == "openai-sdk":
            # The SDK retries failed requests itself (its own backoff, honouring Retry-After), so
            # the Judge does not retry on top. The name is the model's, as for the stdlib client:
            # both ask the same server the same thing, so cached replies serve either.
            sdk_client = OpenAISDKJudge(base_url, model, api_key, timeout_s, max_retries, allow_insecure_http)
            return Judge(model, sdk_client.generate, max_retries=0, retry_backoff_s=retry_backoff_s)
        client = OpenAICompatibleJudge(base_url, model, api_key, timeout_s, allow_insecure_http)
        return Judge(model, client.generate, max_retries, retry_backoff_s)
    raise ValueError(f"--judge must be {JUDGE_KINDS}, got {spec!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Grade generations by rules, asking an LLM judge only where the rules fail.",
        epilog=f"The judge's API key is read only from the environment variable {API_KEY_ENV} (optional "
        "for a local server).",
    )
    parser.add_argument("--input_dir", type=Path, required=True, help="folder of <benchmark>.jsonl generations")
    parser.add_argument("--output_dir", type=Path, required=True, help="folder for graded <benchmark>.jsonl files")
    parser.add_argument(
        "--judge",
        default="openai",
        help="openai (an OpenAI-compatible server, stdlib client), openai-sdk (the same server through the "
        "openai SDK; needs pip install 'vision-sr1[judge]'), none (rules only), or python:path/to/file.py:generate "
        "(a function generate(prompt: str) -> str). Default: openai",
    )
    parser.add_argument(
        "--judge_base_url",
        default=os.environ.get("JUDGE_BASE_URL"),
        help="server URL up to /v1, e.g. http://localhost:8000/v1 (default: $JUDGE_BASE_URL)",
    )
    parser.add_argument("--judge_model", default=os.environ.get("JUDGE_MODEL"), help="default: $JUDGE_MODEL")
    parser.add_argument(
        "--allow_insecure_http",
        action="store_true",
        help=f"allow sending {API_KEY_ENV} over plain http to a host other than this machine (refused by "
        "default: the key would cross the network unencrypted)",
    )
    parser.add_argument("--concurrency", type=int, default=8, help="judge requests in flight at once")
    parser.add_argument("--max_retries", type=int, default=3, help="retries of a failed judge request")
    parser.add_argument(
        "--retry_backoff",
        type=float,
        default=1.0,
        help="seconds before the first retry; doubles (openai-sdk: the SDK's own backoff)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one judge reply")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.max_retries < 0 or args.timeout <= 0 or args.retry_backoff < 0:
        parser.error("need --concurrency >= 1, --max_retries >= 0, --timeout > 0 and --retry_backoff >= 0")
    return args


def report_judge_failures(results: dict[str, Counter], failures: list[str]) -> int:
    """The exit status a run's judge failures give, and what to tell the user.

    Every judge answer asked for failed (typically: no server at --judge_base_url): 1, since the
    graded files then say nothing the rules did not. Some failed: 0 with a warning; their rows are
    marked "error" (never correct) and a rerun asks again.
    """
    asked = sum(counts[verdict] for counts in results.values() for verdict in JUDGE_VERDICTS)
    failed = sum(counts["error"] for counts in results.values())
    if not failed:
        return 0
    first = failures[0] if failures else "no message"
    if failed == asked:
        print(
            f"error: all {failed} judge requests failed (first: {first}); is the judge server up? "
            "The rows are marked `error` and a rerun asks the judge again.",
            file=sys.stderr,
        )
        return 1
    print(
        f"warning: {failed} of {asked} judge requests failed (first: {first}); "
        "their rows are marked `error` and a rerun asks the judge again",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    failures: list[str] = []
    try:
        judge = build_judge(
            args.judge,
            args.judge_base_url,
            args.judge_model,
            args.timeout,
            args.max_retries,
            args.retry_backoff,
            args.allow_insecure_http,
        )
        results = grade_dir(args.input_dir, args.output_dir, judge, args.concurrency, failures)
    except (OSError, ValueError, ImportError) as error:  # bad paths, rows, judge configuration, no openai
        print(f"error: {error}", file=sys.stderr)
        return 1
    return report_judge_failures(results, failures)


if __name__ == "__main__":
    sys.exit(main())
