#!/usr/bin/env bash
# Shared body of the GPU training scripts (1-*, 2-*, 3-*, qwen3*). Not meant to be called directly.
# Every value is the original Vision-SR1 run's (its train_examples/*.sh and *_config.yaml) unless a
# comment gives the reason it differs. Every value can be overridden by an environment variable of
# the same name; extra arguments are config overrides (key=value).
# `--check-config` as an extra argument checks the whole config in seconds, without a GPU, model or
# data, and prints it: `bash train_examples/2-7b_selfReward_train.sh --check-config`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

: "${VARIANT:?set by the calling script: self_reward, see_think or cot}"
: "${MODEL_PATH:?set by the calling script}"
source scripts/shell_common.sh  # PYTHON: the repository's .venv/bin/python unless set (else python3)
TRAIN_FILES=${TRAIN_FILES:-LMMs-Lab-Turtle/Vision-SR1-47K@train}
VAL_FILES=${VAL_FILES:-zli12321/mmstar@test}
N_GPUS_PER_NODE=${N_GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-$(basename "$MODEL_PATH")_${VARIANT}}
SAVE_DIR=${SAVE_DIR:-checkpoints/vision_sr1/$EXPERIMENT_NAME}

# Per variant, as the original's config files and scripts set them: the Vision-R1 (cot) config's
# micro-batches (1 / 8) were never overridden by its scripts, the see-think ones' were (8 / 16).
case "$VARIANT" in
  self_reward) FORMAT_PROMPT=examples/format_prompt/see_think.jinja
               REWARD=examples/reward_function/see_think_self_reward.py:compute_score
               micro_update=8 micro_experience=16 save_freq=15 ;;
  see_think)   FORMAT_PROMPT=examples/format_prompt/see_think.jinja
               REWARD=examples/reward_function/see_think.py:compute_score
               micro_update=8 micro_experience=16 save_freq=20 ;;
  cot)         FORMAT_PROMPT=examples/format_prompt/cot.jinja
               REWARD=examples/reward_function/cot.py:compute_score
               micro_update=1 micro_experience=8 save_freq=20 ;;
  *) echo "unknown VARIANT=$VARIANT" >&2; exit 2 ;;
esac
MICRO_BATCH_EXPERIENCE=${MICRO_BATCH_EXPERIENCE:-$micro_experience}

# Where a value differs from the original, or needs a word, one line says why:
# TENSOR_PARALLEL_SIZE 1, not the original's 2: TP 2 (two workers per engine) is checked on CPU only so far; set it to 2 for the original's.
# MAX_MODEL_LEN null (prompt + response = 14848), not the original's 8192: vLLM refuses 8192..12800-token prompts.
# MAX_NUM_BATCHED_TOKENS 15000 as the original: without chunked prefill vLLM needs it >= max_model_len.
# ENABLE_CHUNKED_PREFILL false as the original; the Qwen3.5 script turns it on (vLLM needs it for hybrid models).
# worker.ref.offload.offload_params: the original's FSDP CPU offload of the reference model.
# worker.actor.offload.offload_during_generation (not in the original): the actor waits on the CPU while vLLM
#   generates, as in EasyR1 and verl, so the KV cache gets its memory (OFFLOAD_DURING_GENERATION=false keeps it).
# PADDING_FREE: packed rows with token-budget micro-batches when flash-attn is installed (its variable-length
#   kernel); with sdpa they would share one quadratic mask, so it is off there (not in the original).
# LOGGERS [console,file], not the original's [console]: file keeps metrics.jsonl; add wandb after `wandb login`.
if [[ -z "${PADDING_FREE:-}" ]]; then
  if "$PYTHON" -c "import flash_attn" >/dev/null 2>&1; then PADDING_FREE=true; else PADDING_FREE=false; fi
fi
"$PYTHON" -m verl.trainer.main config=examples/config.yaml \
  data.train_files="$TRAIN_FILES" \
  data.val_files="$VAL_FILES" \
  data.format_prompt="$FORMAT_PROMPT" \
  data.max_prompt_length="${MAX_PROMPT_LENGTH:-12800}" \
  data.max_response_length="${MAX_RESPONSE_LENGTH:-2048}" \
  data.rollout_batch_size="${ROLLOUT_BATCH_SIZE:-512}" \
  data.val_batch_size="${VAL_BATCH_SIZE:-1024}" \
  data.min_pixels="${MIN_PIXELS:-262144}" \
  data.max_pixels="${MAX_PIXELS:-4194304}" \
  algorithm.use_kl_loss=true \
  algorithm.kl_penalty=low_var_kl \
  algorithm.kl_coef="${KL_COEF:-1.0e-2}" \
  worker.actor.model.model_path="$MODEL_PATH" \
  worker.actor.global_batch_size="${GLOBAL_BATCH_SIZE:-128}" \
  worker.actor.micro_batch_size_per_device_for_update="${MICRO_BATCH_UPDATE:-$micro_update}" \
  worker.actor.micro_batch_size_per_device_for_experience="$MICRO_BATCH_EXPERIENCE" \
  worker.actor.max_grad_norm=1.0 \
  worker.actor.padding_free="$PADDING_FREE" \
  worker.actor.dynamic_batching="$PADDING_FREE" \
  worker.actor.clip_ratio_low=0.2 \
  worker.actor.clip_ratio_high=0.3 \
  worker.actor.clip_ratio_dual=3.0 \
  worker.actor.optim.lr="${LR:-1.0e-6}" \
  worker.actor.optim.weight_decay=1.0e-2 \
  worker.actor.model.enable_gradient_checkpointing=true \
  worker.actor.fsdp.enable_full_shard=true \
  worker.actor.offload.offload_params=true \
  worker.actor.offload.offload_optimizer=true \
  worker.actor.offload.offload_during_generation="${OFFLOAD_DURING_GENERATION:-true}" \
  worker.ref.micro_batch_size_per_device_for_experience="$MICRO_BATCH_EXPERIENCE" \
  worker.ref.fsdp.enable_full_shard=true \
  worker.ref.offload.offload_params=true \
  worker.rollout.name="${ROLLOUT_ENGINE:-vllm}" \
  worker.rollout.n=8 \
  worker.rollout.temperature=1.0 \
  worker.rollout.top_p=0.99 \
  worker.rollout.tensor_parallel_size="${TENSOR_PARALLEL_SIZE:-1}" \
  worker.rollout.gpu_memory_utilization="${GPU_MEMORY_UTILIZATION:-0.6}" \
  worker.rollout.max_num_batched_tokens="${MAX_NUM_BATCHED_TOKENS:-15000}" \
  worker.rollout.max_model_len="${MAX_MODEL_LEN:-null}" \
  worker.rollout.enforce_eager=false \
  worker.rollout.enable_chunked_prefill="${ENABLE_CHUNKED_PREFILL:-false}" \
  worker.rollout.limit_images=0 \
  worker.rollout.val_temperature=0.0 \
  worker.rollout.val_n=1 \
  worker.reward.reward_function="$REWARD" \
  trainer.total_epochs=1 \
  trainer.nnodes="$NNODES" \
  trainer.n_gpus_per_node="$N_GPUS_PER_NODE" \
  trainer.experiment_name="$EXPERIMENT_NAME" \
  trainer.save_checkpoint_path="$SAVE_DIR" \
  trainer.val_before_train=true \
  trainer.val_freq="${VAL_FREQ:-5}" \
  trainer.save_freq="${SAVE_FREQ:-$save_freq}" \
  trainer.logger="${LOGGERS:-[console,file]}" \
  "$@"
