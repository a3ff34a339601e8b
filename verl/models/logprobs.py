"""Memory-bounded token log-probs and entropy, without full-vocabulary logits for a whole micro-batch.

The plain way to score responses runs the LM head on every response position, upcasts the
(b, T, V) logits to fp32 and takes a log-softmax; with Qwen's 151,657-token vocabulary that tensor
and its softmax/gradient copies dominate the actor's memory and grow with the response length.
Here the LM head's input hidden states are captured instead (a forward pre-hook on the output
embedding, so the model itself computes zero-length logits), and the head is applied in chunks of
tokens inside one autograd Function that keeps no logits: the backward recomputes each chunk's.
Peak extra memory is then a few (chunk_size, V) fp32 buffers, whatever the response length.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 256


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 ones (so gradcheck can run in double precision)."""
    return torch.promote_types(dtype, torch.float32)


def lm_head_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., H) x (V, H) -> (..., V) tempered logits in the compute dtype.

    The product is taken in the weight's dtype, as the model's own `lm_head` would (a bf16 model
    gives bf16 logits), and only then upcast: the result matches `model(...).logits.float()`.
    """
    logits = F.linear(hidden.to(weight.dtype), weight).to(_compute_dtype(weight.dtype))
    if temperature > 0:
        logits.div_(temperature)
    return logits


class ChunkedLogProbs(torch.autograd.Function):
    """Log-probs (and optionally entropy) of `tokens` under softmax(hidden @ weight.T / temperature).

    Forward and backward walk the N tokens in chunks of `chunk_size`; the (chunk, V) logits of one
    chunk exist at a time and are never saved. Saved for backward: hidden, weight, tokens and the
    per-token log-sum-exp and entropy (2 x N floats).

    An output that does not reach the loss gets no gradient at all (None, not zeros), so with
    entropy reported but left out of the loss (entropy_coeff 0) the backward does exactly the work
    of a log-prob-only backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        tokens: torch.Tensor,
        temperature: float,
        chunk_size: int,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = hidden.shape[0]
        out_dtype = _compute_dtype(weight.dtype)
        log_probs = hidden.new_empty(n, dtype=out_dtype)
        lse = hidden.new_empty(n, dtype=out_dtype)
        entropy = hidden.new_empty(n, dtype=out_dtype) if with_entropy else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = lm_head_logits(hidden[start:end], weight, temperature)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            lse[start:end] = chunk_lse
            log_probs[start:end] = logits.gather(1, tokens[start:end, None]).squeeze(1) - chunk_lse
            if with_entropy:
                # H = -sum p log p, with log p = z - lse computed in place over the logits.
                logits.sub_(chunk_lse[:, None])
                entropy[start:end] = -logits.exp().mul_(logits).sum(-1)
            # Free this chunk's logits before the next chunk's are made.
            del logits
        # Autograd would otherwise hand a zeros tensor for an unused output and the backward would
        # spend (chunk, V) work per chunk on the entropy's gradient of a loss without entropy.
        ctx.set_materialize_grads(False)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(hidden, weight, tokens, lse, entropy if with_entropy else lse.new_empty(0))
        ctx.with_entropy = with_entropy
        return log_probs, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_log_probs: torch.Tensor | None, grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        hidden, weight, tokens, lse, entropy = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        if not ctx.with_entropy:
            grad_entropy = None
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_log_probs is None and grad_entropy is None) or not (need_hidden or need_weight):
            return None, None, None, None, None, None
        compute = _compute_dtype(weight.dtype)
        scale = 1.0 / temperature if temperature > 0 else 1.0
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Accumulated over chunks in (at least) fp32, cast to the weight's dtype once at the end.
        grad_weight = torch.zeros(weight.shape, dtype=compute, device=weight.device) if need_weight else None
        n = hidden.shape[0]
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            chunk_lse = lse[start:end, None]
            # log p, in place over the recomputed logits; this buffer becomes d(loss)/d(logits).
            grad = lm_head_logits(hidden[start:end], weight, temperature).sub_(chunk_lse)
            if grad_entropy is not None:
                probs = grad.exp()
                # dH/dz = -p * (log p + H)
                grad.add_(entropy[start:end, None]).mul_(probs).mul_(-grad_entropy[start:end, None].to(compute))
                if grad_log_probs is not None:
                    # d log p_y / dz = onehot(y) - p
                    grad.sub_(probs.mul_(grad_log_probs[start:end, None].to(compute)))
                del probs
            else:
                grad.exp_().mul_(-grad_log_probs[start:end, None].to(compute))
            if grad_log_probs is not None:
                grad.scatter_add_(1, tokens[start:end, None], grad_log_probs[start:end, None].to(compute))
            if scale != 1.0:
                grad.mul_(scale)
            if grad_hidden is not None:
                grad_hidden[start:end] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad.t(), hidden[start:end].to(compute))
            del grad
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each token, and optionally the entropy, under an unbiased linear LM head.

    Args:
        hidden: (N, H) hidden states that feed the LM head (bf16, fp16, fp32 or fp64).
        weight: (V, H) the LM head's weight (tied embeddings are fine; gradients reach it).
        tokens: (N,) int64 token ids in [0, V).
        temperature: the logits are divided by it when > 0 (as in sampling); <= 0 leaves them as they are.
        chunk_size: tokens per chunk; peak extra memory is about 2-3 x chunk_size x V fp32 values.
        with_entropy: also return the entropy of each tempered distribution.

    Returns:
        log_probs: (N,) log softmax(hidden @ weight.T / temperature)[token], in fp32 (fp64 for fp64 inputs).
        entropy: (N,) in the same dtype, or None when `with_entropy` is False.

    Logits are computed in the weight's dtype and upcast per chunk, matching `lm_head(x).float()`.
    Gradients (for hidden and weight) come back in the inputs' dtypes; the weight gradient is
    accumulated over chunks in fp32.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or tokens.dim() != 1:
        raise ValueError(
            f"chunked_log_probs expects hidden (N, H), weight (V, H), tokens (N,); got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(tokens.shape)}"
        )
    if hidden.shape[0] != tokens.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"chunked_log_probs: shapes disagree: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"tokens {tuple(tokens.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return ChunkedLogProbs.apply(hidden, weight, tokens.long(), float(temperature), int(chunk_size), with_entropy)


@dataclass
class LMHeadInput:
    """What the LM head was called with: its input hidden states and the weight it would have used."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    weight: list[torch.Tensor] = field(default_factory=list)

    def single(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The hidden states (b, k, H) and weight (V, H) of the one LM head call; raises if there was not exactly one."""
        if len(self.hidden) != 1:
            raise RuntimeError(f"expected the LM head to run once inside the forward, it ran {len(self.hidden)} times")
        return self.hidden[0], self.weight[0]


def output_embedding(model: torch.nn.Module) -> torch.nn.Module:
    """The model's LM head; raises unless it is a bias-free linear map with a (V, H) weight."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
        raise TypeError(f"{type(model).__name__} has no linear output embedding (LM head) with a 2-D weight")
    if getattr(head, "bias", None) is not None:
        raise ValueError(
            f"{type(model).__name__}'s LM head has a bias; chunked log-probs support only bias-free heads (as in Qwen)"
        )
    return head


@contextmanager
def capture_lm_head_input(model: torch.nn.Module) -> Iterator[LMHeadInput]:
    """Inside the block, the LM head records its input and computes logits for zero positions.

    A public forward pre-hook on `model.get_output_embeddings()` stores the hidden states it is
    given (after the model's own `logits_to_keep` slicing) and the head's weight as seen at call
    time (the gathered one under sharding), then hands the head `hidden[..., :0, :]`, so the model's
    output logits are (b, 0, V) and cost nothing. Gradients flow through the recorded hidden states
    as usual. Do not pass `labels` inside the block: the model's own loss needs real logits.
    """
    head = output_embedding(model)
    captured = LMHeadInput()

    def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        (hidden,) = args
        captured.hidden.append(hidden)
        captured.weight.append(module.weight)
        return (hidden[..., :0, :],)

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield captured
    finally:
        handle.remove()


def response_log_probs(
    model: torch.nn.Module,
    forward_kwargs: dict[str, Any],
    responses: torch.Tensor,
    temperature: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (b, T) of the response tokens (the last T of the sequence), and optionally entropy (b, T).

    `forward_kwargs` are the model's inputs (input_ids, attention_mask, position_ids, use_cache,
    multimodal tensors); `logits_to_keep=T + 1` is added so the model keeps the hidden states of
    the last T + 1 positions, of which the first T predict the responses. Values match
    `log_softmax(model(...).logits[:, :-1].float() / temperature)` gathered at `responses`, but the
    full (b, T, V) logits are never built; see `chunked_log_probs` for dtypes and memory.
    """
    if "logits_to_keep" in forward_kwargs or "labels" in forward_kwargs:
        raise ValueError("response_log_probs sets logits_to_keep itself and cannot take labels")
    batch, length = responses.shape
    with capture_lm_head_input(model) as captured:
        model(**forward_kwargs, logits_to_keep=length + 1)
    hidden, weight = captured.single()
    if hidden.shape[:2] != (batch, length + 1):
        raise RuntimeError(
            f"the LM head saw hidden states {tuple(hidden.shape)}, expected ({batch}, {length + 1}, H): "
            "does this model honour logits_to_keep?"
        )
    hidden = hidden[:, :-1, :].reshape(batch * length, hidden.shape[-1])
    tokens = responses.to(hidden.device).reshape(-1)
    log_probs, entropy = chunked_log_probs(hidden, weight, tokens, temperature, chunk_size, with_entropy)
    return log_probs.view(batch, length), (entropy.view(batch, length) if entropy is not None else None)


def selected_log_probs(
    model: torch.nn.Module,
    forward_kwargs: dict[str, Any],
    predictor_index: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (M,) of `tokens` predicted at sequence positions `predictor_index` of a one-row forward.

    For packed (padding-free) inputs (verl.models.packing): `forward_kwargs` hold one (1, N)
    sequence and the model keeps the hidden states of the M predicting positions only
    (`logits_to_keep` given as indices). Same values, dtypes and memory bound as `response_log_probs`.
    """
    if "logits_to_keep" in forward_kwargs or "labels" in forward_kwargs:
        raise ValueError("selected_log_probs sets logits_to_keep itself and cannot take labels")
    with capture_lm_head_input(model) as captured:
        model(**forward_kwargs, logits_to_keep=predictor_index)
    hidden, weight = captured.single()
    if hidden.shape[:2] != (1, predictor_index.numel()):
        raise RuntimeError(
            f"the LM head saw hidden states {tuple(hidden.shape)}, expected (1, {predictor_index.numel()}, H): "
            "does this model honour logits_to_keep given as indices?"
        )
    return chunked_log_probs(hidden[0], weight, tokens.to(hidden.device), temperature, chunk_size, with_entropy)
