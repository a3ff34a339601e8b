#!/usr/bin/env bash
# Generate see-think answers of a model on benchmarks into Evaluation/Raw-Outputs/<model>/<benchmark>.jsonl.
# A rerun resumes: finished ids are skipped. Environment variables (defaults in brackets):
#   MODEL_PATH   HF folder or checkpoint's global_step_N/actor   [tiny_world/cold_start/model]
#   MODEL_NAME   output folder name                             [derived from MODEL_PATH]
#   BENCHMARKS   comma-separated files or name@split            [tiny_world/data/digit_sum/test.parquet]
#   OUTPUT_DIR   [Evaluation/Raw-Outputs]; FORMAT_PROMPT [examples/format_prompt/see_think.jinja]
#   MAX_NEW_TOKENS [2048]; TEMPERATURE [0 = greedy]
#   MIN_PIXELS, MAX_PIXELS  image bounds [the model processor's own, as it was trained]; the paper's
#                benchmarks were evaluated with MIN_PIXELS=262144 MAX_PIXELS=4194304
# Extra arguments are passed on as key=value overrides of verl.trainer.generate.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/shell_common.sh  # PYTHON: the repository's .venv/bin/python unless set (else python3)
args=(
  model_path="${MODEL_PATH:-tiny_world/cold_start/model}"
  benchmarks="[${BENCHMARKS:-tiny_world/data/digit_sum/test.parquet}]"
  output_dir="${OUTPUT_DIR:-Evaluation/Raw-Outputs}"
  format_prompt="${FORMAT_PROMPT:-examples/format_prompt/see_think.jinja}"
  max_new_tokens="${MAX_NEW_TOKENS:-2048}"
  temperature="${TEMPERATURE:-0}"
)
[[ -n "${MODEL_NAME:-}" ]] && args+=(model_name="$MODEL_NAME")
[[ -n "${MIN_PIXELS:-}" ]] && args+=(min_pixels="$MIN_PIXELS")
[[ -n "${MAX_PIXELS:-}" ]] && args+=(max_pixels="$MAX_PIXELS")
exec "$PYTHON" -m verl.trainer.generate "${args[@]}" "$@"
