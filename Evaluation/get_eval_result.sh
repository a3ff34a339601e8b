#!/usr/bin/env bash
# Accuracy tables for every graded model: runs eval.py over each folder under LLM-Eval-out
# and prints the markdown table. Override the locations with environment variables:
#   EVAL_OUT_DIR  folder holding one graded folder per model (default: Raw-Outputs/LLM-Eval-out)
#   RESULTS_DIR   where results.md / results.csv / results.png go (default: Raw-Outputs/Tables)
#   PYTHON        the interpreter (default: the repository's .venv/bin/python, else python3)
#
#   ./get_eval_result.sh         # no arguments: every model folder under EVAL_OUT_DIR
#   ./get_eval_result.sh --help  # this text
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/../scripts/shell_common.sh"
exit_with_help_if_asked "$here/get_eval_result.sh" -- "$@"
if [[ $# -gt 0 ]]; then
  # Settings are environment variables; an argument is a mistake, not something to ignore.
  echo "error: get_eval_result.sh takes no arguments, got: $*" >&2
  print_header "$here/get_eval_result.sh" >&2
  exit 2
fi
EVAL_OUT_DIR="${EVAL_OUT_DIR:-$here/Raw-Outputs/LLM-Eval-out}"
RESULTS_DIR="${RESULTS_DIR:-$here/Raw-Outputs/Tables}"

graded_dirs=()
for dir in "$EVAL_OUT_DIR"/*/; do
  [[ -d "$dir" ]] && graded_dirs+=(--graded_dir "${dir%/}")
done
if [[ ${#graded_dirs[@]} -eq 0 ]]; then
  echo "error: no model folders in $EVAL_OUT_DIR; grade generations first with" >&2
  echo "  python LLM_eval.py --input_dir ./Raw-Outputs/<model> --output_dir ./Raw-Outputs/LLM-Eval-out/<model>" >&2
  exit 1
fi

"$PYTHON" "$here/eval.py" "${graded_dirs[@]}" --out_dir "$RESULTS_DIR"
