"""Rollout with transformers' `generate` on the actor's own module (no weight copy needed)."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from verl.models.multimodal import batch_multimodal_inputs, multimodal_token_ids, reset_rope_cache
from verl.models.positions import multimodal_token_types
from verl.protocol import DataProto, SamplingParams
from verl.workers.rollout.base import (
    RolloutEngine,
    eos_token_ids,
    register_rollout_engine,
    rollout_output,
)


def response_mask_from_eos(responses: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """1 for response tokens up to and including the first EOS, 0 after it."""
    is_eos = torch.isin(responses, torch.tensor(eos_token_ids, device=responses.device))
    eos_seen_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~eos_seen_before).long()


@register_rollout_engine("hf")
class HFRollout(RolloutEngine):
    shares_actor_module = True

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        micro_batch_size: int = 64,
        **_: object,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.pad_token_id = tokenizer.pad_token_id
        self.suppressed_token_ids = multimodal_token_ids(model.config)

    @torch.no_grad()
    def generate(self, prompts: DataProto, sampling: SamplingParams) -> DataProto:
        batch = prompts.repeat(sampling.n, interleave=True)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        responses, log_probs = [], []
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(sampling.seed)
                for chunk in batch.split(self.micro_batch_size):
                    tokens, chunk_log_probs = self._generate_chunk(chunk, sampling, device)
                    responses.append(tokens)
                    log_probs.append(chunk_log_probs)
        finally:
            reset_rope_cache(self.model)
            self.model.train(was_training)
        response_ids = torch.cat(responses).cpu()
        response_mask = response_mask_from_eos(response_ids, self.eos_token_ids)
        response_ids = response_ids.masked_fill(response_mask == 0, self.pad_token_id)
        log_probs = torch.cat(log_probs).cpu() * response_mask if sampling.return_log_probs else None
        return rollout_output(self.model, batch, response_ids, response_mask, log_probs, dict(prompts.meta_info))

    def _generate_chunk(
        self, chunk: DataProto, sampling: SamplingParams, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_ids = chunk.batch["input_ids"].to(device)
        attention_mask = chunk.batch["attention_mask"].to(device)
        kwargs = {
            k: v.to(device) for k, v in batch_multimodal_inputs(chunk.non_tensor_batch["multi_modal_inputs"]).items()
        }
        image_token_id = getattr(self.model.config, "image_token_id", None)
        if image_token_id is not None:
            kwargs["mm_token_type_ids"] = multimodal_token_types(
                input_ids, image_token_id, getattr(self.model.config, "video_token_id", None)
            )
        # A fresh config, so sampling defaults shipped with a checkpoint (top_k, repetition
        # penalty, ...) never change what the trainer asked for.
        generation_config = GenerationConfig(
            do_sample=not sampling.greedy,
            temperature=sampling.temperature if not sampling.greedy else None,
            top_p=sampling.top_p if not sampling.greedy else None,
            top_k=max(sampling.top_k, 0) if not sampling.greedy else None,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            suppress_tokens=self.suppressed_token_ids or None,
            return_dict_in_generate=True,
            output_logits=sampling.return_log_probs,
        )
        output = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config, **kwargs
        )
        reset_rope_cache(self.model)
        new_tokens = output.sequences[:, input_ids.shape[1] :]
        pad = sampling.max_new_tokens - new_tokens.shape[1]
        log_probs = None
        if sampling.return_log_probs:
            # Raw logits at the sampling temperature: what the actor must reproduce in its forward.
            logits = torch.stack(output.logits, dim=1).float()
            if not sampling.greedy:
                logits = logits / sampling.temperature
            log_probs = torch.gather(logits.log_softmax(-1), -1, new_tokens.unsqueeze(-1)).squeeze(-1)
            log_probs = torch.nn.functional.pad(log_probs, (0, max(pad, 0)), value=0.0)
        if pad > 0:
            new_tokens = torch.nn.functional.pad(new_tokens, (0, pad), value=self.pad_token_id)
        return new_tokens, log_probs
