"""The KL coefficient β of the PPO reward and running reward statistics, with exact resume.

State is kept in Python floats (float64), so ``state_dict()`` round-trips bit-exactly through
``torch.save`` or JSON and a resumed run continues as if it had never stopped.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _finite_float(value: float | torch.Tensor, name: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} is {number}; the KL controller needs a finite value (check rewards and logprobs)")
    return number


class _KLController:
    """β and its (de)serialisation; subclasses define ``update``."""

    kind: str

    def __init__(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"the initial KL coefficient must be >= 0, got {value}")
        self.value = float(value)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(
                f"the checkpoint holds a {state.get('kind')!r} KL controller but this run uses a {self.kind!r} "
                "one; resume with the KL settings the checkpoint was trained with"
            )
        self.value = float(state["value"])


class FixedKLController(_KLController):
    """β stays at ``kl_coef``."""

    kind = "fixed"

    def __init__(self, kl_coef: float) -> None:
        super().__init__(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """Nothing to adapt."""


class AdaptiveKLController(_KLController):
    """β ← β (1 + e·n/H),  e = clip(KL / KL_target − 1, −0.2, 0.2)   (Ziegler et al. 2019, §2.2).

    n = samples seen since the last update (``n_steps``, TRL passes the batch size), H = ``horizon``.
    """

    kind = "adaptive"

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        super().__init__(init_kl_coef)
        if target <= 0:
            raise ValueError(f"the KL target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"the KL horizon must be > 0, got {horizon}")
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        proportional_error = _finite_float(current_kl, "current_kl") / self.target - 1.0
        proportional_error = min(max(proportional_error, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def build_kl_controller(
    adaptive: bool, init_kl_coef: float, target: float | None = None, horizon: float | None = None
) -> FixedKLController | AdaptiveKLController:
    """The controller for the config's KL options: adaptive needs ``target`` and ``horizon``."""
    if not adaptive:
        return FixedKLController(init_kl_coef)
    if target is None or horizon is None:
        raise ValueError("an adaptive KL controller needs a KL target and a horizon; set both, or use a fixed one")
    return AdaptiveKLController(init_kl_coef, target, horizon)


class RunningMoments:
    """Running mean and standard deviation of every value seen, merged batch by batch with the
    parallel-variance formula (Chan, Golub & LeVeque 1979):

    n = n_a + n_b,  δ = μ_b − μ_a,  μ = μ_a + δ n_b / n,  M2 = M2_a + M2_b + δ² n_a n_b / n.

    ``std`` is the unbiased sample standard deviation sqrt(M2 / (n − 1)); with fewer than two values
    there is no spread yet and ``std`` is 1.0, so scaling by it leaves scores unchanged. Under data
    parallelism, gather the scores of every rank before ``update`` so each rank holds the same state.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        return self.m2 / (self.count - 1) if self.count > 1 else 1.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, xs: torch.Tensor) -> None:
        """Add a batch of values (any shape; empty batches are ignored)."""
        xs = xs.detach().double().flatten()
        batch_count = xs.numel()
        if batch_count == 0:
            return
        if not torch.isfinite(xs).all():
            raise ValueError("RunningMoments.update got nan/inf values; check the reward model's scores")
        batch_mean = xs.mean().item()
        batch_m2 = (xs - batch_mean).square().sum().item()
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean += delta * batch_count / total
        self.m2 += batch_m2 + delta * delta * self.count * batch_count / total
        self.count = total

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])
