#!/usr/bin/env bash
# 3B GRPO run: ablation: see-think format without the self-reward stage.
# Starts from the public 3B cold-start model; set MODEL_PATH to a local copy (or your own SFT output).
# See train_examples/gpu_grpo_common.sh for every environment variable; extra args are key=value overrides.
set -euo pipefail
export VARIANT=see_think
export MODEL_PATH=${MODEL_PATH:-LMMs-Lab-Turtle/Qwen-2.5VL-3B-Cold-Start}
exec bash "$(dirname "${BASH_SOURCE[0]}")/gpu_grpo_common.sh" "$@"
