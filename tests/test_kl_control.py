"""KL controllers and RunningMoments against hand-computed sequences and numpy."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_multiadapter.kl_control import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    build_kl_controller,
)


def test_adaptive_controller_follows_a_hand_computed_sequence():
    controller = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    # (current KL, n_steps) -> proportional error clip(KL/6 − 1, ±0.2)
    controller.update(3.0, 256)  # −0.5 clipped to −0.2
    assert controller.value == pytest.approx(0.2 * (1 - 0.2 * 256 / 10_000), rel=1e-15)
    controller.update(torch.tensor(6.6, dtype=torch.float64), 256)  # +0.1 (a tensor, as the trainer passes it)
    assert controller.value == pytest.approx(0.2 * (1 - 0.2 * 0.0256) * (1 + 0.1 * 0.0256), rel=1e-12)
    controller.update(100.0, 512)  # +15.67 clipped to +0.2
    expected = 0.2 * (1 - 0.2 * 0.0256) * (1 + 0.1 * 0.0256) * (1 + 0.2 * 0.0512)
    assert controller.value == pytest.approx(expected, rel=1e-12)
    controller.update(6.0, 512)  # on target: unchanged
    assert controller.value == pytest.approx(expected, rel=1e-12)


def test_fixed_controller_keeps_its_coefficient():
    controller = FixedKLController(0.05)
    for kl in (0.0, 10.0, -3.0):
        controller.update(kl, 64)
    assert controller.value == 0.05


def test_build_kl_controller_picks_the_kind_and_needs_target_and_horizon():
    assert isinstance(build_kl_controller(False, 0.1), FixedKLController)
    adaptive = build_kl_controller(True, 0.1, target=6.0, horizon=1000)
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.1, 6.0, 1000.0)
    with pytest.raises(ValueError, match="target and a horizon"):
        build_kl_controller(True, 0.1, target=6.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_kl_coef": -0.1, "target": 6.0, "horizon": 100}, "initial KL coefficient"),
        ({"init_kl_coef": 0.1, "target": 0.0, "horizon": 100}, "KL target"),
        ({"init_kl_coef": 0.1, "target": 6.0, "horizon": 0}, "horizon"),
    ],
)
def test_adaptive_controller_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaptiveKLController(**kwargs)


def test_adaptive_controller_rejects_a_non_finite_kl():
    controller = AdaptiveKLController(0.1, 6.0, 100)
    with pytest.raises(ValueError, match="current_kl is nan"):
        controller.update(torch.tensor(math.nan), 8)
    assert controller.value == 0.1


def _round_trip(state, through):
    if through == "json":
        return json.loads(json.dumps(state))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("through", ["json", "torch"])
def test_kl_controller_resumes_exactly(through):
    kls = [3.1, 7.9, 5.5, 12.0, 0.4, 6.2]
    uninterrupted = AdaptiveKLController(0.2, 6.0, 1000)
    for kl in kls:
        uninterrupted.update(kl, 32)

    first = AdaptiveKLController(0.2, 6.0, 1000)
    for kl in kls[:3]:
        first.update(kl, 32)
    resumed = AdaptiveKLController(0.2, 6.0, 1000)
    resumed.load_state_dict(_round_trip(first.state_dict(), through))
    for kl in kls[3:]:
        resumed.update(kl, 32)

    assert resumed.value == uninterrupted.value


def test_loading_a_controller_of_the_other_kind_fails_clearly():
    with pytest.raises(ValueError, match="'adaptive' KL controller but this run uses a 'fixed'"):
        FixedKLController(0.1).load_state_dict(AdaptiveKLController(0.1, 6.0, 100).state_dict())


batches_strategy = st.lists(
    st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=0, max_size=12), min_size=1, max_size=6
)


@given(batches=batches_strategy)
@settings(max_examples=40, deadline=None)
def test_running_moments_equal_numpy_over_the_concatenated_batches(batches):
    moments = RunningMoments()
    for batch in batches:
        moments.update(torch.tensor(batch, dtype=torch.float32))

    seen = np.concatenate([np.asarray(b, dtype=np.float32).astype(np.float64) for b in batches])
    assert moments.count == seen.size
    if seen.size == 0:
        return
    scale = max(1.0, float(np.abs(seen).max()))
    assert moments.mean == pytest.approx(seen.mean(), abs=1e-9 * scale)
    if seen.size >= 2:
        assert moments.std == pytest.approx(np.std(seen, ddof=1), rel=1e-7, abs=1e-9 * scale)
    else:
        assert moments.std == 1.0


def test_running_moments_without_spread_scale_by_one():
    moments = RunningMoments()
    assert moments.std == 1.0
    moments.update(torch.tensor([3.0]))
    assert (moments.mean, moments.std) == (3.0, 1.0)
    moments.update(torch.tensor([5.0]))
    assert (moments.mean, moments.std) == (4.0, math.sqrt(2.0))


def test_running_moments_reject_non_finite_scores():
    with pytest.raises(ValueError, match="nan/inf"):
        RunningMoments().update(torch.tensor([1.0, math.inf]))


@pytest.mark.parametrize("through", ["json", "torch"])
def test_running_moments_resume_exactly(through):
    batches = [torch.randn(5, generator=torch.Generator().manual_seed(seed)) * 3 + 1 for seed in range(6)]
    uninterrupted = RunningMoments()
    for batch in batches:
        uninterrupted.update(batch)

    first = RunningMoments()
    for batch in batches[:3]:
        first.update(batch)
    resumed = RunningMoments()
    resumed.load_state_dict(_round_trip(first.state_dict(), through))
    for batch in batches[3:]:
        resumed.update(batch)

    assert resumed.state_dict() == uninterrupted.state_dict()
