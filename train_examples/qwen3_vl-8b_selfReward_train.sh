#!/usr/bin/env bash
# Qwen3-VL-8B GRPO run: Vision-SR1 (see-think format with the self-reward stage), the 7B run's recipe
# and batch sizes (512 prompts x 8 samples, updates of 128 on 8 GPUs).
# Starts from the released Qwen/Qwen3-VL-8B-Instruct: no Qwen3-VL cold-start model is published. Set
# MODEL_PATH to a local copy, or to your own cold-start SFT output of it.
# See train_examples/gpu_grpo_common.sh for every environment variable; extra args are key=value overrides.
set -euo pipefail
export VARIANT=self_reward
export MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3-VL-8B-Instruct}
exec bash "$(dirname "${BASH_SOURCE[0]}")/gpu_grpo_common.sh" "$@"
