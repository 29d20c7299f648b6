"""TRL 0.11's ``step()`` statistics, computed from what one native PPO iteration used.

TRL 0.11 returned 31 keys (``objective/*``, ``ppo/*``, ``tokens/*``, ``time/ppo/*``); the native trainer
reports TRL's later names. :class:`StepRecord` collects, during one native iteration, the tensors those
keys are made of (the rollout after the old-logprob pass, the reference logprobs, the scores after
scaling and clipping, and each training mini-batch's forward outputs); the functions here turn them
into TRL 0.11's keys with TRL 0.11's meaning, using ``ppo_math`` for every quantity it defines.

Differences, all in the shapes of the array-valued keys: ``objective/logprobs`` / ``ref_logprobs`` are
(B, R) over response positions (TRL: (B, T - 1) over the whole padded sequence), and
``ppo/policy/advantages`` / ``ppo/policy/ratio`` hold the response tokens of every training forward
(TRL also kept padded positions, filled with -1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import ppo_math

SCALAR_MINIBATCH_KEYS = (
    "loss/policy", "loss/value", "loss/total", "policy/entropy", "policy/approxkl", "policy/policykl",
    "policy/clipfrac", "policy/advantages_mean", "returns/mean", "returns/var", "val/vpred", "val/error",
    "val/clipfrac", "val/mean", "val/var",
)
ARRAY_MINIBATCH_KEYS = ("policy/advantages", "policy/ratio")


@dataclass
class LossSettings:
    """The config values TRL 0.11's ``loss`` used."""

    cliprange: float
    cliprange_value: float
    vf_coef: float
    ratio_threshold: float
    temperature: float


@dataclass
class StepRecord:
    """What one PPO iteration used, detached; filled while the native iteration runs."""

    started: float = field(default_factory=time.perf_counter)
    forward_started: float | None = None
    reference_done: float | None = None
    scores_shaped: float | None = None
    optimisation_started: float | None = None
    query_mask: torch.Tensor | None = None  # (B, P)
    response_mask: torch.Tensor | None = None  # (B, R)
    loss_mask: torch.Tensor | None = None  # (B, R)
    logprobs: torch.Tensor | None = None  # (B, R)
    logits: torch.Tensor | None = None  # (B, R, V), full KL only
    ref_logprobs: torch.Tensor | None = None  # (B, R)
    ref_logits: torch.Tensor | None = None  # (B, R, V), full KL only
    scores: torch.Tensor | None = None  # (B,) after scaling and clipping
    kl_coef: float | None = None
    minibatches: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def add_rollout(self, rollout) -> None:
        self.query_mask, self.response_mask, self.loss_mask = rollout.query_mask, rollout.response_mask, rollout.loss_mask
        self.logprobs, self.logits = rollout.logprobs.detach(), rollout.logits

    def complete(self) -> bool:
        return self.logprobs is not None and self.ref_logprobs is not None and self.scores is not None


def minibatch_stats(minibatch, logits: torch.Tensor, logprobs: torch.Tensor, values: torch.Tensor,
                    settings: LossSettings) -> dict[str, torch.Tensor]:
    """TRL 0.11's ``loss()`` statistics of one training forward (every tensor (b, R) / (b, R, V), detached).

    minibatch: the ``TrainingBatch`` the forward ran on (old logprobs and values, advantages, returns,
    loss mask). A mini-batch whose mean ratio exceeds ``ratio_threshold`` reports zero losses, as TRL 0.11
    (the native trainer skips its backward).
    """
    mask = minibatch.loss_mask.bool()
    old_logprobs, old_values = minibatch.old_logprobs, minibatch.old_values
    advantages, returns = minibatch.advantages, minibatch.returns
    pg_loss, pg_clipfrac, approxkl = ppo_math.policy_loss(logprobs, old_logprobs, advantages, mask, settings.cliprange)
    vf_loss, vf_clipfrac = ppo_math.value_loss(values, old_values, returns, mask, settings.cliprange_value)
    ratio = torch.exp(logprobs - old_logprobs)
    if ppo_math.masked_mean(ratio, mask) > settings.ratio_threshold:
        pg_loss, vf_loss = pg_loss * 0.0, vf_loss * 0.0
    entropy = ppo_math.entropy_from_logits(logits / settings.temperature if settings.temperature != 1.0 else logits)
    return {
        "loss/policy": pg_loss,
        "loss/value": vf_loss,
        "loss/total": pg_loss + settings.vf_coef * vf_loss,
        "policy/entropy": ppo_math.masked_mean(entropy, mask),
        "policy/approxkl": approxkl,
        "policy/policykl": ppo_math.masked_mean(old_logprobs - logprobs, mask),
        "policy/clipfrac": pg_clipfrac,
        "policy/advantages": advantages[mask],
        "policy/advantages_mean": ppo_math.masked_mean(advantages, mask),
        "policy/ratio": ratio[mask],
        "returns/mean": ppo_math.masked_mean(returns, mask),
        "returns/var": ppo_math.masked_var(returns, mask),
        "val/vpred": ppo_math.masked_mean(values, mask),
        "val/error": ppo_math.masked_mean((values - returns).square(), mask),
        "val/clipfrac": vf_clipfrac,
        "val/mean": ppo_math.masked_mean(old_values, mask),
        "val/var": ppo_math.masked_var(old_values, mask),
    }


def step_stats(record: StepRecord, kl_estimator: str, temperature: float) -> dict[str, float | np.ndarray]:
    """TRL 0.11's ``record_step_stats`` keys (without ``time/*`` and ``ppo/learning_rate``)."""
    mask = record.loss_mask.bool()
    kl = ppo_math.kl_penalty(record.logprobs, record.ref_logprobs, kl_estimator,
                             logits=_at(record.logits, temperature), ref_logits=_at(record.ref_logits, temperature))
    kl = torch.where(mask, kl, 0.0)
    kl_per_sequence = kl.sum(dim=1)  # (B,)
    non_score_reward = -record.kl_coef * kl
    scores = record.scores.float()
    query_lengths = record.query_mask.sum(dim=1).float()
    response_lengths = record.response_mask.sum(dim=1).float()
    stats: dict[str, float | np.ndarray] = {
        "objective/kl": kl_per_sequence.mean().item(),
        "objective/kl_dist": _array(kl_per_sequence),
        "objective/logprobs": _array(torch.where(mask, record.logprobs, 0.0)),
        "objective/ref_logprobs": _array(torch.where(mask, record.ref_logprobs, 0.0)),
        "objective/kl_coef": float(record.kl_coef),
        "objective/entropy": torch.where(mask, -record.logprobs, 0.0).sum(dim=1).mean().item(),
        "ppo/mean_non_score_reward": ppo_math.masked_mean(non_score_reward, mask).item(),
        "ppo/mean_scores": scores.mean().item(),
        "ppo/std_scores": scores.std().item(),
        "tokens/queries_len_mean": query_lengths.mean().item(),
        "tokens/queries_len_std": query_lengths.std().item(),
        "tokens/queries_dist": _array(query_lengths),
        "tokens/responses_len_mean": response_lengths.mean().item(),
        "tokens/responses_len_std": response_lengths.std().item(),
        "tokens/responses_dist": _array(response_lengths),
    }
    stats.update(optimisation_stats(record.minibatches))
    return stats


def optimisation_stats(minibatches: list[dict[str, torch.Tensor]]) -> dict[str, float | np.ndarray]:
    """Mean of each scalar over every training forward of the iteration, arrays concatenated, ``ppo/`` names."""
    stats: dict[str, float | np.ndarray] = {}
    for key in SCALAR_MINIBATCH_KEYS:
        stats[f"ppo/{key}"] = torch.stack([entry[key].float() for entry in minibatches]).mean().item()
    for key in ARRAY_MINIBATCH_KEYS:
        stats[f"ppo/{key}"] = _array(torch.cat([entry[key].flatten().float() for entry in minibatches]))
    stats["ppo/val/var_explained"] = 1.0 - stats["ppo/val/error"] / stats["ppo/returns/var"]
    return stats


def timing_stats(record: StepRecord, optimisation_seconds: float, stats_seconds: float) -> dict[str, float]:
    """TRL 0.11's ``time/ppo/*``, measured on the native iteration's phases."""
    return {
        "time/ppo/forward_pass": record.reference_done - record.forward_started,
        "time/ppo/compute_rewards": record.scores_shaped - record.reference_done,
        "time/ppo/compute_advantages": record.optimisation_started - record.scores_shaped,
        "time/ppo/optimize_step": optimisation_seconds,
        "time/ppo/calc_stats": stats_seconds,
        "time/ppo/total": time.perf_counter() - record.started,
    }


def _at(logits: torch.Tensor | None, temperature: float) -> torch.Tensor | None:
    return logits if logits is None or temperature == 1.0 else logits / temperature


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()
