"""Critic-free advantage estimators of ppo_math against plain Python loops, hand-computed cases and properties.

Rows come in consecutive groups of k samples per prompt (row i belongs to prompt i // k).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from trl_multiadapter import ppo_math as pm

HYPOTHESIS = settings(max_examples=40, deadline=None)
WHITEN_EPS = 1e-8  # the ε of masked_whiten, restated so the loop below is independent of the module


def _random(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _contiguous_mask(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, cols, dtype=torch.long)
    for row in range(rows):
        start = int(torch.randint(0, cols, (1,), generator=generator))
        length = int(torch.randint(1, cols - start + 1, (1,), generator=generator))
        mask[row, start:start + length] = 1
    return mask


# --- loops written from the papers' definitions --------------------------------------------------------


def loop_rloo(scores: list[float], k: int) -> list[float]:
    advantages = []
    for i, score in enumerate(scores):
        group = range(i // k * k, i // k * k + k)
        others = [scores[j] for j in group if j != i]
        advantages.append(score - sum(others) / len(others))
    return advantages


def loop_grpo(scores: list[float], k: int, scale_by_std: bool, eps: float) -> list[float]:
    advantages = []
    for start in range(0, len(scores), k):
        group = scores[start:start + k]
        mean, std = statistics.fmean(group), statistics.stdev(group)
        advantages += [(score - mean) / (std + eps) if scale_by_std else score - mean for score in group]
    return advantages


def loop_reinforce_pp(rewards: list[list[float]], mask: list[list[int]], gamma: float) -> list[list[float]]:
    returns = [[0.0] * len(row) for row in rewards]
    for b, row in enumerate(rewards):
        running = 0.0
        for t in reversed(range(len(row))):
            if mask[b][t]:
                running = row[t] + gamma * running
                returns[b][t] = running
    inside = [returns[b][t] for b in range(len(rewards)) for t in range(len(rewards[b])) if mask[b][t]]
    mean = sum(inside) / len(inside)
    var = sum((x - mean) ** 2 for x in inside) / (len(inside) - 1)
    return [[(returns[b][t] - mean) / math.sqrt(var + WHITEN_EPS) if mask[b][t] else 0.0
             for t in range(len(rewards[b]))] for b in range(len(rewards))]


# --- RLOO ------------------------------------------------------------------------------------------------


def test_rloo_with_two_samples_gives_the_difference_of_the_pair():
    scores = torch.tensor([1.0, 3.0, -2.0, 5.0], dtype=torch.float64)
    assert pm.rloo_advantages(scores, 2).tolist() == [-2.0, 2.0, -7.0, 7.0]


def test_rloo_with_three_samples_by_hand():
    scores = torch.tensor([1.0, 2.0, 6.0])
    # 1 − (2 + 6)/2, 2 − (1 + 6)/2, 6 − (1 + 2)/2
    assert pm.rloo_advantages(scores, 3).tolist() == [-3.0, -1.5, 4.5]


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_rloo_equals_a_loop_over_leave_one_out_baselines(k):
    scores = _random(5 * k, seed=k, scale=3.0)
    result = pm.rloo_advantages(scores, k)
    assert result.dtype == torch.float64 and result.shape == scores.shape
    torch.testing.assert_close(result, torch.tensor(loop_rloo(scores.tolist(), k), dtype=torch.float64),
                               rtol=0, atol=1e-12)


# --- GRPO ------------------------------------------------------------------------------------------------


def test_grpo_of_a_pair_by_hand():
    scores = torch.tensor([1.0, 3.0], dtype=torch.float64)
    # mean 2, unbiased std sqrt(2): (−1/√2, 1/√2); without the std: (−1, 1)
    torch.testing.assert_close(pm.grpo_advantages(scores, 2, eps=0.0),
                               torch.tensor([-1.0, 1.0], dtype=torch.float64) / math.sqrt(2))
    assert pm.grpo_advantages(scores, 2, scale_by_std=False).tolist() == [-1.0, 1.0]


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("k", [2, 4, 6])
def test_grpo_equals_a_loop_over_group_statistics(k, scale_by_std):
    scores = _random(4 * k, seed=10 + k, scale=2.0)
    result = pm.grpo_advantages(scores, k, scale_by_std=scale_by_std)
    expected = loop_grpo(scores.tolist(), k, scale_by_std, pm.GRPO_STD_EPS)
    torch.testing.assert_close(result, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_grpo_default_eps_is_trls():
    scores = torch.tensor([0.0, 1.0])
    expected = torch.tensor([-0.5, 0.5]) / (math.sqrt(0.5) + 1e-4)
    torch.testing.assert_close(pm.grpo_advantages(scores, 2), expected)


# --- equal scores, bad k -----------------------------------------------------------------------------------


@pytest.mark.parametrize("estimate", [
    lambda s, k: pm.rloo_advantages(s, k),
    lambda s, k: pm.grpo_advantages(s, k),
    lambda s, k: pm.grpo_advantages(s, k, scale_by_std=False),
    lambda s, k: pm.grpo_advantages(s, k, eps=0.0),
], ids=["rloo", "grpo", "grpo-unscaled", "grpo-eps0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_group_of_equal_scores_gives_exact_zeros_never_nan(estimate, dtype):
    # 0.1 three times: the float mean differs from 0.1 by a rounding error, which a tiny std would blow up
    scores = torch.tensor([0.1, 0.1, 0.1, 2.0, 2.0, 2.0, -1.0, 0.5, 3.0], dtype=dtype)
    result = estimate(scores, 3)
    assert torch.isfinite(result).all()
    assert result[:6].tolist() == [0.0] * 6
    assert (result[6:] != 0).all()  # a group with spread keeps its advantages


@pytest.mark.parametrize("estimate", [pm.rloo_advantages, pm.grpo_advantages])
def test_k_below_two_and_ragged_batches_are_refused(estimate):
    scores = torch.arange(6.0)
    for k in (1, 0, True):
        with pytest.raises(ValueError, match=r"needs k >= 2 samples per prompt \(num_generations\)"):
            estimate(scores, k)
    with pytest.raises(ValueError, match="do not split into groups of k=4"):
        estimate(scores, 4)
    with pytest.raises(ValueError, match="must be 1-D"):
        estimate(scores.view(2, 3), 3)


def test_nan_scores_stay_visible():
    scores = torch.tensor([float("nan"), 1.0, 2.0, 3.0])
    for result in (pm.rloo_advantages(scores, 2), pm.grpo_advantages(scores, 2)):
        assert torch.isnan(result[:2]).all() and torch.isfinite(result[2:]).all()


# --- REINFORCE++ ------------------------------------------------------------------------------------------


def test_discounted_returns_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 4.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # G_2 = 4, G_1 = 2 + 0.5·4 = 4, G_0 = 1 + 0.5·4 = 3; outside the mask 0
    assert pm.discounted_returns(rewards, mask, 0.5).tolist() == [[3.0, 4.0, 4.0, 0.0]]


def test_reinforce_pp_by_hand():
    rewards = torch.tensor([[0.0, 1.0], [7.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [0, 1]])
    # returns (γ = 1): 1, 1 and 3; mean 5/3, unbiased variance 4/3 -> −1/√3, −1/√3, 2/√3
    expected = torch.tensor([[-1.0, -1.0], [0.0, 2.0]], dtype=torch.float64) / math.sqrt(3)
    torch.testing.assert_close(pm.reinforce_pp_returns(rewards, mask, 1.0), expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("gamma", [1.0, 0.95, 0.5, 0.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reinforce_pp_equals_a_loop_over_return_to_go_and_batch_whitening(gamma, seed):
    mask = _contiguous_mask(5, 9, seed)
    scores, kl = _random(5, seed=seed), _random(5, 9, seed=seed + 50, scale=0.1)
    rewards, _ = pm.per_token_rewards(scores, kl, 0.2, mask)
    # the per-token rewards of the REINFORCE++ paper, written out: −β·KL_t, + score at the last response token
    loop_rewards = [[-0.2 * kl[b, t].item() if mask[b, t] else 0.0 for t in range(9)] for b in range(5)]
    for b in range(5):
        loop_rewards[b][max(t for t in range(9) if mask[b, t])] += scores[b].item()
    torch.testing.assert_close(rewards, torch.tensor(loop_rewards, dtype=torch.float64), rtol=0, atol=1e-12)

    result = pm.reinforce_pp_returns(rewards, mask, gamma)
    expected = loop_reinforce_pp(loop_rewards, mask.tolist(), gamma)
    torch.testing.assert_close(result, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-9)


def test_reinforce_pp_ignores_non_finite_values_outside_the_mask():
    rewards = torch.tensor([[float("nan"), 1.0, 2.0], [float("inf"), 0.0, 5.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1]])
    clean = pm.reinforce_pp_returns(torch.where(mask.bool(), rewards, 0.0), mask, 0.9)
    assert torch.equal(pm.reinforce_pp_returns(rewards, mask, 0.9), clean)


# --- broadcast, KL in the loss, dispatch -------------------------------------------------------------------


def test_token_advantages_spread_each_sequence_advantage_over_its_response_tokens():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1]])
    result = pm.token_advantages(torch.tensor([2.0, -1.0, 0.5]), mask)
    assert result.tolist() == [[0.0, 2.0, 2.0, 0.0], [-1.0] * 4, [0.0, 0.0, 0.0, 0.5]]
    with pytest.raises(ValueError, match="one per row"):
        pm.token_advantages(torch.tensor([1.0, 2.0]), mask)


def test_kl_loss_is_beta_times_the_mean_k3_over_masked_tokens_with_its_gradient():
    logprobs = _random(3, 5, seed=3, scale=0.5).requires_grad_()
    ref_logprobs = _random(3, 5, seed=4, scale=0.5)
    mask = _contiguous_mask(3, 5, 7)
    loss, kl = pm.kl_loss(logprobs, ref_logprobs, mask, beta=0.04)

    inside = mask.bool()
    ratio = torch.exp(ref_logprobs - logprobs.detach())  # π_ref / π
    expected_kl = (ratio - torch.log(ratio) - 1)[inside].mean()
    torch.testing.assert_close(kl, expected_kl, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss.detach(), 0.04 * expected_kl, rtol=0, atol=1e-12)
    assert not kl.requires_grad

    loss.backward()
    # d/d log π of (π_ref/π − log(π_ref/π) − 1) = 1 − π_ref/π, averaged over the masked tokens
    expected_grad = torch.where(inside, 0.04 * (1 - ratio) / inside.sum(), torch.zeros_like(ratio))
    torch.testing.assert_close(logprobs.grad, expected_grad, rtol=0, atol=1e-12)


def test_kl_loss_is_exactly_zero_when_the_policy_equals_the_reference():
    logprobs = _random(2, 6, seed=5)
    loss, kl = pm.kl_loss(logprobs, logprobs.clone(), torch.ones(2, 6), beta=0.1)
    assert loss.item() == 0.0 and kl.item() == 0.0


def test_compute_advantages_dispatches_by_name():
    mask = _contiguous_mask(6, 7, 11)
    scores, kl = _random(6, seed=12), _random(6, 7, seed=13, scale=0.1)
    rewards, _ = pm.per_token_rewards(scores, kl, 0.1, mask)
    values = _random(6, 7, seed=14)
    sequence = [sum(rewards[b, t].item() for t in range(7) if mask[b, t]) for b in range(6)]

    gae = pm.compute_advantages("gae", rewards, mask, values, gamma=0.9, lam=0.8)
    expected_gae = pm.compute_gae(rewards, values, mask, 0.9, 0.8)
    assert all(torch.equal(a, b) for a, b in zip(gae, expected_gae))

    rloo, rloo_returns = pm.compute_advantages("rloo", rewards, mask, k=3)
    expected_rloo = torch.tensor(loop_rloo(sequence, 3), dtype=torch.float64)
    torch.testing.assert_close(rloo, expected_rloo.unsqueeze(1) * mask, rtol=0, atol=1e-12)
    assert rloo_returns is None

    grpo, _ = pm.compute_advantages("grpo", rewards, mask, k=2, scale_by_std=False)
    expected_grpo = torch.tensor(loop_grpo(sequence, 2, False, 0.0), dtype=torch.float64)
    torch.testing.assert_close(grpo, expected_grpo.unsqueeze(1) * mask, rtol=0, atol=1e-12)

    reinforce, _ = pm.compute_advantages("reinforce_pp", rewards, mask, gamma=0.7)
    assert torch.equal(reinforce, pm.reinforce_pp_returns(rewards, mask, 0.7))


def test_compute_advantages_rejects_unknown_names_and_gae_without_values():
    rewards, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'; valid: gae, rloo, grpo, reinforce_pp"):
        pm.compute_advantages("ppo", rewards, mask)
    with pytest.raises(ValueError, match="gae estimator needs values"):
        pm.compute_advantages("gae", rewards, mask)
    with pytest.raises(ValueError, match="needs k >= 2"):
        pm.compute_advantages("rloo", rewards, mask, k=1)
    assert set(pm.CRITIC_FREE_ESTIMATORS) | {"gae"} == set(pm.ADVANTAGE_ESTIMATORS)


# --- properties --------------------------------------------------------------------------------------------

FINITE = st.floats(-50, 50, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def grouped_scores(draw, max_prompts=6, max_k=6):
    prompts, k = draw(st.integers(1, max_prompts)), draw(st.integers(2, max_k))
    scores = draw(st.lists(FINITE, min_size=prompts * k, max_size=prompts * k))
    return torch.tensor(scores, dtype=torch.float64), k


ESTIMATES = {
    "rloo": pm.rloo_advantages,
    "grpo": pm.grpo_advantages,
    "grpo-unscaled": lambda scores, k: pm.grpo_advantages(scores, k, scale_by_std=False),
}


@pytest.mark.parametrize("name", list(ESTIMATES))
@given(grouped=grouped_scores(), data=st.data())
@HYPOTHESIS
def test_permuting_prompts_permutes_the_advantages(name, grouped, data):
    scores, k = grouped
    prompts = scores.shape[0] // k
    order = torch.tensor(data.draw(st.permutations(range(prompts))), dtype=torch.long)
    rows = (order.unsqueeze(1) * k + torch.arange(k)).reshape(-1)  # the rows of each prompt, in the new order
    estimate = ESTIMATES[name]
    assert torch.equal(estimate(scores[rows], k), estimate(scores, k)[rows])


@pytest.mark.parametrize("name", list(ESTIMATES))
@given(grouped=grouped_scores(), data=st.data())
@HYPOTHESIS
def test_permuting_samples_within_a_group_permutes_their_advantages(name, grouped, data):
    scores, k = grouped
    within = torch.tensor(data.draw(st.permutations(range(k))), dtype=torch.long)
    rows = (torch.arange(scores.shape[0] // k).unsqueeze(1) * k + within).reshape(-1)
    estimate = ESTIMATES[name]
    torch.testing.assert_close(estimate(scores[rows], k), estimate(scores, k)[rows], rtol=1e-9, atol=1e-9)


@given(grouped=grouped_scores())
@HYPOTHESIS
def test_rloo_advantages_of_a_group_sum_to_zero(grouped):
    scores, k = grouped
    sums = pm.rloo_advantages(scores, k).view(-1, k).sum(dim=1)
    assert torch.allclose(sums, torch.zeros_like(sums), atol=1e-9 * k * (1 + scores.abs().max().item()))


@given(grouped=grouped_scores())
@HYPOTHESIS
def test_grpo_with_scale_gives_unit_std_per_group(grouped):
    scores, k = grouped
    groups = scores.view(-1, k)
    assume(bool((groups.std(dim=1) > 1e-2).all()))
    result = pm.grpo_advantages(scores, k).view(-1, k)
    std = groups.std(dim=1)
    # std of (s − mean) / (std + ε) is std / (std + ε): 1 up to ε / std
    assert ((result.std(dim=1) - 1).abs() <= pm.GRPO_STD_EPS / std + 1e-9).all()
    assert torch.allclose(result.mean(dim=1), torch.zeros(groups.shape[0], dtype=torch.float64), atol=1e-9)


@given(rewards=st.lists(FINITE, min_size=12, max_size=12), seed=st.integers(0, 2**16),
       gamma=st.floats(0, 1))
@HYPOTHESIS
def test_reinforce_pp_advantages_are_whitened_over_the_batch(rewards, seed, gamma):
    mask = _contiguous_mask(3, 4, seed)
    result = pm.reinforce_pp_returns(torch.tensor(rewards, dtype=torch.float64).view(3, 4), mask, gamma)
    inside = result[mask.bool()]
    assume(inside.numel() >= 2)
    returns = pm.discounted_returns(torch.tensor(rewards, dtype=torch.float64).view(3, 4), mask, gamma)
    spread = returns[mask.bool()].std().item()
    assume(spread > 1e-3)
    assert abs(inside.mean().item()) <= 1e-9 * (1 + returns.abs().max().item())
    # unit std up to the ε added to the variance: std / sqrt(std² + ε)
    assert abs(inside.std().item() - spread / math.sqrt(spread**2 + WHITEN_EPS)) <= 1e-9
    assert (result[~mask.bool()] == 0).all()
