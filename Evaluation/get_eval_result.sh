#!/usr/bin/env bash
# Accuracy tables for every graded model: runs eval.py over each folder under LLM-Eval-out
# and prints the markdown table. Override the locations with environment variables:
#   EVAL_OUT_DIR  folder holding one graded folder per model (default: Raw-Outputs/LLM-Eval-out)
#   RESULTS_DIR   where results.md / results.csv / results.png go (default: Raw-Outputs/Tables)
#   PYTHON        the interpreter (default: python)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
EVAL_OUT_DIR="${EVAL_OUT_DIR:-$here/Raw-Outputs/LLM-Eval-out}"
RESULTS_DIR="${RESULTS_DIR:-$here/Raw-Outputs/Tables}"
PYTHON="${PYTHON:-python}"

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
