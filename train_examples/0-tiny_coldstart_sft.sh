#!/usr/bin/env bash
# Cold start on the tiny world, on CPU in a few minutes: SFT of a random-init tiny model (Qwen2.5-VL unless
# MODEL_FAMILY says otherwise) on the
# tiny world's cold-start mix (see-think, think, text-only), stopped by a measured target: every 25 steps a
# greedy check on the TASK's VALIDATION split (128 held-out scans), and the run ends at the first check
# where the see-think format is learned (gen/format >= 0.9) and answers are partly right (gen/accuracy >=
# 0.3), so that RL starts from a model that reads digits but has room to improve; 1500 steps (five and a third
# passes over the mix) is the cap.
#
#   bash train_examples/0-tiny_coldstart_sft.sh [key=value ...]    # extra keys override the ones below
#   bash train_examples/0-tiny_coldstart_sft.sh --check-config [key=value ...]
#
# --check-config builds and trains nothing: it says whether a run would build the tiny world first, checks
# the SFT config (which needs no model or data) and prints it as JSON.
#
# TINY_WORLD      the tiny world (default: tiny_world), built first when missing
# MODEL_FAMILY    the tiny model to start from: qwen2_5_vl (default), qwen2_vl, qwen3_vl, qwen3_vl_moe or
#                 qwen3_5 (a folder of $TINY_WORLD/models)
# TASK            digit_sum (default), or digit_mix: the see-think examples are then asked as digit_mix
#                 asks (half of them two-option questions) and the stop check runs on digit_mix's
#                 validation split; the cold start of scripts/tiny_experiment.py --task digit_mix
# COLD_START_DIR  where the run goes (default: $TINY_WORLD/cold_start, or $TINY_WORLD/cold_start_digit_mix;
#                 another MODEL_FAMILY adds _<family>, e.g. $TINY_WORLD/cold_start_qwen3_vl):
#                   checkpoints/        the SFT checkpoints (global_step_<N>/actor, ...)
#                   model/              the final model, a Hugging Face folder: RL starts from it
#                   eval_metrics.json   its greedy check on the TASK's validation split (gen/format,
#                                       gen/accuracy, gen/perception) and the held-out loss (val/loss)
# PYTHON          interpreter (default: the repository's .venv/bin/python, else python3)
#
# The vision tower and projector train here (the original froze them): the tiny model's are random.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/shell_common.sh
exit_with_help_if_asked train_examples/0-tiny_coldstart_sft.sh -- "$@"

TINY_WORLD=${TINY_WORLD:-tiny_world}
TASK=${TASK:-digit_sum}
MODEL_FAMILY=${MODEL_FAMILY:-qwen2_5_vl}
case "$MODEL_FAMILY" in
  qwen2_5_vl) family_suffix="" ;;
  qwen2_vl | qwen3_vl | qwen3_vl_moe | qwen3_5) family_suffix="_$MODEL_FAMILY" ;;
  *) echo "MODEL_FAMILY must be qwen2_5_vl, qwen2_vl, qwen3_vl, qwen3_vl_moe or qwen3_5, not '$MODEL_FAMILY'" >&2; exit 2 ;;
esac
case "$TASK" in
  digit_sum) see_think=seethink.json; COLD_START_DIR=${COLD_START_DIR:-$TINY_WORLD/cold_start$family_suffix} ;;
  digit_mix) see_think=seethink_mix.json; COLD_START_DIR=${COLD_START_DIR:-$TINY_WORLD/cold_start_digit_mix$family_suffix} ;;
  *) echo "TASK must be digit_sum or digit_mix, not '$TASK'" >&2; exit 2 ;;
esac
# One thread: as fast as two for this model size, and the same numbers from run to run. The step where the
# model starts reading the digits depends on the arithmetic of the CPU (around 500-550 on the machines
# measured), hence a stop on the measured target rather than on a step count.
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

check_only=false
for arg in "$@"; do [[ $arg == --check-config ]] && check_only=true; done

if [[ ! -f "$TINY_WORLD/manifest.json" ]]; then
  if $check_only; then
    echo "a run would first build the tiny world: $PYTHON scripts/make_tiny_world.py --out $TINY_WORLD" >&2
  else
    "$PYTHON" scripts/make_tiny_world.py --out "$TINY_WORLD" >/dev/null
  fi
fi

data="$TINY_WORLD/data/cold_start"
"$PYTHON" -m verl.trainer.sft config=examples/sft_config.yaml \
  "data.train_files=[$data/$see_think,$data/think.json,$data/text_only.json]" \
  "data.val_files=[$data/seethink_val.json]" \
  data.batch_size=16 \
  model.model_path="$TINY_WORLD/models/$MODEL_FAMILY" \
  model.freeze_vision_tower=false model.freeze_projector=false \
  optim.lr=1e-3 optim.lr_scheduler_type=constant \
  eval.generation_files="$TINY_WORLD/data/$TASK/val.parquet" eval.max_new_tokens=64 \
  "eval.stop_at={gen/format: 0.9, gen/accuracy: 0.3}" trainer.val_freq=25 \
  trainer.experiment_name=tiny_cold_start trainer.total_epochs=6 trainer.max_steps=1500 trainer.micro_batch_size=16 trainer.torch_threads=1 \
  trainer.save_checkpoint_path="$COLD_START_DIR/checkpoints" \
  "$@"
$check_only && exit 0  # nothing was trained: no checkpoint to make the model from

checkpoint="$COLD_START_DIR/checkpoints/global_step_$(cat "$COLD_START_DIR/checkpoints/latest_global_step.txt")"
rm -rf "$COLD_START_DIR/model"
cp -r "$checkpoint/actor" "$COLD_START_DIR/model"
rm "$COLD_START_DIR/model/training_state.pt"  # optimizer state: only a resumed SFT run needs it
cp "$checkpoint/eval_metrics.json" "$COLD_START_DIR/eval_metrics.json"
echo "cold-start model: $COLD_START_DIR/model"
cat "$COLD_START_DIR/eval_metrics.json"
