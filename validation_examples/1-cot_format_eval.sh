#!/usr/bin/env bash
# Like 2-seethink_format_eval.sh, with the CoT (Vision-R1) format prompt: <think> then \boxed{}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
FORMAT_PROMPT="${FORMAT_PROMPT:-examples/format_prompt/cot.jinja}" exec bash validation_examples/2-seethink_format_eval.sh "$@"
