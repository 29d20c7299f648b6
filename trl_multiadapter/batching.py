"""Mini-batches of a PPO batch: shuffled orders, model inputs, and chunked no-grad passes.

Layout as in ``rollout``: response token j sits at column P + j of ``cat(query_ids, response_ids)`` and
is predicted by the logits at column P + j - 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import ppo_math, shared_prompt
from .rollout import Rollout, TrainingBatch


def minibatch_orders(batch_size: int, ppo_epochs: int, device, group_size: int = 1) -> torch.Tensor:
    """One shuffled order of the batch per PPO epoch (ppo_epochs, B), drawn before any forward.

    ``group_size`` k > 1: rows [g*k, (g+1)*k) are the k samples of prompt g; the groups are shuffled and
    each keeps its rows together, so a mini-batch of a multiple of k rows holds whole groups (and shares
    their prompt computation). 1: every row is shuffled on its own (the draws of a plain run).
    """
    if group_size == 1:
        return torch.stack([torch.randperm(batch_size) for _ in range(ppo_epochs)]).to(device)
    if group_size < 1 or batch_size % group_size:
        raise ValueError(f"batch of {batch_size} rows is not whole groups of group_size={group_size}; give k rows "
                         "per prompt")
    within = torch.arange(group_size)
    orders = [(torch.randperm(batch_size // group_size)[:, None] * group_size + within).flatten()
              for _ in range(ppo_epochs)]
    return torch.stack(orders).to(device)


def forward_inputs(minibatch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + response ids and attention mask without the last response column: that token is never the
    input of a prediction PPO needs, so logits_to_keep=R gives exactly the R response predictions."""
    input_ids = torch.cat([minibatch.query_ids, minibatch.response_ids], dim=1)[:, :-1]
    attention_mask = torch.cat([minibatch.query_mask, minibatch.response_mask], dim=1)[:, :-1]
    return input_ids, attention_mask


def padded_batch(rollout: Rollout) -> TrainingBatch:
    """A TrainingBatch of the rollout's ids and masks, zeros for what optimisation adds later."""
    zeros = torch.zeros_like(rollout.response_ids, dtype=torch.float32)
    return TrainingBatch(rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask,
                         zeros, zeros, zeros, zeros, loss_mask=rollout.loss_mask)


def per_minibatch(rollout: Rollout, order: torch.Tensor, chunk: int,
                  compute: Callable[[TrainingBatch], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Run ``compute`` on trimmed chunks of ``rollout`` taken in ``order``; scatter its (b, w, ...) outputs
    back into zero-filled (B, R, ...) tensors, zero outside the response mask."""
    batch_size, response_length = rollout.response_ids.shape
    gathered: dict[str, torch.Tensor] = {}
    for start in range(0, batch_size, chunk):
        rows = order[start : start + chunk]
        for name, value in compute(padded_batch(rollout.select(rows)).trimmed()).items():
            if name not in gathered:
                gathered[name] = value.new_zeros((batch_size, response_length, *value.shape[2:]))
            gathered[name][rows, : value.shape[1]] = value
    mask = rollout.response_mask.bool()
    for name, value in gathered.items():
        inside = mask.view(*mask.shape, *([1] * (value.dim() - 2)))
        gathered[name] = torch.where(inside, value, torch.zeros((), dtype=value.dtype, device=value.device))
    return gathered


def at_temperature(logits: torch.Tensor | None, temperature: float) -> torch.Tensor | None:
    if logits is None or temperature == 1.0:
        return logits
    return logits / temperature


class RolePasses:
    """The forward passes PPO makes over a batch: policy (with or without grad) and reference (no grad).

    Logprobs are taken at the sampling temperature; ``keep_logits`` also returns the raw logits (for the
    full-vocabulary KL). ``autocast`` is the accelerator's mixed-precision context. ``group_size`` k > 1
    (k samples per prompt): the rows of a (mini-)batch that share a prompt compute it once
    (``shared_prompt``; same numbers, gradients included); 1 computes every row in full.
    """

    def __init__(self, model, temperature: float, mini_batch_size: int, keep_logits: bool, autocast,
                 group_size: int = 1):
        self.model, self.temperature, self.mini_batch_size = model, temperature, mini_batch_size
        self.keep_logits, self.autocast, self.group_size = keep_logits, autocast, group_size

    def _groups(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> shared_prompt.PromptGroups | None:
        return shared_prompt.sharing_groups(self.model, query_ids, query_mask, self.group_size,
                                            needs_grad=torch.is_grad_enabled())

    def policy(self, minibatch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Policy logits (b, R, V), logprobs (b, R) and values (b, R), None without a value model; gradients
        follow the caller."""
        prompt_length, response_length = minibatch.query_ids.shape[1], minibatch.response_ids.shape[1]
        groups = self._groups(minibatch.query_ids, minibatch.query_mask)
        if groups is not None:
            with self.autocast():
                logits, values = shared_prompt.policy_logits_and_values(
                    self.model, minibatch.query_ids, minibatch.query_mask, minibatch.response_ids,
                    minibatch.response_mask, groups)
            logprobs = ppo_math.logprobs_from_logits(logits, minibatch.response_ids, self.temperature)
            return logits, logprobs, None if values is None else values.float()
        input_ids, attention_mask = forward_inputs(minibatch)
        with self.autocast():
            logits, values = self.model.policy_forward(input_ids, attention_mask, logits_to_keep=response_length)
        logprobs = ppo_math.logprobs_from_logits(logits, minibatch.response_ids, self.temperature)
        return logits, logprobs, None if values is None else values[:, prompt_length - 1 :].float()

    def old_logprobs_and_values(self, rollout: Rollout, first_order: torch.Tensor, exact: bool) -> Rollout:
        """Fill what sampling did not capture; with ``exact`` recompute all of it with the training forward
        over the first epoch's mini-batches, so the first probability ratio is exactly 1."""
        if exact:
            def policy(minibatch: TrainingBatch) -> dict[str, torch.Tensor]:
                with torch.no_grad():
                    logits, logprobs, values = self.policy(minibatch)
                return {"logprobs": logprobs, **({"values": values} if values is not None else {}),
                        **({"logits": logits} if self.keep_logits else {})}

            outputs = per_minibatch(rollout, first_order, self.mini_batch_size, policy)
            rollout.logprobs, rollout.values, rollout.logits = outputs["logprobs"], outputs.get("values"), outputs.get("logits")
        elif rollout.values is None and self.model.value_model == "critic":  # one batched no-grad critic pass
            with torch.inference_mode(), self.autocast():
                groups = self._groups(rollout.query_ids, rollout.query_mask)
                if groups is None:
                    values = self.model.critic_values(rollout.input_ids[:, :-1], rollout.attention_mask[:, :-1])
                    values = values[:, rollout.query_ids.shape[1] - 1 :]
                else:
                    values = shared_prompt.critic_values(self.model, rollout.query_ids, rollout.query_mask,
                                                         rollout.response_ids, rollout.response_mask, groups)
            rollout.values = values.float().clone()
        return rollout

    def reference(self, rollout: Rollout, minibatch_order: torch.Tensor | None = None):
        """Reference logprobs (B, R) (and logits when kept): one pass over the batch, or over the
        mini-batches of ``minibatch_order`` (those the old logprobs were computed on)."""
        if minibatch_order is None:
            order = torch.arange(rollout.batch_size, device=rollout.query_ids.device)
            chunk = rollout.batch_size
        else:
            order, chunk = minibatch_order, self.mini_batch_size

        def reference(minibatch: TrainingBatch) -> dict[str, torch.Tensor]:
            with torch.inference_mode(), self.autocast():
                groups = self._groups(minibatch.query_ids, minibatch.query_mask)
                if groups is None:
                    input_ids, attention_mask = forward_inputs(minibatch)
                    logits = self.model.reference_logits(input_ids, attention_mask,
                                                         logits_to_keep=minibatch.response_ids.shape[1])
                else:
                    logits = shared_prompt.reference_logits(self.model, minibatch.query_ids, minibatch.query_mask,
                                                            minibatch.response_ids, minibatch.response_mask, groups)
                logprobs = ppo_math.logprobs_from_logits(logits, minibatch.response_ids, self.temperature)
            return {"logprobs": logprobs.clone(), **({"logits": logits.clone()} if self.keep_logits else {})}

        outputs = per_minibatch(rollout, order, chunk, reference)
        return outputs["logprobs"], outputs.get("logits")
