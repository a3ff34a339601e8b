#!/usr/bin/env bash
# Vision-SR1 end to end on the tiny world, on CPU: builds the tiny world and the cold-start model
# when they are missing, trains GRPO with the self-reward stage, then prints a summary and writes
# a PNG of the reward curves. Extra arguments are config overrides (key=value).
#
#   bash train_examples/tiny_selfReward_train.sh [trainer.max_steps=20 ...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-.venv/bin/python}
TINY_WORLD=${TINY_WORLD:-tiny_world}
COLD_START=${COLD_START:-$TINY_WORLD/cold_start/model}
RUN_DIR=${RUN_DIR:-checkpoints/vision_sr1/tiny_self_reward}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} HF_HUB_OFFLINE=1

if [[ ! -f "$TINY_WORLD/manifest.json" ]]; then
  "$PYTHON" scripts/make_tiny_world.py --out "$TINY_WORLD"
fi
if [[ ! -f "$COLD_START/config.json" ]]; then
  TINY_WORLD="$TINY_WORLD" COLD_START_DIR="$(dirname "$COLD_START")" bash train_examples/0-tiny_coldstart_sft.sh
fi

"$PYTHON" -m verl.trainer.main config=examples/tiny_world/self_reward.yaml \
  data.train_files="$TINY_WORLD/data/digit_sum/train.parquet" \
  data.val_files="$TINY_WORLD/data/digit_sum/val.parquet" \
  worker.actor.model.model_path="$COLD_START" \
  trainer.save_checkpoint_path="$RUN_DIR" \
  "$@"

"$PYTHON" scripts/plot_metrics.py "$RUN_DIR" --out "$RUN_DIR/reward_curves.png"
