"""ppo_math against independent computations: numpy, plain Python loops over lists, closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from trl_multiadapter import ppo_math as pm

HYPOTHESIS = settings(max_examples=40, deadline=None)


def _random(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=-1, keepdims=True)
    softmax = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    return np.log(softmax)


@st.composite
def contiguous_masks(draw, max_rows=4, max_cols=9):
    """A (B, T) 0/1 mask with one contiguous run of ones per row, starting at any column."""
    rows, cols = draw(st.integers(1, max_rows)), draw(st.integers(1, max_cols))
    mask = []
    for _ in range(rows):
        start = draw(st.integers(0, cols - 1))
        length = draw(st.integers(1, cols - start))
        mask.append([1 if start <= t < start + length else 0 for t in range(cols)])
    return mask


# --- log-probabilities and entropy ------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_logprobs_equal_numpy_log_softmax_at_the_labels(temperature):
    logits = _random(3, 5, 11, scale=3.0)
    labels = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
    expected = _np_log_softmax(logits.numpy() / temperature)
    expected = np.take_along_axis(expected, labels.numpy()[..., None], axis=-1)[..., 0]

    result = pm.logprobs_from_logits(logits, labels, temperature)

    assert result.dtype == torch.float64
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_logprobs_gradient_equals_the_one_of_log_softmax():
    logits = _random(2, 4, 7, scale=2.0).requires_grad_()
    labels = torch.randint(0, 7, (2, 4), generator=torch.Generator().manual_seed(2))
    pm.logprobs_from_logits(logits, labels, 0.8).sum().backward()

    # d/dz_v of log softmax(z/τ)[a] = (1[v=a] − softmax(z/τ)_v) / τ
    softmax = np.exp(_np_log_softmax(logits.detach().numpy() / 0.8))
    one_hot = np.eye(7)[labels.numpy()]
    np.testing.assert_allclose(logits.grad.numpy(), (one_hot - softmax) / 0.8, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_logprobs_keep_low_precision_dtypes(dtype, tolerance):
    logits = _random(2, 6, 50, scale=4.0)
    labels = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))
    exact = pm.logprobs_from_logits(logits.to(dtype).double(), labels, 0.9)

    result = pm.logprobs_from_logits(logits.to(dtype), labels, 0.9)

    assert result.dtype == dtype
    torch.testing.assert_close(result.double(), exact, rtol=tolerance, atol=tolerance)


def test_logprobs_reject_bad_temperature_and_label_shape():
    logits = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="temperature"):
        pm.logprobs_from_logits(logits, torch.zeros(1, 2, dtype=torch.long), temperature=0.0)
    with pytest.raises(ValueError, match="labels"):
        pm.logprobs_from_logits(logits, torch.zeros(1, 3, dtype=torch.long))


def test_entropy_equals_numpy_definition():
    logits = _random(3, 4, 9, scale=2.0)
    p = np.exp(_np_log_softmax(logits.numpy()))

    result = pm.entropy_from_logits(logits)

    assert result.dtype == torch.float64
    np.testing.assert_allclose(result.numpy(), -(p * np.log(p)).sum(-1), rtol=1e-12)


def test_entropy_ignores_impossible_tokens_and_keeps_gradients_finite():
    logits = torch.tensor([[[0.3, -1.0, 2.0, -math.inf, -math.inf]]], dtype=torch.float64, requires_grad=True)
    p = np.exp(_np_log_softmax(np.array([0.3, -1.0, 2.0])))

    entropy = pm.entropy_from_logits(logits)
    entropy.sum().backward()

    assert entropy.item() == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)
    assert torch.isfinite(logits.grad).all()


# --- masked statistics ------------------------------------------------------------------------------


def test_masked_mean_equals_numpy_mean_of_selected_entries():
    x = _random(4, 6)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(4)) > 0.4
    mask[:, 0] = True
    x_np, mask_np = x.numpy(), mask.numpy()

    assert pm.masked_mean(x, mask).item() == pytest.approx(x_np[mask_np].mean(), rel=1e-12)
    row_means = [x_np[i][mask_np[i]].mean() for i in range(4)]
    np.testing.assert_allclose(pm.masked_mean(x, mask, axis=1).numpy(), row_means, rtol=1e-12)


def test_masked_mean_ignores_non_finite_values_outside_the_mask():
    x = torch.tensor([[1.0, math.inf, 3.0, math.nan]], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 0]])
    assert pm.masked_mean(x, mask).item() == 2.0
    assert math.isnan(pm.masked_mean(x, torch.zeros_like(mask)).item())


@pytest.mark.parametrize("unbiased", [True, False])
def test_masked_var_equals_numpy_var(unbiased):
    x = _random(3, 7, seed=5)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(6)) > 0.5
    mask[0, :2] = True
    expected = np.var(x.numpy()[mask.numpy()], ddof=1 if unbiased else 0)
    assert pm.masked_var(x, mask, unbiased).item() == pytest.approx(expected, rel=1e-12)


def test_masked_var_of_one_entry_is_nan_when_unbiased_like_torch_var():
    x = torch.tensor([[2.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 1]])
    assert math.isnan(pm.masked_var(x, mask).item())
    with pytest.warns(UserWarning, match="degrees of freedom"):
        assert math.isnan(torch.var(torch.tensor([5.0]), correction=1).item())
    assert pm.masked_var(x, mask, unbiased=False).item() == 0.0


def _np_whiten(x: np.ndarray, mask: np.ndarray, shift_mean: bool) -> np.ndarray:
    selected = x[mask]
    mean, var = selected.mean(), np.var(selected, ddof=1)
    whitened = (x - mean) / np.sqrt(var + pm.WHITEN_EPS)
    if not shift_mean:
        whitened += mean
    return np.where(mask, whitened, 0.0)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_equals_numpy_and_zeroes_outside_the_mask(shift_mean):
    x = _random(3, 8, seed=7, scale=4.0) + 1.5
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0], [0] * 7 + [1]])

    result = pm.masked_whiten(x, mask, shift_mean)

    np.testing.assert_allclose(result.numpy(), _np_whiten(x.numpy(), mask.numpy() == 1, shift_mean), rtol=1e-12)


@given(
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=30),
    data=st.data(),
)
@HYPOTHESIS
def test_whitened_entries_have_mean_zero_and_unit_variance(values, data):
    x = torch.tensor([values], dtype=torch.float64)
    mask = torch.tensor([data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values)))])
    selected = np.array(values)[mask[0].numpy()]
    assume(selected.size >= 2 and np.var(selected, ddof=1) > 1e-3)  # ε in sqrt(var + ε) shrinks flat inputs

    whitened = pm.masked_whiten(x, mask).numpy()[mask.numpy()]

    assert abs(whitened.mean()) < 1e-9
    assert np.var(whitened, ddof=1) == pytest.approx(1.0, rel=1e-4)


def test_masked_whiten_mini_batch_of_one_token():
    x = torch.tensor([[0.0, 3.5, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 0]])

    assert pm.masked_whiten(x, mask).tolist() == [[0.0, 0.0, 0.0]]
    assert pm.masked_whiten(x, mask, shift_mean=False).tolist() == [[0.0, 3.5, 0.0]]
    assert pm.masked_whiten(x, torch.zeros_like(mask)).tolist() == [[0.0, 0.0, 0.0]]


def test_masked_whiten_of_one_token_has_finite_gradient():
    x = torch.tensor([[math.inf, 3.5]], dtype=torch.float64, requires_grad=True)
    pm.masked_whiten(x, torch.tensor([[0, 1]])).sum().backward()
    assert torch.isfinite(x.grad).all()


# --- KL penalty -------------------------------------------------------------------------------------


def _kl_definition(name: str, logp: float, logq: float) -> float:
    d = logp - logq
    r = math.exp(logq - logp)
    return {"k1": d, "kl": d, "abs": abs(d), "k2": 0.5 * d * d, "mse": 0.5 * d * d, "k3": (r - 1) - math.log(r)}[name]


@pytest.mark.parametrize("name", ["k1", "kl", "abs", "k2", "mse", "k3"])
def test_sample_kl_estimators_equal_their_definitions(name):
    logprob, ref_logprob = -_random(3, 5, seed=8).abs(), -_random(3, 5, seed=9).abs()
    expected = [
        [_kl_definition(name, a, b) for a, b in zip(row_p, row_q)]
        for row_p, row_q in zip(logprob.tolist(), ref_logprob.tolist())
    ]

    result = pm.kl_penalty(logprob, ref_logprob, name)

    assert result.dtype == torch.float64
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-10, atol=1e-14)


def test_full_kl_equals_a_double_loop_over_the_vocabulary():
    logits, ref_logits = _random(2, 3, 6, seed=10, scale=2.0), _random(2, 3, 6, seed=11, scale=2.0)
    expected = []
    for row, ref_row in zip(logits.tolist(), ref_logits.tolist()):
        expected.append([])
        for z, y in zip(row, ref_row):
            log_zp, log_zq = math.log(sum(map(math.exp, z))), math.log(sum(map(math.exp, y)))
            expected[-1].append(sum(math.exp(zv - log_zp) * ((zv - log_zp) - (yv - log_zq)) for zv, yv in zip(z, y)))

    result = pm.kl_penalty(torch.zeros(2, 3), torch.zeros(2, 3), "full", logits=logits, ref_logits=ref_logits)

    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-10)


@given(
    logprobs=st.lists(st.floats(-50.0, 0.0), min_size=1, max_size=12),
    logits=st.lists(st.floats(-30.0, 30.0), min_size=2, max_size=8),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
)
@HYPOTHESIS
def test_every_estimator_is_exactly_zero_when_policy_equals_reference(logprobs, logits, dtype):
    logprob = torch.tensor([logprobs], dtype=dtype)
    vocab_logits = torch.tensor([[logits]], dtype=dtype)
    for name in pm.KL_ESTIMATORS:
        if name == "full":
            kl = pm.kl_penalty(logprob[:, :1], logprob[:, :1], name, vocab_logits, vocab_logits.clone())
        else:
            kl = pm.kl_penalty(logprob, logprob.clone(), name)
        assert kl.dtype == dtype
        assert (kl == 0).all(), name


@pytest.mark.parametrize("seed", [0, 1])
def test_k1_and_k3_averaged_over_samples_from_the_policy_approximate_the_kl(seed):
    generator = torch.Generator().manual_seed(seed)
    logits, ref_logits = torch.randn(6, generator=generator, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
    true_kl = float((logp.exp() * (logp - logq)).sum())
    samples = torch.multinomial(logp.exp(), 200_000, replacement=True, generator=generator)

    for name in ("k1", "k3"):
        estimates = pm.kl_penalty(logp[samples], logq[samples], name)
        standard_error = estimates.std().item() / math.sqrt(samples.numel())
        assert abs(estimates.mean().item() - true_kl) < 5 * standard_error, name


def test_kl_penalty_rejects_unknown_estimator_and_full_without_logits():
    zeros = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="k1, kl, abs, k2, mse, k3, full"):
        pm.kl_penalty(zeros, zeros, "k4")
    with pytest.raises(ValueError, match="needs logits= and ref_logits="):
        pm.kl_penalty(zeros, zeros, "full", logits=torch.zeros(1, 2, 3))


# --- rewards ----------------------------------------------------------------------------------------


def test_per_token_rewards_put_the_score_on_the_last_response_token_of_each_row():
    mask = [[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0]]
    kl = _random(4, 6, seed=12)
    scores = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64)
    kl_coef = 0.05
    expected_non_score = [[-kl_coef * k if m else 0.0 for k, m in zip(kl_row, m_row)] for kl_row, m_row in
                          zip(kl.tolist(), mask)]
    expected = [list(row) for row in expected_non_score]
    for row, score, m_row in zip(expected, scores.tolist(), mask):
        last = max(t for t, m in enumerate(m_row) if m)
        row[last] += score

    rewards, non_score = pm.per_token_rewards(scores, kl, kl_coef, torch.tensor(mask))

    np.testing.assert_allclose(non_score.numpy(), expected_non_score, rtol=1e-15)
    np.testing.assert_allclose(rewards.numpy(), expected, rtol=1e-15)


def test_per_token_rewards_reject_a_row_without_response_tokens():
    mask = torch.tensor([[1, 1], [0, 0]])
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        pm.per_token_rewards(torch.zeros(2), torch.zeros(2, 2), 0.1, mask)


def test_score_post_processing():
    scores = torch.tensor([-5.0, 0.5, 4.0], dtype=torch.float64)
    eps = torch.finfo(torch.float64).eps

    assert pm.clip_scores(scores, 2.0).tolist() == [-2.0, 0.5, 2.0]
    assert pm.scale_scores(scores, mean=1.0, std=2.0).tolist() == [s / (2.0 + eps) for s in (-5.0, 0.5, 4.0)]
    assert pm.scale_scores(scores, 1.0, 2.0, shift_mean=True).tolist() == [
        (s - 1.0) / (2.0 + eps) for s in (-5.0, 0.5, 4.0)
    ]
    assert pm.penalise_missing_stop(scores, torch.tensor([True, False, True]), 1.5).tolist() == [-5.0, -1.0, 4.0]
    with pytest.raises(ValueError, match="clip"):
        pm.clip_scores(scores, 0.0)


# --- GAE --------------------------------------------------------------------------------------------


def _gae_closed_form(rewards, values, mask, gamma, lam):
    """A_t = Σ_l (γλ)^l δ_{t+l} over the row's response positions, V = 0 after the last one."""
    advantages, returns = [], []
    for r_row, v_row, m_row in zip(rewards, values, mask):
        steps = [t for t, m in enumerate(m_row) if m]
        v_next = [v_row[s] for s in steps[1:]] + [0.0]
        deltas = [r_row[s] + gamma * vn - v_row[s] for s, vn in zip(steps, v_next)]
        adv_row, ret_row = [0.0] * len(m_row), [0.0] * len(m_row)
        for i, s in enumerate(steps):
            adv_row[s] = sum((gamma * lam) ** k * deltas[i + k] for k in range(len(steps) - i))
            ret_row[s] = adv_row[s] + v_row[s]
        advantages.append(adv_row)
        returns.append(ret_row)
    return advantages, returns


@given(
    mask=contiguous_masks(),
    gamma=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
@HYPOTHESIS
def test_gae_equals_the_closed_form_sum_of_discounted_deltas(mask, gamma, lam, seed):
    shape = (len(mask), len(mask[0]))
    rewards, values = _random(*shape, seed=seed), _random(*shape, seed=seed + 1)
    expected_advantages, expected_returns = _gae_closed_form(rewards.tolist(), values.tolist(), mask, gamma, lam)

    advantages, returns = pm.compute_gae(rewards, values, torch.tensor(mask), gamma, lam)

    np.testing.assert_allclose(advantages.numpy(), expected_advantages, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(returns.numpy(), expected_returns, rtol=1e-9, atol=1e-12)


@given(mask=contiguous_masks(), seed=st.integers(0, 2**16))
@HYPOTHESIS
def test_gae_with_gamma_and_lambda_one_gives_the_reward_to_go(mask, seed):
    shape = (len(mask), len(mask[0]))
    rewards, values = _random(*shape, seed=seed), _random(*shape, seed=seed + 1)

    advantages, _ = pm.compute_gae(rewards, values, torch.tensor(mask), 1.0, 1.0)

    for row, (r_row, m_row) in enumerate(zip(rewards.tolist(), mask)):
        for t, m in enumerate(m_row):
            if m:
                reward_to_go = sum(r for r, mm in zip(r_row[t:], m_row[t:]) if mm)
                assert (advantages[row, t] + values[row, t]).item() == pytest.approx(reward_to_go, abs=1e-10)


def test_gae_does_not_depend_on_padding_columns():
    rewards, values = _random(2, 4, seed=13), _random(2, 4, seed=14)
    mask = torch.ones(2, 4, dtype=torch.long)
    packed_rewards = torch.cat([_random(2, 3, seed=15), rewards, _random(2, 2, seed=16)], dim=1)
    packed_values = torch.cat([_random(2, 3, seed=17), values, _random(2, 2, seed=18)], dim=1)
    packed_mask = torch.cat([torch.zeros(2, 3), mask, torch.zeros(2, 2)], dim=1)

    advantages, returns = pm.compute_gae(rewards, values, mask, 0.95, 0.9)
    packed_advantages, packed_returns = pm.compute_gae(packed_rewards, packed_values, packed_mask, 0.95, 0.9)

    torch.testing.assert_close(packed_advantages[:, 3:7], advantages, rtol=0, atol=0)
    torch.testing.assert_close(packed_returns[:, 3:7], returns, rtol=0, atol=0)
    assert (packed_advantages[:, :3] == 0).all() and (packed_returns[:, 7:] == 0).all()


# --- losses -----------------------------------------------------------------------------------------


def _policy_loss_loop(logprobs, old_logprobs, advantages, mask, cliprange):
    losses, clipped_count, squared_log_ratios = [], 0, []
    for lp, olp, a, m in zip(logprobs, old_logprobs, advantages, mask):
        if not m:
            continue
        ratio = math.exp(lp - olp)
        unclipped, clipped = -a * ratio, -a * min(max(ratio, 1 - cliprange), 1 + cliprange)
        losses.append(max(unclipped, clipped))
        clipped_count += clipped > unclipped
        squared_log_ratios.append((lp - olp) ** 2)
    n = len(losses)
    return sum(losses) / n, clipped_count / n, 0.5 * sum(squared_log_ratios) / n


def test_policy_loss_equals_a_scalar_loop():
    logprobs = -_random(3, 6, seed=19).abs()
    old_logprobs = logprobs + 0.4 * _random(3, 6, seed=20)
    advantages = _random(3, 6, seed=21)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1] * 6, [0, 0, 0, 0, 1, 1]])
    expected = _policy_loss_loop(
        logprobs.flatten().tolist(), old_logprobs.flatten().tolist(), advantages.flatten().tolist(),
        mask.flatten().tolist(), 0.2,
    )

    loss, clipfrac, approxkl = pm.policy_loss(logprobs, old_logprobs, advantages, mask, 0.2)

    assert 0 < expected[1] < 1, "the inputs should clip some tokens and not others"
    assert [loss.item(), clipfrac.item(), approxkl.item()] == pytest.approx(expected, rel=1e-12)


def test_policy_loss_gradient_vanishes_where_the_clipped_branch_is_active():
    logprobs = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)).requires_grad_()
    old_logprobs = torch.log(torch.tensor([[0.25, 0.25, 0.5, 1.0]], dtype=torch.float64))
    advantages = torch.tensor([[1.0, -1.0, 2.0, 1.0]], dtype=torch.float64)  # ratios 2, 2, 1, 0.5

    pm.policy_loss(logprobs, old_logprobs, advantages, torch.ones(1, 4), 0.2)[0].backward()

    # d/dlogπ of −A·ρ is −A·ρ; the mean divides by 4. Token 0 clipped (A > 0, ρ > 1 + ε), token 3 not (ρ < 1 − ε).
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, 2.0 / 4, -2.0 / 4, -0.5 / 4], rel=1e-12)


def _value_loss_loop(values, old_values, returns, mask, clip):
    losses, clipped_count = [], 0
    for v, ov, ret, m in zip(values, old_values, returns, mask):
        if not m:
            continue
        clipped_value = min(max(v, ov - clip), ov + clip)
        unclipped, clipped = (v - ret) ** 2, (clipped_value - ret) ** 2
        losses.append(max(unclipped, clipped))
        clipped_count += clipped > unclipped
    return 0.5 * sum(losses) / len(losses), clipped_count / len(losses)


def test_value_loss_equals_a_scalar_loop():
    values, old_values, returns = _random(3, 5, seed=22), _random(3, 5, seed=23), _random(3, 5, seed=24)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    expected = _value_loss_loop(
        values.flatten().tolist(), old_values.flatten().tolist(), returns.flatten().tolist(),
        mask.flatten().tolist(), 0.2,
    )

    loss, clipfrac = pm.value_loss(values, old_values, returns, mask, 0.2)

    assert 0 < expected[1] < 1
    assert [loss.item(), clipfrac.item()] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_tensor_functions_keep_the_input_dtype(dtype):
    x, y, z = (_random(2, 5, seed=s).to(dtype) for s in (25, 26, 27))
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]

    def check(result, reference):
        assert result.dtype == dtype
        torch.testing.assert_close(result.double(), reference, rtol=tolerance, atol=tolerance)

    xd, yd, zd = x.double(), y.double(), z.double()
    check(pm.masked_mean(x, mask), pm.masked_mean(xd, mask))
    check(pm.masked_var(x, mask), pm.masked_var(xd, mask))
    check(pm.masked_whiten(x, mask), pm.masked_whiten(xd, mask))
    check(pm.kl_penalty(x, y, "k3"), pm.kl_penalty(xd, yd, "k3"))
    check(pm.entropy_from_logits(x.unsqueeze(0)), pm.entropy_from_logits(xd.unsqueeze(0)))
    check(pm.per_token_rewards(x[:, 0], y, 0.1, mask)[0], pm.per_token_rewards(xd[:, 0], yd, 0.1, mask)[0])
    for result, reference in zip(pm.compute_gae(x, y, mask, 0.9, 0.95), pm.compute_gae(xd, yd, mask, 0.9, 0.95)):
        check(result, reference)
    for result, reference in zip(pm.policy_loss(x, y, z, mask, 0.2), pm.policy_loss(xd, yd, zd, mask, 0.2)):
        check(result, reference)
    for result, reference in zip(pm.value_loss(x, y, z, mask, 0.2), pm.value_loss(xd, yd, zd, mask, 0.2)):
        check(result, reference)


# --- response masks ---------------------------------------------------------------------------------

EOT, EOS, PAD = 4, 1, 5


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([EOT, 9, 9, PAD], [1, 0, 0, 0]),  # stop at the first position
        ([7, 8, 9, 10], [1, 1, 1, 1]),  # never stops
        ([7, EOS, 9, EOT, PAD], [1, 1, 0, 0, 0]),  # several stops: the first one ends it
        ([7, 8, PAD, PAD], [1, 1, 0, 0]),  # no stop, trailing generation padding
        ([7, PAD, 8, EOT, PAD], [1, 1, 1, 1, 0]),  # a sampled pad id inside the response stays
        ([PAD, PAD, PAD], [0, 0, 0]),  # nothing but padding
    ],
)
def test_response_mask_hand_cases(ids, expected):
    mask = pm.response_mask_from_stop_tokens(torch.tensor([ids]), [EOT, EOS], PAD)
    assert mask.tolist() == [expected]
    assert pm.contains_stop_token(torch.tensor([ids]), [EOT, EOS]).tolist() == [EOT in ids or EOS in ids]


def test_response_mask_when_the_pad_token_is_also_a_stop_token():
    ids = torch.tensor([[7, EOS, EOS, EOS], [7, 8, 9, 10]])
    assert pm.response_mask_from_stop_tokens(ids, [EOS], EOS).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert pm.response_mask_from_stop_tokens(ids, [EOS], None).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_response_mask_rejects_empty_stop_tokens():
    with pytest.raises(ValueError, match="stop_token_ids"):
        pm.response_mask_from_stop_tokens(torch.tensor([[1, 2]]), [], PAD)


def _response_mask_loop(row, stop_ids, pad_id):
    end = next((j for j, token in enumerate(row) if token in stop_ids), None)
    if end is None:
        end = max((j for j, token in enumerate(row) if token != pad_id), default=-1)
    return [int(j <= end) for j in range(len(row))]


@given(
    rows=st.integers(1, 4).flatmap(
        lambda length: st.lists(st.lists(st.sampled_from([EOS, EOT, PAD, 7, 8]), min_size=length, max_size=length),
                                min_size=1, max_size=4)
    ),
    stop_ids=st.lists(st.sampled_from([EOS, EOT, PAD]), min_size=1, max_size=3),
)
@HYPOTHESIS
def test_response_mask_equals_a_python_loop(rows, stop_ids):
    ids = torch.tensor(rows)
    expected = [_response_mask_loop(row, stop_ids, PAD) for row in rows]

    mask = pm.response_mask_from_stop_tokens(ids, stop_ids, PAD)

    assert mask.tolist() == expected
    assert pm.last_token_indices(mask).tolist() == [max((j for j, m in enumerate(r) if m), default=-1) for r in expected]


def test_first_true_and_last_token_indices():
    bools = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]])
    assert pm.first_true_indices(bools).tolist() == [1, 4, 0]
    assert pm.last_token_indices(bools).tolist() == [2, -1, 3]


def test_sequence_kl_sums_the_per_token_estimate_inside_the_mask():
    torch.manual_seed(0)
    logits, ref_logits = torch.randn(3, 4, 7), torch.randn(3, 4, 7)
    labels = torch.randint(0, 7, (3, 4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, labels[..., None])[..., 0]
    sampled = pm.sequence_kl(logp, ref_logp, mask, "k1")
    full = pm.sequence_kl(logp, ref_logp, mask, "full", logits=logits, ref_logits=ref_logits)
    for row in range(3):
        expected_k1 = sum(float(logp[row, t] - ref_logp[row, t]) for t in range(4) if mask[row, t])
        p, q = torch.softmax(logits[row], -1), torch.softmax(ref_logits[row], -1)
        expected_full = sum(float((p[t] * (p[t].log() - q[t].log())).sum()) for t in range(4) if mask[row, t])
        assert sampled[row].item() == pytest.approx(expected_k1, abs=1e-5)
        assert full[row].item() == pytest.approx(expected_full, abs=1e-5)
