"""The policy: response log-probs and the PPO/GRPO update, with micro-batches and gradient accumulation.

The same code runs on one process and under FSDP (each rank updating its share of the batch).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from verl.algorithms import core_algos
from verl.models.families import family_of
from verl.models.logprobs import chunked_log_probs, lm_head_logits, response_log_probs, selected_log_probs
from verl.models.multimodal import batch_multimodal_inputs, reset_rope_cache
from verl.models.packing import PackedRows, pack_rows
from verl.models.shared_prompt import prompt_groups, shared_prompt_hidden
from verl.protocol import DataProto
from verl.workers import fsdp_utils
from verl.workers.actor.micro_batches import micro_batches, prompt_run_starts
from verl.workers.config import ActorConfig
from verl.workers.optimizer import clip_and_step


def _forward_inputs(
    model: torch.nn.Module, micro: DataProto, padding_free: bool = False, image_rows: list[int] | None = None
) -> tuple[dict[str, Any], PackedRows | None]:
    """The model's keyword inputs for a micro-batch, on the model's device, and its packed form if asked.

    Padding-free (verl.models.packing): one (1, N) sequence of the rows' real tokens, no attention mask.
    `image_rows`: the rows whose images go in (default: every row's).
    """
    position_ids = micro.batch["position_ids"]
    device = next(model.parameters()).device
    per_row = micro.non_tensor_batch["multi_modal_inputs"]
    if image_rows is not None:
        per_row = [per_row[row] for row in image_rows]
    multimodal = {k: v.to(device) for k, v in batch_multimodal_inputs(per_row).items()}
    if padding_free:
        packed = pack_rows(
            micro.batch["input_ids"], micro.batch["attention_mask"], position_ids, micro.batch["responses"].shape[1]
        )
        inputs = {"input_ids": packed.input_ids.to(device), "attention_mask": None}
        inputs.update(position_ids=packed.position_ids.to(device), use_cache=False, **multimodal)
        return inputs, packed
    if position_ids.dim() == 3:  # stored (b, 3, L); Qwen-VL expects (3, b, L)
        position_ids = position_ids.transpose(0, 1)
    inputs = {
        "input_ids": micro.batch["input_ids"].to(device),
        "attention_mask": micro.batch["attention_mask"].to(device),
        "position_ids": position_ids.to(device),
        "use_cache": False,
        **multimodal,
    }
    return inputs, None


def forward_response_logits(
    model: torch.nn.Module, micro: DataProto, temperature: float, padding_free: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (b, T, V) predicting each response token, scaled by the sampling temperature, and the tokens.

    Padding-free, the logits at padded response slots are zeros (the padded path leaves values there
    that every consumer masks out).
    """
    responses = micro.batch["responses"]
    response_length = responses.shape[1]
    inputs, packed = _forward_inputs(model, micro, padding_free)
    reset_rope_cache(model)
    if packed is not None:
        output = model(**inputs, logits_to_keep=packed.predictor_index.to(inputs["input_ids"].device))
        logits = packed.unpack(output.logits[0].float())
    else:
        output = model(**inputs, logits_to_keep=response_length + 1)
        logits = output.logits[:, :-1, :].float()
    if temperature > 0:
        logits = logits / temperature
    return logits, responses.to(logits.device)


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.gather(logits.log_softmax(-1), -1, tokens.unsqueeze(-1)).squeeze(-1)


def forward_response_log_probs(
    model: torch.nn.Module,
    micro: DataProto,
    temperature: float,
    chunk_size: int,
    with_entropy: bool,
    keep_logits: bool = False,
    padding_free: bool = False,
    shared_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Log-probs (b, T) of the response tokens, their entropy (b, T) when asked, and the logits when kept.

    `chunk_size` > 0 applies the LM head in token chunks (verl.models.logprobs): the (b, T, V) fp32
    logits are never built and the memory stays flat in the response length. `chunk_size` == 0 or
    `keep_logits` (the full-distribution KL needs them) takes the plain full-logits path.
    `padding_free` packs the rows' real tokens into one sequence (verl.models.packing); values at
    padded response slots are then zeros, and every real slot equals the padded path's.
    `shared_prompt` runs each group's prompt once and its responses against the prompt's key/value
    cache (verl.models.shared_prompt); the values equal the plain path's.
    """
    if shared_prompt:
        return _shared_prompt_log_probs(model, micro, temperature, chunk_size, with_entropy, keep_logits)
    if chunk_size > 0 and not keep_logits:
        inputs, packed = _forward_inputs(model, micro, padding_free)
        reset_rope_cache(model)
        if packed is None:
            log_probs, entropy = response_log_probs(
                model, inputs, micro.batch["responses"], temperature, chunk_size, with_entropy
            )
            return log_probs, entropy, None
        device = inputs["input_ids"].device
        log_probs, entropy = selected_log_probs(
            model,
            inputs,
            packed.predictor_index.to(device),
            packed.response_tokens,
            temperature,
            chunk_size,
            with_entropy,
        )
        return packed.unpack(log_probs), (packed.unpack(entropy) if entropy is not None else None), None
    logits, tokens = forward_response_logits(model, micro, temperature, padding_free)
    log_probs = token_log_probs(logits, tokens)
    entropy = core_algos.entropy_from_logits(logits) if with_entropy else None
    if padding_free:  # zeros at padded slots, as on the chunked path
        padded_slots = ~micro.batch["attention_mask"][:, -tokens.shape[1] :].bool().to(log_probs.device)
        log_probs = log_probs.masked_fill(padded_slots, 0.0)
        entropy = entropy.masked_fill(padded_slots, 0.0) if entropy is not None else None
    return log_probs, entropy, (logits if keep_logits else None)


def _shared_prompt_log_probs(
    model: torch.nn.Module,
    micro: DataProto,
    temperature: float,
    chunk_size: int,
    with_entropy: bool,
    keep_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """forward_response_log_probs with each distinct prompt encoded once (see verl.models.shared_prompt)."""
    responses = micro.batch["responses"]
    batch, length = responses.shape
    prompt_length = micro.batch["input_ids"].shape[1] - length
    multimodal = micro.non_tensor_batch.get("multi_modal_inputs")
    multimodal = list(multimodal) if multimodal is not None else None
    groups = prompt_groups(
        micro.batch["input_ids"][:, :prompt_length], micro.batch["attention_mask"][:, :prompt_length], multimodal
    )
    # The images of the distinct prompts only: the prompt forward is the one that sees them.
    inputs, _ = _forward_inputs(model, micro, image_rows=groups.first_rows.tolist())
    device = inputs["input_ids"].device
    prompt_multimodal = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}
    reset_rope_cache(model)
    hidden, weight = shared_prompt_hidden(
        model,
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["position_ids"],
        length,
        groups,
        prompt_multimodal,
    )
    tokens = responses.to(device)
    if chunk_size > 0 and not keep_logits:
        log_probs, entropy = chunked_log_probs(
            hidden.reshape(batch * length, -1), weight, tokens.reshape(-1), temperature, chunk_size, with_entropy
        )
        return log_probs.view(batch, length), (entropy.view(batch, length) if entropy is not None else None), None
    logits = lm_head_logits(hidden, weight, temperature)
    entropy = core_algos.entropy_from_logits(logits) if with_entropy else None
    return token_log_probs(logits, tokens), entropy, (logits if keep_logits else None)


def count_prompt_forwards(micro: DataProto, shared_prompt: bool) -> int:
    """Prompt encodings one forward of `micro` runs: one per distinct prompt (`prompt_groups`) when
    shared, else one per row."""
    return len(prompt_run_starts(micro)) if shared_prompt else len(micro)


def _uses_gradient_checkpointing(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_gradient_checkpointing", False))


# Token-means over the valid response tokens of a mini-batch (the policy losses' metrics and the
# entropy), as opposed to the losses, which follow `loss_agg_mode`.
TOKEN_MEAN_METRICS = (
    "actor/ppo_kl",
    "actor/pg_clipfrac_higher",
    "actor/pg_clipfrac_lower",
    "actor/pg_clipfrac_dual",
    "actor/entropy",
    "actor/entropy_rollout",
)
# Each micro-batch reports these as its share of the whole mini-batch's value (its token or row sum
# divided by the mini-batch's count over all ranks), so summing the shares over micro-batches and
# ranks gives the mini-batch's value whatever the split: the logged metrics do not move with the
# micro-batch size, dynamic batching or the number of ranks. A mean of per-micro-batch means would.
ADDITIVE_METRICS = ("actor/loss", "actor/pg_loss", "actor/kl_loss", *TOKEN_MEAN_METRICS)


def _data_parallel_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class DataParallelActor:
    """Computes log-probs and updates the policy; `model` may be a plain module or FSDP-sharded."""

    def __init__(
        self,
        config: ActorConfig,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        ref_model: torch.nn.Module | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.optimizer = optimizer
        # Only the `full` KL estimator needs the reference model inside the update (full distributions).
        self.ref_model = ref_model
        self.policy_loss = core_algos.get_policy_loss(config.policy_loss)
        self.prompt_forwards = 0
        """Prompt encodings of the last `compute_log_probs` on this rank."""

    def _micro_batches(self, data: DataProto, micro_batch_size: int, keep_groups: bool) -> list[DataProto]:
        cfg = self.config
        return micro_batches(data, micro_batch_size, cfg.dynamic_batching, cfg.max_token_len_per_gpu, keep_groups)

    @torch.no_grad()
    def compute_log_probs(
        self, data: DataProto, temperature: float, micro_batch_size: int, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        was_training = self.model.training
        self.model.eval()
        log_probs, entropies = [], []
        shared = self.config.shares_prompts
        # Prompt encodings of this pass (perf/prompt_forwards_per_group): groups cut across
        # micro-batches or ranks encode their prompt once per piece.
        self.prompt_forwards = 0
        try:
            for micro in self._micro_batches(data, micro_batch_size, keep_groups=shared):
                self.prompt_forwards += count_prompt_forwards(micro, shared)
                micro_log_probs, entropy, _ = forward_response_log_probs(
                    self.model,
                    micro,
                    temperature,
                    self.config.logprob_chunk_size,
                    with_entropy,
                    padding_free=self.config.padding_free,
                    shared_prompt=shared,
                )
                log_probs.append(micro_log_probs.cpu())
                if with_entropy:
                    entropies.append(entropy.cpu())
        finally:
            self.model.train(was_training)
        return torch.cat(log_probs), (torch.cat(entropies) if with_entropy else None)

    def update_policy(self, data: DataProto, temperature: float, mini_batch_size: int) -> dict[str, Any]:
        """PPO epochs over mini-batches of `mini_batch_size` responses; one optimizer step per mini-batch.

        Without an `old_log_probs` column the batch is taken as on-policy: the old policy is the
        current one, so the detached log-probs of the update's own forward serve as the old ones
        (ratio exactly 1). That holds only for one epoch over one mini-batch, which is checked.

        Metrics: each mini-batch's value over its rows on every rank (token-means weighted by
        tokens, losses as `loss_agg_mode` weighs them; see ADDITIVE_METRICS), averaged over the
        update's mini-batches. For ADDITIVE_METRICS this is this rank's share, which the worker
        sums over ranks (fsdp_utils.all_reduce_metrics).
        """
        if self.optimizer is None:
            raise RuntimeError("update_policy needs an optimizer (this worker has no actor role)")
        cfg = self.config
        on_policy = "old_log_probs" not in data.batch
        if on_policy and (cfg.ppo_epochs != 1 or len(data) > mini_batch_size):
            raise ValueError(
                "update_policy: the batch has no old_log_probs, which is valid only on-policy (one PPO epoch and "
                f"one mini-batch per rollout batch); got ppo_epochs={cfg.ppo_epochs}, {len(data)} rows for "
                f"mini-batches of {mini_batch_size}: compute old_log_probs first"
            )
        self.model.train()
        # Whole groups in a micro-batch only where the update shares prompts.
        keep_groups = self._update_shares_prompts()
        metrics: dict[str, list[float]] = defaultdict(list)
        response_length = data.batch["responses"].shape[1]
        for _ in range(cfg.ppo_epochs):
            for mini in data.split(mini_batch_size):
                mask = mini.batch["response_mask"]
                # Normalise by the whole mini-batch (over all ranks) so accumulation equals one big batch.
                global_tokens = fsdp_utils.sum_across_ranks(float(mask.sum()))
                global_seqs = fsdp_utils.sum_across_ranks(float(len(mini)))
                agg = {"global_tokens": global_tokens, "global_seqs": global_seqs, "norm_length": response_length}
                self.optimizer.zero_grad(set_to_none=True)
                mini_metrics: dict[str, list[float]] = defaultdict(list)
                for micro in self._micro_batches(mini, cfg.micro_batch_size_per_device_for_update, keep_groups):
                    for key, value in self._accumulate_micro_batch(micro, temperature, agg).items():
                        mini_metrics[key].append(value)
                for key, values in mini_metrics.items():
                    # Shares of the mini-batch's value add up (ADDITIVE_METRICS); the rest
                    # (kl_coef) is the same in every micro-batch.
                    summed = key in ADDITIVE_METRICS
                    metrics[key].append(sum(values) if summed else sum(values) / len(values))
                grad_norm, stepped = clip_and_step(self.model.parameters(), self.optimizer, cfg.max_grad_norm)
                metrics["actor/skipped_steps"].append(float(not stepped))
                metrics["actor/grad_norm"].append(grad_norm)
        return {
            key: (float(sum(values)) if key == "actor/skipped_steps" else float(sum(values) / len(values)))
            for key, values in metrics.items()
        }

    def _update_shares_prompts(self) -> bool:
        """Whether the update's forwards (with gradients) share prompts: as configured, unless
        gradient checkpointing is on (transformers drops key/value caches under it in training) or
        the model's family cannot differentiate through its prompt cache (Qwen3.5's cache updates
        the linear-attention state in place); those run the plain path, while the no-grad passes
        (old and reference log-probs) still share prompts."""
        return (
            self.config.shares_prompts
            and not _uses_gradient_checkpointing(self.model)
            and family_of(self.model.config).shared_prompt_under_autograd
        )

    def _accumulate_micro_batch(self, micro: DataProto, temperature: float, agg: dict[str, float]) -> dict[str, float]:
        cfg = self.config
        mask = micro.batch["response_mask"].float()
        full_kl = cfg.use_kl_loss and cfg.kl_penalty == "full"
        log_probs, entropy, logits = forward_response_log_probs(
            self.model,
            micro,
            temperature,
            cfg.logprob_chunk_size,
            with_entropy=True,
            keep_logits=full_kl,
            padding_free=cfg.padding_free,
            shared_prompt=self._update_shares_prompts(),
        )
        device = log_probs.device
        mask = mask.to(device)
        on_policy = "old_log_probs" not in micro.batch
        # On-policy: the old policy is this very forward's (ratio exactly 1, gradient of the log-prob).
        old_log_probs = log_probs.detach() if on_policy else micro.batch["old_log_probs"].to(device)
        pg_loss, pg_metrics = self.policy_loss(
            old_log_probs=old_log_probs,
            log_probs=log_probs,
            advantages=micro.batch["advantages"].to(device),
            response_mask=mask,
            clip_ratio_low=cfg.clip_ratio_low,
            clip_ratio_high=cfg.clip_ratio_high,
            clip_ratio_dual=cfg.clip_ratio_dual,
            loss_agg_mode=cfg.loss_agg_mode,
            **agg,
        )
        loss = pg_loss
        if cfg.entropy_coeff != 0:
            # Left out of the graph otherwise, so the backward skips the entropy's gradient.
            loss = loss - cfg.entropy_coeff * core_algos.agg_loss(entropy, mask, cfg.loss_agg_mode, **agg)
        # The policy loss's metrics are token-means over this micro-batch: weighted by its share of
        # the mini-batch's valid tokens (over all ranks) they become additive (ADDITIVE_METRICS).
        token_share = float(mask.sum()) / max(agg["global_tokens"], 1.0)
        out = {f"actor/{k}": float(v) * token_share for k, v in pg_metrics.items()}
        unknown = sorted(set(out) - set(TOKEN_MEAN_METRICS))
        if unknown:
            raise ValueError(f"policy loss {cfg.policy_loss!r} returned metrics {unknown}, not in TOKEN_MEAN_METRICS")
        out["actor/pg_loss"] = float(pg_loss.detach())
        out["actor/entropy"] = float((entropy.detach() * mask).sum()) / max(agg["global_tokens"], 1.0)
        if on_policy:
            # What the trainer reports as actor/entropy_rollout from the skipped old-log-prob pass:
            # the same policy, so the same value.
            out["actor/entropy_rollout"] = out["actor/entropy"]
        if cfg.use_kl_loss:
            kl = self._kl_to_reference(micro, log_probs, logits, temperature)
            kl_loss = core_algos.agg_loss(kl, mask, cfg.loss_agg_mode, **agg)
            loss = loss + cfg.kl_coef * kl_loss
            out["actor/kl_loss"] = float(kl_loss.detach())
            out["actor/kl_coef"] = cfg.kl_coef
        # Data-parallel gradient reduction averages over ranks, while the loss above is already
        # normalised by the global count: scale back up so the result is the full-batch gradient.
        (loss * _data_parallel_size()).backward()
        out["actor/loss"] = float(loss.detach())
        return out

    def _kl_to_reference(
        self, micro: DataProto, log_probs: torch.Tensor, logits: torch.Tensor | None, temperature: float
    ) -> torch.Tensor:
        if self.config.kl_penalty == "full":
            if self.ref_model is None:
                raise RuntimeError("algorithm.kl_penalty=full needs the reference model inside the actor update")
            with torch.no_grad():
                ref_logits, _ = forward_response_logits(self.ref_model, micro, temperature, self.config.padding_free)
            return core_algos.full_kl(logits, ref_logits)
        ref_log_probs = micro.batch["ref_log_probs"].to(log_probs.device)
        return core_algos.kl_penalty(log_probs, ref_log_probs, self.config.kl_penalty)
