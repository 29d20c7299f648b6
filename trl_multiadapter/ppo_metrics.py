"""PPO metrics under TRL's names, from a rollout and from the mini-batch losses of one iteration."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch

from .rollout import Rollout


class NonFiniteValueError(FloatingPointError):
    """A NaN or inf reached PPO; raised before any optimizer step could write it into the adapters.

    ``rows`` are this process's rows (empty when another data-parallel process found them; None for a
    value that belongs to no row, such as the gradient norm).
    """

    def __init__(self, step: int, name: str, rows: list[int] | None):
        self.step, self.name, self.rows = step, name, rows
        if rows is None:
            where = "this optimizer step"
        else:
            where = f"rows {rows} of this batch" if rows else "the batch of another process"
        super().__init__(
            f"PPO step {step}: `{name}` has NaN/inf values in {where}; no adapter update was "
            "made. Check the reward source (scores), the learning rate and max_grad_norm (logprobs, losses), or "
            "the prompts of these rows."
        )


def nonfinite_rows(tensor: torch.Tensor, mask: torch.Tensor | None = None) -> list[int]:
    """Rows of ``tensor`` (B, ...) holding NaN/inf (only inside ``mask`` when it has the same shape)."""
    bad = ~torch.isfinite(tensor.detach())
    if mask is not None and bad.shape == mask.shape:
        bad &= mask.bool()
    return bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten().tolist()


@dataclass
class MinibatchResult:
    """Loss and diagnostics of one mini-batch (scalars; ``loss`` keeps its graph). The value terms are None
    without a value model, the KL terms None unless the KL to the reference is in the loss."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor | None
    policy_clipfrac: torch.Tensor
    value_clipfrac: torch.Tensor | None
    approxkl: torch.Tensor
    entropy: torch.Tensor
    ratio: torch.Tensor
    kl_loss: torch.Tensor | None = None  # beta * k3 KL, the term added to the loss
    kl: torch.Tensor | None = None  # the masked mean k3 KL of the mini-batch


class OptimisationRecord:
    """Collects the diagnostics of every mini-batch and optimizer step of one iteration."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)
        self.skipped = 0
        self.grad_norms: list[float] = []

    def add_minibatch(self, result: MinibatchResult) -> None:
        for f in fields(MinibatchResult):
            value = getattr(result, f.name)
            if f.name != "loss" and value is not None:
                self.values[f.name].append(value.item())

    def add_step(self, grad_norm: float | None) -> None:
        if grad_norm is not None:
            self.grad_norms.append(grad_norm)

    def stats(self) -> dict[str, float]:
        values = self.values
        value_stats = {} if "value_loss" not in values else {
            "loss/value_avg": mean(values["value_loss"]), "val/clipfrac_avg": mean(values["value_clipfrac"])}
        kl_stats = {} if "kl_loss" not in values else {
            "loss/kl_avg": mean(values["kl_loss"]), "policy/kl_k3_avg": mean(values["kl"])}
        return {
            "policy/approxkl_avg": mean(values["approxkl"]),
            "policy/clipfrac_avg": mean(values["policy_clipfrac"]),
            "loss/policy_avg": mean(values["policy_loss"]),
            **value_stats,
            **kl_stats,
            "policy/entropy_avg": mean(values["entropy"]),
            "val/ratio": mean(values["ratio"]),
            "val/ratio_var": float(torch.tensor(values["ratio"], dtype=torch.float64).var(unbiased=False)),
            "policy/first_ratio": values["ratio"][0],
            "policy/skipped_minibatches": float(self.skipped),
            "policy/optimizer_steps": float(len(self.grad_norms)),
            "policy/grad_norm": mean(self.grad_norms) if self.grad_norms else 0.0,
        }


def rollout_stats(rollout: Rollout, scores: torch.Tensor, kl: torch.Tensor, non_score_rewards: torch.Tensor,
                  kl_coef: float) -> dict[str, float]:
    """Per-sequence objective metrics: KL and non-score reward summed over the response, then averaged."""
    mask = rollout.loss_mask.bool()
    kl_per_sequence = torch.where(mask, kl, 0.0).sum(1)
    non_score_per_sequence = torch.where(mask, non_score_rewards, 0.0).sum(1)
    sampled_entropy = torch.where(mask, -rollout.logprobs, 0.0).sum(1)
    return {
        "objective/kl": kl_per_sequence.mean().item(),
        "objective/entropy": sampled_entropy.mean().item(),
        "objective/non_score_reward": non_score_per_sequence.mean().item(),
        "objective/rlhf_reward": (scores + non_score_per_sequence).mean().item(),
        "objective/scores": scores.mean().item(),
        "objective/kl_coef": kl_coef,
        "val/num_eos_tokens": rollout.stopped.sum().item(),
        "val/response_length": rollout.response_mask.sum(1).float().mean().item(),
    }


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


class Timings(defaultdict):
    """Seconds per phase of one iteration, under TRL-style ``time/...`` names.

    CUDA kernels run asynchronously: without a synchronisation a phase's time would land in whichever later
    phase waits for the GPU, so on CUDA each measurement synchronises before reading the clock.
    """

    def __init__(self) -> None:
        super().__init__(float)

    @contextmanager
    def measure(self, name: str):
        _synchronise()
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronise()
            self[name] += time.perf_counter() - start


def _synchronise() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class EvaluationTotals:
    """Sums of ``trainer.evaluate()``'s metrics over batches and processes: score, the k1 KL to the
    reference summed over each response (``kl_k1``), response length and stops, per sampled response."""

    def __init__(self, device) -> None:
        self.totals = torch.zeros(5, dtype=torch.float64, device=device)  # score, kl, length, eos, count

    def add(self, rollout: Rollout, scores: torch.Tensor, kl: torch.Tensor) -> None:
        batch = [scores.double().sum(), kl.double().sum(), rollout.response_mask.sum().double(),
                 rollout.stopped.double().sum(), torch.tensor(float(rollout.batch_size), dtype=torch.float64)]
        self.totals += torch.stack([value.to(self.totals.device) for value in batch])

    def metrics(self, prefix: str) -> dict[str, float]:
        from .distributed import sum_across_processes

        totals = sum_across_processes(self.totals)
        count = totals[4].clamp(min=1)
        return {f"{prefix}_score": (totals[0] / count).item(), f"{prefix}_kl_k1": (totals[1] / count).item(),
                f"{prefix}_response_length": (totals[2] / count).item(), f"{prefix}_num_eos_tokens": totals[3].item()}
