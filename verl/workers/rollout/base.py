"""The rollout-engine interface and its registry.

An engine turns a batch of prompts into `n` sampled responses per prompt, grouped: the responses of
prompt i occupy rows i*n .. i*n+n-1 of the output, next to their repeated prompt data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from transformers import PreTrainedTokenizerBase

from verl.models.multimodal import batch_multimodal_inputs
from verl.models.positions import compute_position_ids
from verl.protocol import DataProto, SamplingParams


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids a response ends at: the generation config's EOS ids plus the tokenizer's."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = list(eos) if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model's generation config and tokenizer define no EOS token")
    return ids


def rollout_output(
    model: torch.nn.Module,
    prompts: DataProto,
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_log_probs: torch.Tensor | None,
    meta_info: dict,
) -> DataProto:
    """Every engine's output: `prompts` already repeated n times (a prompt's samples adjacent), the
    padded `responses` with their mask, prompt + response as `input_ids` / `attention_mask`, and
    the model's position ids (3-D rope for Qwen-VL) over the whole sequence."""
    prompt_ids = prompts.batch["input_ids"]
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    attention_mask = torch.cat([prompts.batch["attention_mask"], response_mask], dim=1)
    multi_modal_inputs = prompts.non_tensor_batch.get("multi_modal_inputs")
    grids = None if multi_modal_inputs is None else batch_multimodal_inputs(multi_modal_inputs).get("image_grid_thw")
    position_ids = compute_position_ids(model, input_ids, attention_mask, grids, prompt_length=prompt_ids.shape[1])
    tensors = {} if rollout_log_probs is None else {"rollout_log_probs": rollout_log_probs}
    return DataProto.from_dict(
        tensors={
            **tensors,
            "prompts": prompt_ids,
            "responses": responses,
            "response_mask": response_mask,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        },
        non_tensors=prompts.non_tensor_batch,
        meta_info=meta_info,
    )


class RolloutEngine(ABC):
    """Samples responses with the policy's current weights."""

    shares_actor_module = False
    """True when the engine generates with the actor's own module (hf): the actor must stay on the
    device while it generates, and `sync_weights` has nothing to copy."""

    @property
    def holds_weights(self) -> bool:
        """Whether the weights last synced are still in the engine (a sleeping vLLM engine drops them)."""
        return True

    @abstractmethod
    def generate(self, prompts: DataProto, sampling: SamplingParams) -> DataProto:
        """Return the prompts repeated n times (interleaved) with `responses`, `response_mask`,
        `input_ids`, `attention_mask` and `position_ids` of prompt + response (and
        `rollout_log_probs` when asked)."""

    def sync_weights(self, model: torch.nn.Module) -> None:  # noqa: B027 - engines sharing the module need nothing
        """Load the actor's current weights into the engine."""

    def sleep(self) -> None:  # noqa: B027
        """Free the engine's memory while the actor trains."""

    def wake(self) -> None:  # noqa: B027
        """Take the memory back before generating."""


ROLLOUT_ENGINES: dict[str, Callable[..., RolloutEngine]] = {}


def register_rollout_engine(name: str) -> Callable:
    def decorator(factory: Callable[..., RolloutEngine]) -> Callable[..., RolloutEngine]:
        ROLLOUT_ENGINES[name] = factory
        return factory

    return decorator


def get_rollout_engine(name: str) -> Callable[..., RolloutEngine]:
    if name not in ROLLOUT_ENGINES:
        raise ValueError(f"worker.rollout.name={name!r}: unknown rollout engine; available: {sorted(ROLLOUT_ENGINES)}")
    return ROLLOUT_ENGINES[name]
