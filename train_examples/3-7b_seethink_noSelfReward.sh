#!/usr/bin/env bash
# 7B GRPO run: ablation: see-think format without the self-reward stage.
# Starts from the public 7B cold-start model; set MODEL_PATH to a local copy (or your own SFT output).
# See train_examples/gpu_grpo_common.sh for every environment variable; extra args are key=value overrides.
set -euo pipefail
export VARIANT=see_think
export MODEL_PATH=${MODEL_PATH:-LMMs-Lab-Turtle/Qwen-2.5VL-7B-Cold-Start}
exec bash "$(dirname "${BASH_SOURCE[0]}")/gpu_grpo_common.sh" "$@"
