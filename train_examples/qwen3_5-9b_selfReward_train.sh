#!/usr/bin/env bash
# Qwen3.5-9B GRPO run: Vision-SR1 (see-think format with the self-reward stage), the 7B run's recipe
# and batch sizes (512 prompts x 8 samples, updates of 128 on 8 GPUs).
# Starts from the released dense Qwen/Qwen3.5-9B (natively multimodal; vLLM's recipe page for it runs
# it on one GPU); no Qwen3.5 cold-start model is published. Set MODEL_PATH to a local copy, or to your
# own cold-start SFT output of it. Two settings differ from the 7B run:
# - PADDING_FREE=false: Qwen3.5 refuses padding-free packing (its delta-net layers would carry state
#   across packed rows; verl/models/families/qwen3_5.py), so micro-batches stay padded.
# - ENABLE_CHUNKED_PREFILL=true: vLLM turns prefix caching on for hybrid models by default, and their
#   prefix cache ("align" mode) asserts chunked prefill (MambaModelConfig.verify_and_update_config).
# See train_examples/gpu_grpo_common.sh for every environment variable; extra args are key=value overrides.
set -euo pipefail
export VARIANT=self_reward
export MODEL_PATH=${MODEL_PATH:-Qwen/Qwen3.5-9B}
export PADDING_FREE=${PADDING_FREE:-false}
export ENABLE_CHUNKED_PREFILL=${ENABLE_CHUNKED_PREFILL:-true}
exec bash "$(dirname "${BASH_SOURCE[0]}")/gpu_grpo_common.sh" "$@"
