"""The RL algorithms as pure tensor functions: advantages, policy losses, loss aggregation and KL.

Everything here takes tensors (and numpy group ids) with plain arguments and returns tensors, so it
runs the same on the driver and in workers and is tested by hand-computed cases.

Shapes: B responses, T response tokens. `response_mask` (B, T) marks valid response tokens (padding
is on the right). `index` is a numpy array (B,) of group ids: the responses sampled for one prompt
share an id (any hashable value, e.g. a uid string).

Advantage estimators and policy losses live in registries (`get_adv_estimator`, `get_policy_loss`),
so the config names one by string and new ones need only a decorated function.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

# --------------------------------------------------------------------------- helpers


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over entries where `mask` is set (over all entries, or along `dim`).

    An empty mask gives 0 instead of NaN, so a response without valid tokens contributes nothing.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Shift and scale `x` to mean 0 and variance 1 over the masked entries; masked-out entries become 0.

    The variance is the population variance (mean of squared deviations) of the masked entries.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension, H = logsumexp(z) - sum_v p_v z_v (no log(0))."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def _group_ids(index: np.ndarray) -> Tensor:
    """Map each group id (any hashable) to a dense integer 0..G-1, in order of first appearance."""
    dense: dict = {}
    return torch.tensor([dense.setdefault(key, len(dense)) for key in np.asarray(index).tolist()], dtype=torch.long)


def _group_stats(scores: Tensor, index: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """Per-response (group mean, group unbiased std, group size), each (B,); a group of one has std 0."""
    if len(index) != len(scores):
        raise ValueError(f"index has {len(index)} group ids but there are {len(scores)} scores")
    gid = _group_ids(index).to(scores.device)
    n_groups = int(gid.max()) + 1
    zeros = scores.new_zeros(n_groups)
    size = zeros.index_add(0, gid, torch.ones_like(scores))
    mean = zeros.index_add(0, gid, scores) / size
    sq_dev = zeros.index_add(0, gid, (scores - mean[gid]) ** 2)
    std = (sq_dev / (size - 1).clamp(min=1)).sqrt()
    return mean[gid], std[gid], size[gid]


def _group_normalized(scores: Tensor, index: np.ndarray, norm_by_std: bool, eps: float) -> Tensor:
    """(score - group mean), divided by (group std + eps) when `norm_by_std`; 0 for a group of one."""
    mean, std, _ = _group_stats(scores, index)
    adv = scores - mean  # a lone response is its own mean: advantage 0
    return adv / (std + eps) if norm_by_std else adv


def _sequence_scores(token_level_rewards: Tensor, response_mask: Tensor) -> Tensor:
    return (token_level_rewards.float() * response_mask.float()).sum(-1)


def _discounted_returns(token_level_rewards: Tensor, response_mask: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + gamma * G_{t+1} over valid tokens; rewards on masked tokens are ignored, returns there are 0."""
    mask = response_mask.float()
    rewards = token_level_rewards.float() * mask
    returns = torch.zeros_like(rewards)
    running = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


# --------------------------------------------------------------------------- advantage estimators

AdvantageEstimator = Callable[..., tuple[Tensor, Tensor]]
ADV_ESTIMATORS: dict[str, AdvantageEstimator] = {}


def register_adv_estimator(name: str) -> Callable[[AdvantageEstimator], AdvantageEstimator]:
    """Decorator adding an estimator under `name`.

    Every estimator takes the keywords (token_level_rewards, response_mask, index, gamma=1.0,
    reward_baselines=None, eps=1e-6), ignores those it does not use, and returns
    (advantages, returns), both (B, T) and 0 on masked tokens.
    """

    def decorator(fn: AdvantageEstimator) -> AdvantageEstimator:
        if name in ADV_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is registered twice")
        ADV_ESTIMATORS[name] = fn
        return fn

    return decorator


def get_adv_estimator(name: str) -> AdvantageEstimator:
    if name not in ADV_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; valid names: {', '.join(sorted(ADV_ESTIMATORS))}")
    return ADV_ESTIMATORS[name]


@register_adv_estimator("grpo")
def grpo_advantages(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray,
    gamma: float = 1.0,
    reward_baselines: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """GRPO: (score - group mean) / (group std + eps) on every valid token.

    The std is the unbiased one (divides by n - 1, like torch.std). A group of one response gets 0.
    """
    scores = _sequence_scores(token_level_rewards, response_mask)
    adv = _group_normalized(scores, index, norm_by_std=True, eps=eps)[:, None] * response_mask.float()
    return adv, adv


@register_adv_estimator("dr_grpo")
def dr_grpo_advantages(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray,
    gamma: float = 1.0,
    reward_baselines: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Dr. GRPO: score - group mean, not divided by the std (avoids up-weighting near-uniform groups)."""
    scores = _sequence_scores(token_level_rewards, response_mask)
    adv = _group_normalized(scores, index, norm_by_std=False, eps=eps)[:, None] * response_mask.float()
    return adv, adv


@register_adv_estimator("rloo")
def rloo_advantages(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray,
    gamma: float = 1.0,
    reward_baselines: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """RLOO: score minus the mean score of the *other* responses in the group, n/(n-1) * (score - mean).

    A group of one response gets 0.
    """
    scores = _sequence_scores(token_level_rewards, response_mask)
    mean, _, size = _group_stats(scores, index)
    adv = (scores - mean) * size / (size - 1).clamp(min=1)  # a lone response is its own mean: 0
    adv = adv[:, None] * response_mask.float()
    return adv, adv


@register_adv_estimator("reinforce_plus_plus")
def reinforce_plus_plus_advantages(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray,
    gamma: float = 1.0,
    reward_baselines: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++: discounted per-token returns, whitened over all valid tokens of the batch."""
    returns = _discounted_returns(token_level_rewards, response_mask, gamma)
    return masked_whiten(returns, response_mask, eps), returns


@register_adv_estimator("remax")
def remax_advantages(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray,
    gamma: float = 1.0,
    reward_baselines: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """ReMax: per-token returns minus the score of the greedy response to the same prompt (`reward_baselines`)."""
    if reward_baselines is None:
        raise ValueError("remax needs reward_baselines: the score of each prompt's greedy response, shape (B,)")
    returns = _discounted_returns(token_level_rewards, response_mask, gamma)
    adv = (returns - reward_baselines.float()[:, None]) * response_mask.float()
    return adv, returns


def compute_decoupled_advantages(
    component_scores: dict[str, Tensor],
    weights: dict[str, float],
    response_mask: Tensor,
    index: np.ndarray,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Multi-reward advantages: normalise each reward component within its group, then take the weighted sum.

    Unlike normalising the summed reward, a component that varies little inside a group is not drowned
    out by one that varies a lot. Components without a weight are ignored. Returns (B, T).
    """
    if not weights:
        raise ValueError("compute_decoupled_advantages: weights is empty; name at least one reward component")
    missing = [name for name in weights if name not in component_scores]
    if missing:
        raise ValueError(
            f"compute_decoupled_advantages: reward components {missing} have weights but no scores "
            f"(scores given: {sorted(component_scores)})"
        )
    adv = sum(
        weight * _group_normalized(component_scores[name].float(), index, norm_by_std, eps)
        for name, weight in weights.items()
    )
    return adv[:, None] * response_mask.float()


def informative_groups(scores: Tensor | np.ndarray, index: np.ndarray) -> np.ndarray:
    """DAPO dynamic sampling: True for responses whose group scores are not all identical.

    Groups where every response scored the same (all right or all wrong) have zero advantage and
    only dilute the batch. Returns a bool array (B,).
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).cpu()
    gid = _group_ids(index)
    n_groups = int(gid.max()) + 1
    # Compare max and min exactly: a float mean/std could leave a tiny nonzero spread for equal scores.
    high = scores.new_zeros(n_groups).scatter_reduce(0, gid, scores, "amax", include_self=False)
    low = scores.new_zeros(n_groups).scatter_reduce(0, gid, scores, "amin", include_self=False)
    return (high != low)[gid].numpy()


# --------------------------------------------------------------------------- loss aggregation

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def agg_loss(
    loss_mat: Tensor,
    loss_mask: Tensor,
    loss_agg_mode: str,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
    norm_length: int | None = None,
) -> Tensor:
    """Reduce a per-token loss (B, T) to a scalar.

    - token-mean: sum over valid tokens / number of valid tokens.
    - seq-mean-token-sum: per-sequence token sum, mean over sequences.
    - seq-mean-token-mean: per-sequence token mean, mean over sequences.
    - seq-mean-token-sum-norm: per-sequence token sum / `norm_length` (the max response length), mean
      over sequences.

    With gradient accumulation, pass the whole batch's valid-token count as `global_tokens` (token-mean)
    or its sequence count as `global_seqs` (seq-mean modes): the micro-batch losses then sum to exactly
    the full-batch loss.
    """
    mask = loss_mask.to(loss_mat.dtype)
    masked = loss_mat * mask
    if loss_agg_mode == "token-mean":
        denom = global_tokens if global_tokens is not None else mask.sum().clamp(min=1)
        return masked.sum() / denom
    if loss_agg_mode == "seq-mean-token-sum":
        per_seq = masked.sum(-1)
    elif loss_agg_mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1)
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        if norm_length is None:
            raise ValueError("agg_loss: seq-mean-token-sum-norm needs norm_length (the max response length)")
        per_seq = masked.sum(-1) / norm_length
    else:
        raise ValueError(f"agg_loss: unknown loss_agg_mode {loss_agg_mode!r}; valid modes: {', '.join(LOSS_AGG_MODES)}")
    denom = global_seqs if global_seqs is not None else per_seq.shape[0]
    return per_seq.sum() / denom


# --------------------------------------------------------------------------- policy losses

PolicyLoss = Callable[..., tuple[Tensor, dict[str, float]]]
POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    """Decorator adding a policy loss under `name`; all share the signature of `compute_policy_loss`."""

    def decorator(fn: PolicyLoss) -> PolicyLoss:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is registered twice")
        POLICY_LOSSES[name] = fn
        return fn

    return decorator


def get_policy_loss(name: str) -> PolicyLoss:
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; valid names: {', '.join(sorted(POLICY_LOSSES))}")
    return POLICY_LOSSES[name]


def _clipped_surrogate(
    log_ratio: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_dual: float,
) -> tuple[Tensor, dict[str, float]]:
    """Per-token PPO loss max(-A r, -A clip(r, 1-low, 1+high)), bounded by dual clip for A < 0."""
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))  # the clamp only guards exp against overflow
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped_higher = (ratio > 1.0 + clip_ratio_high) & (advantages > 0)
    clipped_lower = (ratio < 1.0 - clip_ratio_low) & (advantages < 0)
    dual_active = torch.zeros_like(clipped_lower)
    if clip_ratio_dual > 1.0:
        # For A < 0 a huge ratio would make the loss unbounded; cap it at c * |A| (a constant: no gradient).
        dual_bound = -advantages * clip_ratio_dual
        dual_active = (advantages < 0) & (loss > dual_bound)
        loss = torch.where(dual_active, dual_bound, loss)
    metrics = {
        "pg_clipfrac_higher": masked_mean(clipped_higher.float(), response_mask).item(),
        "pg_clipfrac_lower": masked_mean(clipped_lower.float(), response_mask).item(),
        "pg_clipfrac_dual": masked_mean(dual_active.float(), response_mask).item(),
    }
    return loss, metrics


@register_policy_loss("ppo")
def compute_policy_loss(
    old_log_probs: Tensor,
    log_probs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_dual: float,
    loss_agg_mode: str,
    **agg_kwargs: float | int | None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate with a token-level ratio exp(logp - old_logp).

    Clip-higher: the ratio is clipped to [1 - clip_ratio_low, 1 + clip_ratio_high]. Dual clip: for
    A < 0 the loss is at most clip_ratio_dual * |A| (off when clip_ratio_dual <= 1). `agg_kwargs`
    go to `agg_loss`. Metrics: fractions of valid tokens clipped above, below and by dual clip, and
    `ppo_kl`, the mean of old_logp - logp over valid tokens.
    """
    loss_mat, metrics = _clipped_surrogate(
        log_probs - old_log_probs, advantages, response_mask, clip_ratio_low, clip_ratio_high, clip_ratio_dual
    )
    metrics["ppo_kl"] = masked_mean((old_log_probs - log_probs).detach(), response_mask).item()
    return agg_loss(loss_mat, response_mask, loss_agg_mode, **agg_kwargs), metrics


@register_policy_loss("gspo")
def compute_gspo_policy_loss(
    old_log_probs: Tensor,
    log_probs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_dual: float,
    loss_agg_mode: str,
    **agg_kwargs: float | int | None,
) -> tuple[Tensor, dict[str, float]]:
    """GSPO (token form): the clipped surrogate of `compute_policy_loss` with a sequence-level ratio.

    s_i = exp(mean over valid tokens of logp - old_logp). Each token uses
    s_i,t = sg[s_i] * p_t / sg[p_t]: its value is s_i and, with the same advantage on every token of a
    sequence, its gradient equals that of the sequence-level objective. GSPO uses much smaller clip
    ranges than PPO (about 3e-4 / 4e-4) and seq-mean-token-mean aggregation.
    """
    token_log_ratio = log_probs - old_log_probs
    seq_log_ratio = masked_mean(token_log_ratio, response_mask, dim=-1)
    log_ratio = seq_log_ratio.detach()[:, None] + log_probs - log_probs.detach()
    loss_mat, metrics = _clipped_surrogate(
        log_ratio, advantages, response_mask, clip_ratio_low, clip_ratio_high, clip_ratio_dual
    )
    metrics["ppo_kl"] = masked_mean(-token_log_ratio.detach(), response_mask).item()
    return agg_loss(loss_mat, response_mask, loss_agg_mode, **agg_kwargs), metrics


# --------------------------------------------------------------------------- KL

KL_MODES = ("kl", "abs", "mse", "low_var_kl", "full")


def kl_penalty(log_probs: Tensor, ref_log_probs: Tensor, mode: str) -> Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs, (B, T).

    kl: logp - ref (k1); abs: |logp - ref|; mse: 0.5 (logp - ref)^2 (k2);
    low_var_kl: exp(ref - logp) - (ref - logp) - 1 (k3, unbiased and >= 0), clamped to [-10, 10].
    """
    diff = log_probs.float() - ref_log_probs.float()
    if mode == "kl":
        return diff
    if mode == "abs":
        return diff.abs()
    if mode == "mse":
        return 0.5 * diff.square()
    if mode == "low_var_kl":
        log_ratio = (-diff).clamp(-20.0, 20.0)  # guards exp against overflow
        return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-10.0, 10.0)
    if mode == "full":
        raise ValueError("kl_penalty: mode 'full' needs whole distributions; call full_kl(logits, ref_logits)")
    raise ValueError(f"kl_penalty: unknown mode {mode!r}; valid modes: {', '.join(KL_MODES)}")


def full_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Exact KL(p || q) = sum_v p_v (log p_v - log q_v) per token from logits (B, T, V); returns (B, T)."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    log_q = torch.log_softmax(ref_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def apply_kl_penalty(
    token_level_scores: Tensor,
    log_probs: Tensor,
    ref_log_probs: Tensor,
    response_mask: Tensor,
    kl_coef: float,
    mode: str,
) -> tuple[Tensor, float]:
    """KL in the reward: rewards = scores - kl_coef * kl on valid tokens (0 elsewhere).

    Also returns the mean KL: the per-sequence masked mean, averaged over sequences.
    """
    mask = response_mask.float()
    kl = kl_penalty(log_probs, ref_log_probs, mode) * mask
    rewards = (token_level_scores.float() - kl_coef * kl) * mask
    mean_kl = masked_mean(kl, mask, dim=-1).mean().item()
    return rewards, mean_kl


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt; present so both controllers are used the same way."""


class AdaptiveKLController:
    """Proportional controller steering the observed KL towards `target_kl` (Ziegler et al., 2019).

    Each update multiplies the coefficient by 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: float) -> None:
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController: target_kl ({target_kl}) and horizon ({horizon}) must be positive")
        self.value = init_kl_coef
        self.target_kl = target_kl
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = float(np.clip(current_kl / self.target_kl - 1.0, -0.2, 0.2))
        self.value *= 1.0 + error * n_steps / self.horizon


KL_CONTROLLERS = ("fixed", "adaptive")


def get_kl_controller(
    kl_type: str, kl_coef: float, target_kl: float, horizon: float
) -> FixedKLController | AdaptiveKLController:
    """`fixed` keeps `kl_coef`; `adaptive` starts from it and steers towards `target_kl`."""
    if kl_type == "fixed":
        return FixedKLController(kl_coef)
    if kl_type == "adaptive":
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    raise ValueError(f"get_kl_controller: unknown kl_type {kl_type!r}; valid types: {', '.join(KL_CONTROLLERS)}")
