"""Hand-computed cases for verl.algorithms.core_algos (expected numbers are worked out in the comments)."""

import math

import numpy as np
import pytest
import torch

from verl.algorithms import core_algos as ca

# --------------------------------------------------------------------------- advantage estimators


def _rewards_at_last_token(scores: list[float], lengths: list[int], T: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rewards (B, T) with each score on the response's last valid token, and the mask."""
    rewards = torch.zeros(len(scores), T)
    mask = torch.zeros(len(scores), T)
    for i, (score, length) in enumerate(zip(scores, lengths)):
        mask[i, :length] = 1
        rewards[i, length - 1] = score
    return rewards, mask


# Group "a": scores [1, 0, 0, 1]; group "b": [2, 0]; group "c": a single response.
GROUP_SCORES = [1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 5.0]
GROUP_LENGTHS = [3, 2, 1, 3, 2, 3, 1]
GROUP_INDEX = np.array(["a", "a", "a", "a", "b", "b", "c"], dtype=object)


def _check_sequence_advantages(adv: torch.Tensor, mask: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(adv, torch.tensor(expected)[:, None] * mask, atol=1e-5, rtol=0)


def test_grpo_hand_case():
    rewards, mask = _rewards_at_last_token(GROUP_SCORES, GROUP_LENGTHS)
    # a: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / 0.57735 = +-0.866025
    # b: mean 1, unbiased std sqrt(2 / 1) = 1.41421 -> +-0.707107; c: a group of one -> 0
    adv, returns = ca.get_adv_estimator("grpo")(token_level_rewards=rewards, response_mask=mask, index=GROUP_INDEX)
    _check_sequence_advantages(adv, mask, [0.866025, -0.866025, -0.866025, 0.866025, 0.707107, -0.707107, 0.0])
    torch.testing.assert_close(returns, adv)


def test_grpo_sums_rewards_over_valid_tokens_only():
    # Scores 0.5 + 0.5 = 1 and 0; the reward 7 sits on a padding token and must be ignored.
    rewards = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    adv, _ = ca.grpo_advantages(rewards, mask, np.array([0, 0]))
    # mean 0.5, unbiased std 0.707107 -> +-0.707107
    _check_sequence_advantages(adv, mask, [0.707107, -0.707107])


def test_dr_grpo_hand_case():
    rewards, mask = _rewards_at_last_token(GROUP_SCORES, GROUP_LENGTHS)
    adv, _ = ca.get_adv_estimator("dr_grpo")(token_level_rewards=rewards, response_mask=mask, index=GROUP_INDEX)
    # score - group mean, no std: a: +-0.5, b: +-1, c: 0
    _check_sequence_advantages(adv, mask, [0.5, -0.5, -0.5, 0.5, 1.0, -1.0, 0.0])


def test_rloo_hand_case():
    rewards, mask = _rewards_at_last_token(GROUP_SCORES, GROUP_LENGTHS)
    adv, _ = ca.get_adv_estimator("rloo")(token_level_rewards=rewards, response_mask=mask, index=GROUP_INDEX)
    # a: 1 - mean(0, 0, 1) = 2/3, 0 - mean(1, 0, 1) = -2/3; b: 2 - 0 = 2, 0 - 2 = -2; c: 0
    _check_sequence_advantages(adv, mask, [2 / 3, -2 / 3, -2 / 3, 2 / 3, 2.0, -2.0, 0.0])


def test_reinforce_plus_plus_hand_case():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, returns = ca.get_adv_estimator("reinforce_plus_plus")(
        token_level_rewards=rewards, response_mask=mask, index=np.array([0, 1]), gamma=0.5
    )
    # gamma 0.5: row 0 returns [0.25, 0.5, 1], row 1 [1, 2, (masked) 0]
    torch.testing.assert_close(returns, torch.tensor([[0.25, 0.5, 1.0], [1.0, 2.0, 0.0]]))
    # valid returns [0.25, 0.5, 1, 1, 2]: mean 0.95, variance 1.8 / 5 = 0.36, std 0.6
    expected = torch.tensor([[-0.7, -0.45, 0.05], [0.05, 1.05, 0.0]]) / 0.6
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_remax_hand_case():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    remax = ca.get_adv_estimator("remax")
    adv, returns = remax(
        token_level_rewards=rewards,
        response_mask=mask,
        index=np.array([0, 1]),
        reward_baselines=torch.tensor([0.5, 3.0]),
    )
    # gamma 1: returns are reverse cumulative sums [1, 1, 1] and [2, 2, 0]; minus baselines 0.5 and 3
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.5], [-1.0, -1.0, 0.0]]))
    with pytest.raises(ValueError, match="reward_baselines"):
        remax(token_level_rewards=rewards, response_mask=mask, index=np.array([0, 1]))


@pytest.mark.parametrize("name", sorted(ca.ADV_ESTIMATORS))
def test_every_estimator_shares_the_signature_and_zeroes_padding(name):
    rewards, mask = _rewards_at_last_token(GROUP_SCORES, GROUP_LENGTHS)
    adv, returns = ca.get_adv_estimator(name)(
        token_level_rewards=rewards,
        response_mask=mask,
        index=GROUP_INDEX,
        gamma=1.0,
        reward_baselines=torch.full((len(GROUP_SCORES),), 0.25),
        eps=1e-6,
    )
    assert adv.shape == returns.shape == mask.shape
    assert torch.all(adv[mask == 0] == 0) and torch.all(returns[mask == 0] == 0)
    assert adv[mask == 1].abs().sum() > 0


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(ValueError, match="grpo.*rloo"):
        ca.get_adv_estimator("ppo_gae")


def test_registering_a_name_twice_fails():
    with pytest.raises(ValueError, match="twice"):
        ca.register_adv_estimator("grpo")(ca.grpo_advantages)


# --------------------------------------------------------------------------- decoupled advantages and filtering


def test_decoupled_differs_from_summed():
    index = np.array(["q"] * 4)
    mask = torch.ones(4, 2)
    accuracy = torch.tensor([1.0, 0.0, 1.0, 0.0])
    fmt = torch.tensor([0.0, 0.0, 0.1, 0.1])
    # accuracy: mean 0.5, std 0.57735 -> [.866, -.866, .866, -.866]
    # format: mean 0.05, std sqrt(4 * 0.0025 / 3) = 0.057735 -> [-.866, -.866, .866, .866]
    decoupled = ca.compute_decoupled_advantages(
        {"accuracy": accuracy, "format": fmt}, {"accuracy": 1.0, "format": 1.0}, mask, index
    )
    torch.testing.assert_close(
        decoupled, torch.tensor([0.0, -1.732051, 1.732051, 0.0])[:, None] * mask, atol=1e-4, rtol=0
    )
    # summed: overall [1, 0, 1.1, 0.1], mean 0.55, std sqrt(1.01 / 3) = 0.580230
    summed, _ = ca.grpo_advantages(torch.stack([accuracy + fmt, torch.zeros(4)], dim=1), mask, index)
    torch.testing.assert_close(
        summed, torch.tensor([0.775555, -0.947900, 0.947900, -0.775555])[:, None] * mask, atol=1e-4, rtol=0
    )


def test_decoupled_weights_and_no_std():
    index = np.array([0, 0])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    scores = {
        "accuracy": torch.tensor([1.0, 0.0]),
        "visual": torch.tensor([0.0, 1.0]),
        "unused": torch.tensor([9.0, 0.0]),
    }
    adv = ca.compute_decoupled_advantages(scores, {"accuracy": 0.9, "visual": 0.5}, mask, index, norm_by_std=False)
    # 0.9 * [0.5, -0.5] + 0.5 * [-0.5, 0.5] = [0.2, -0.2]; "unused" has no weight
    torch.testing.assert_close(adv, torch.tensor([[0.2, 0.0], [-0.2, -0.2]]))


def test_decoupled_missing_component_is_named():
    with pytest.raises(ValueError, match="visual"):
        ca.compute_decoupled_advantages(
            {"accuracy": torch.ones(2)}, {"accuracy": 1.0, "visual": 1.0}, torch.ones(2, 1), np.array([0, 0])
        )


def test_informative_groups():
    index = np.array(["a", "a", "b", "b", "c", "c", "d"])
    scores = [1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 2.0]
    expected = np.array([False, False, True, True, False, False, False])
    np.testing.assert_array_equal(ca.informative_groups(torch.tensor(scores), index), expected)
    np.testing.assert_array_equal(ca.informative_groups(np.array(scores), index), expected)
    # Three equal scores whose float mean is not exactly 0.1 are still uninformative.
    assert not ca.informative_groups(np.array([0.1, 0.1, 0.1]), np.array([7, 7, 7])).any()


# --------------------------------------------------------------------------- loss aggregation

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
LOSS_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("mode", "expected", "kwargs"),
    [
        ("token-mean", 7 / 3, {}),  # (1 + 2 + 4) / 3 tokens
        ("seq-mean-token-sum", 3.5, {}),  # (3 + 4) / 2
        ("seq-mean-token-mean", 2.75, {}),  # (1.5 + 4) / 2
        ("seq-mean-token-sum-norm", 7 / 6, {"norm_length": 3}),  # (3/3 + 4/3) / 2
    ],
)
def test_agg_loss_hand_case(mode, expected, kwargs):
    assert ca.agg_loss(LOSS, LOSS_MASK, mode, **kwargs).item() == pytest.approx(expected)


def test_agg_loss_micro_batches_with_global_counts_equal_full_batch():
    full_token_mean = ca.agg_loss(LOSS, LOSS_MASK, "token-mean")
    micro = [ca.agg_loss(LOSS[i : i + 1], LOSS_MASK[i : i + 1], "token-mean", global_tokens=3.0) for i in range(2)]
    torch.testing.assert_close(sum(micro), full_token_mean)
    # Without the global count each micro-batch is its own mean: 1.5 and 4, not 7/3.
    local = [ca.agg_loss(LOSS[i : i + 1], LOSS_MASK[i : i + 1], "token-mean").item() for i in range(2)]
    assert sum(local) / 2 == pytest.approx(2.75)
    micro_seq = [
        ca.agg_loss(LOSS[i : i + 1], LOSS_MASK[i : i + 1], "seq-mean-token-sum", global_seqs=2) for i in range(2)
    ]
    torch.testing.assert_close(sum(micro_seq), ca.agg_loss(LOSS, LOSS_MASK, "seq-mean-token-sum"))


def test_agg_loss_errors():
    with pytest.raises(ValueError, match="token-mean"):
        ca.agg_loss(LOSS, LOSS_MASK, "sum")
    with pytest.raises(ValueError, match="norm_length"):
        ca.agg_loss(LOSS, LOSS_MASK, "seq-mean-token-sum-norm")


# --------------------------------------------------------------------------- policy losses

CLIP = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.3, "clip_ratio_dual": 3.0, "loss_agg_mode": "token-mean"}


def test_ppo_ratio_one_gives_minus_mean_advantage():
    adv = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, -1.0]])
    loss, metrics = ca.get_policy_loss("ppo")(logp, logp, adv, mask, **CLIP)
    # -(1 - 2 + 3 + 0.5 + 0) / 5 valid tokens = -0.5
    assert loss.item() == pytest.approx(-0.5)
    assert metrics == {"pg_clipfrac_higher": 0.0, "pg_clipfrac_lower": 0.0, "pg_clipfrac_dual": 0.0, "ppo_kl": 0.0}


def test_ppo_clipping_and_gradients():
    # Tokens: ratio 2 with A = 1 (clipped above), ratio 1 with A = 1, ratio 0.5 with A = -1 (clipped below),
    # ratio 2 with A = -1 (not clipped: PPO keeps the pessimistic unclipped term).
    old = torch.zeros(1, 4)
    log_ratio = torch.tensor([[math.log(2.0), 0.0, math.log(0.5), math.log(2.0)]])
    logp = log_ratio.clone().requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, metrics = ca.compute_policy_loss(old, logp, adv, torch.ones(1, 4), **CLIP)
    # per token: -1.3, -1, max(0.5, 0.8) = 0.8, max(2, 1.3) = 2 -> mean 0.5 / 4 = 0.125
    assert loss.item() == pytest.approx(0.125)
    loss.backward()
    # d(-A r)/dlogp = -A r, divided by 4 tokens; clipped tokens get no gradient
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.25, 0.0, 0.5]]))
    assert metrics["pg_clipfrac_higher"] == pytest.approx(0.25)
    assert metrics["pg_clipfrac_lower"] == pytest.approx(0.25)
    assert metrics["pg_clipfrac_dual"] == 0.0
    # old - logp = -(log 2 + 0 + log 0.5 + log 2) / 4 = -log(2) / 4
    assert metrics["ppo_kl"] == pytest.approx(-math.log(2.0) / 4)


def test_dual_clip_bounds_loss_for_negative_advantage():
    logp = torch.tensor([[5.0]], requires_grad=True)  # ratio e^5 = 148.4
    adv = torch.tensor([[-2.0]])
    loss, metrics = ca.compute_policy_loss(torch.zeros(1, 1), logp, adv, torch.ones(1, 1), **CLIP)
    assert loss.item() == pytest.approx(6.0)  # clip_ratio_dual * |A| = 3 * 2
    assert metrics["pg_clipfrac_dual"] == 1.0
    loss.backward()
    assert logp.grad.item() == 0.0
    no_dual, _ = ca.compute_policy_loss(
        torch.zeros(1, 1), logp, adv, torch.ones(1, 1), **{**CLIP, "clip_ratio_dual": 1.0}
    )
    assert no_dual.item() == pytest.approx(2.0 * math.exp(5.0))


def test_gspo_uses_the_sequence_ratio():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.2, 0.0, 4.0]], requires_grad=True)  # the 4.0 is on a padding token
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, 1.0]])
    loss, _ = ca.get_policy_loss("gspo")(old, logp, adv, mask, **CLIP)
    # s = exp(mean(0.2, 0.0)) = exp(0.1) = 1.105171 (inside [0.8, 1.3]); token-mean of -A s = -1.105171
    assert loss.item() == pytest.approx(-math.exp(0.1), rel=1e-6)
    loss.backward()
    # Same gradient as the sequence objective -A exp(mean log-ratio): -s / 2 per valid token.
    torch.testing.assert_close(logp.grad, torch.tensor([[-math.exp(0.1) / 2, -math.exp(0.1) / 2, 0.0]]))


def test_gspo_clips_whole_sequence():
    logp = torch.tensor([[0.6, 0.2]], requires_grad=True)  # s = exp(0.4) = 1.49 > 1.3
    loss, metrics = ca.compute_gspo_policy_loss(torch.zeros(1, 2), logp, torch.ones(1, 2), torch.ones(1, 2), **CLIP)
    assert loss.item() == pytest.approx(-1.3)
    loss.backward()
    assert torch.all(logp.grad == 0)
    assert metrics["pg_clipfrac_higher"] == 1.0


def test_unknown_policy_loss():
    with pytest.raises(ValueError, match="gspo.*ppo"):
        ca.get_policy_loss("cispo")


# --------------------------------------------------------------------------- KL


def test_kl_estimators_hand_values():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    # logp - ref = [0.5, -1]; k3 with r = ref - logp = [-0.5, 1]: e^-0.5 + 0.5 - 1 = 0.106531, e - 2 = 0.718282
    expected = {
        "kl": [0.5, -1.0],
        "abs": [0.5, 1.0],
        "mse": [0.125, 0.5],
        "low_var_kl": [0.106531, 0.718282],
    }
    for mode, values in expected.items():
        torch.testing.assert_close(ca.kl_penalty(logp, ref, mode), torch.tensor([values]), atol=1e-6, rtol=0)
        assert torch.all(ca.kl_penalty(logp, logp, mode) == 0)


def test_low_var_kl_is_non_negative_and_bounded():
    gen = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(64, 32, generator=gen) * 10, torch.randn(64, 32, generator=gen) * 10
    kl = ca.kl_penalty(logp, ref, "low_var_kl")
    assert kl.min() >= 0 and kl.max() <= 10


def test_kl_penalty_errors():
    with pytest.raises(ValueError, match="full_kl"):
        ca.kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "full")
    with pytest.raises(ValueError, match="low_var_kl"):
        ca.kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_full_kl():
    # p = [0.5, 0.5], q = [0.75, 0.25]: 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.143841
    kl = ca.full_kl(torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[math.log(3.0), 0.0]]]))
    assert kl.item() == pytest.approx(0.143841, abs=1e-6)
    gen = torch.Generator().manual_seed(0)
    logits, ref_logits = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 3, 5, generator=gen)
    direct = torch.nn.functional.kl_div(
        torch.log_softmax(ref_logits, -1), torch.log_softmax(logits, -1), log_target=True, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(ca.full_kl(logits, ref_logits), direct)
    assert torch.all(ca.full_kl(logits, logits).abs() < 1e-6)


def test_apply_kl_penalty():
    scores = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logp = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
    rewards, mean_kl = ca.apply_kl_penalty(scores, logp, torch.zeros(2, 3), mask, kl_coef=0.5, mode="kl")
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0]]))
    assert mean_kl == pytest.approx((0.2 + 0.45) / 2)  # per-sequence means 0.2 and 0.45


def test_kl_controllers():
    up = ca.get_kl_controller("adaptive", kl_coef=0.1, target_kl=0.1, horizon=10)
    up.update(current_kl=0.2, n_steps=5)  # error clip(1, .2) = 0.2 -> 0.1 * (1 + 0.2 * 5 / 10)
    assert up.value == pytest.approx(0.11)
    down = ca.AdaptiveKLController(init_kl_coef=0.1, target_kl=0.1, horizon=10)
    down.update(current_kl=0.05, n_steps=5)  # error clip(-0.5) = -0.2 -> 0.1 * 0.9
    assert down.value == pytest.approx(0.09)
    fixed = ca.get_kl_controller("fixed", kl_coef=0.1, target_kl=0.1, horizon=10)
    fixed.update(current_kl=5.0, n_steps=5)
    assert fixed.value == 0.1
    with pytest.raises(ValueError, match="fixed, adaptive"):
        ca.get_kl_controller("pid", 0.1, 0.1, 10)


# --------------------------------------------------------------------------- helpers


def test_entropy_from_logits():
    assert ca.entropy_from_logits(torch.full((2, 7), 3.0)).tolist() == pytest.approx([math.log(7)] * 2)
    # Huge logits must not overflow: a near one-hot distribution has entropy ~0.
    assert ca.entropy_from_logits(torch.tensor([1000.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(4, 9, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(ca.entropy_from_logits(logits), -(p * p.log()).sum(-1))


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    assert ca.masked_mean(x, mask).item() == pytest.approx(2.0)
    torch.testing.assert_close(ca.masked_mean(x, mask, dim=-1), torch.tensor([1.5, 3.0]))
    assert ca.masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    # valid [1, 2, 3]: mean 2, population variance 2/3
    white = ca.masked_whiten(x, mask, eps=0.0)
    torch.testing.assert_close(white, torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]) / math.sqrt(2 / 3))
