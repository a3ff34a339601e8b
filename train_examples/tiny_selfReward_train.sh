#!/usr/bin/env bash
# Vision-SR1 end to end on the tiny world, on CPU: builds the tiny world and the cold-start model
# when they are missing, trains GRPO with the self-reward stage, then prints a summary and writes
# a PNG of the reward curves. Extra arguments are config overrides (key=value).
#
#   bash train_examples/tiny_selfReward_train.sh [trainer.max_steps=20 ...]
#   bash train_examples/tiny_selfReward_train.sh --check-config [key=value ...]
#
# --check-config builds nothing and trains nothing: it says what a run would build first (the tiny
# world, the cold-start SFT), checks the cold-start SFT's config when that SFT would run, then checks
# the GRPO config and prints it as JSON. The GRPO check needs neither the tiny world nor the
# cold-start model (the trainer's --check-config loads no model or data), so the cold start, minutes
# of CPU, is never run just to check a config; a missing model or data file is found by the run.
#
# TINY_WORLD   the tiny world (default: tiny_world)
# MODEL_FAMILY the tiny model family: qwen2_5_vl (default: it learns best here), qwen2_vl, qwen3_vl,
#              qwen3_vl_moe or qwen3_5; its cold start goes to $TINY_WORLD/cold_start_<family>
# COLD_START   the cold-start model (default: $TINY_WORLD/cold_start/model, or .../cold_start_<family>/model)
# RUN_DIR      checkpoints, metrics and the PNG (default: checkpoints/vision_sr1/tiny_self_reward)
# PYTHON       interpreter (default: the repository's .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/shell_common.sh
exit_with_help_if_asked train_examples/tiny_selfReward_train.sh -- "$@"

TINY_WORLD=${TINY_WORLD:-tiny_world}
MODEL_FAMILY=${MODEL_FAMILY:-qwen2_5_vl}
case "$MODEL_FAMILY" in
  qwen2_5_vl) COLD_START=${COLD_START:-$TINY_WORLD/cold_start/model} ;;
  qwen2_vl | qwen3_vl | qwen3_vl_moe | qwen3_5) COLD_START=${COLD_START:-$TINY_WORLD/cold_start_$MODEL_FAMILY/model} ;;
  *) echo "MODEL_FAMILY must be qwen2_5_vl, qwen2_vl, qwen3_vl, qwen3_vl_moe or qwen3_5, not '$MODEL_FAMILY'" >&2; exit 2 ;;
esac
RUN_DIR=${RUN_DIR:-checkpoints/vision_sr1/tiny_self_reward}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} HF_HUB_OFFLINE=1
check_only=false
for arg in "$@"; do [[ $arg == --check-config ]] && check_only=true; done

if [[ ! -f "$TINY_WORLD/manifest.json" ]]; then
  if $check_only; then
    echo "a run would first build the tiny world: $PYTHON scripts/make_tiny_world.py --out $TINY_WORLD" >&2
  else
    "$PYTHON" scripts/make_tiny_world.py --out "$TINY_WORLD"
  fi
fi
if [[ ! -f "$COLD_START/config.json" ]]; then
  cold_start_env=(TINY_WORLD="$TINY_WORLD" MODEL_FAMILY="$MODEL_FAMILY" COLD_START_DIR="$(dirname "$COLD_START")")
  if $check_only; then
    echo "a run would first train the cold-start model $COLD_START:" \
      "${cold_start_env[*]} bash train_examples/0-tiny_coldstart_sft.sh; checking its config" \
      "(that script's --check-config prints it)" >&2
    # Its messages and errors show; its JSON does not: stdout is the GRPO config alone, as for every
    # --check-config, so that it can be read as JSON.
    env "${cold_start_env[@]}" PYTHON="$PYTHON" bash train_examples/0-tiny_coldstart_sft.sh --check-config >/dev/null
  else
    env "${cold_start_env[@]}" PYTHON="$PYTHON" bash train_examples/0-tiny_coldstart_sft.sh
  fi
fi

"$PYTHON" -m verl.trainer.main config=examples/tiny_world/self_reward.yaml \
  data.train_files="$TINY_WORLD/data/digit_sum/train.parquet" \
  data.val_files="$TINY_WORLD/data/digit_sum/val.parquet" \
  worker.actor.model.model_path="$COLD_START" \
  trainer.save_checkpoint_path="$RUN_DIR" \
  "$@"

$check_only && exit 0  # nothing was trained: no curves to plot
"$PYTHON" scripts/plot_metrics.py "$RUN_DIR" --out "$RUN_DIR/reward_curves.png"
