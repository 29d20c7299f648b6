"""The evaluate stage: the base and the aligned policy answer the same held-out prompts.

Both policies are sampled by PPO's own sampler (``rollout.sample_rollout``) with PPO's settings
(temperature, top-k, top-p, stop tokens; greedy with ``evaluate.do_sample: false``), so the aligned policy
is evaluated under the distribution it was trained on, whatever a checkpoint's ``generation_config``
says. ``base`` is the reference role: the base with adapters disabled, or the frozen starting adapter with
``reference: policy_init``; ``aligned`` is the trained policy adapter. Same prompts, same seed per batch.

Per policy:

* ``mean_reward``: the reward adapter's score of prompt + response, as PPO scores it (a stop token is
  replaced by the chat template's end-of-turn tokens: the format the reward was trained on);
* ``kl_full``: KL(policy || reference) of each response, exact over the vocabulary at every response
  token (``ppo_math.sequence_kl(..., "full")`` on teacher-forced logits at the sampling temperature),
  averaged over prompts; exactly 0 for the base, which is the reference. (The trainer's ``evaluate()``
  reports the sampled k1 estimate as ``eval_kl_k1``: another number, named for what it is.)
* ``response_length`` (mean tokens, the stop token included) and its ``_median``, ``_p10``, ``_p90``
  (linear interpolation between order statistics, numpy's default), ``stop_rate`` (share of responses that
  emitted a stop token), SQuAD ``exact_match`` and ``f1`` of the decoded answers when the prompts carry
  reference answers, and first of all the ground-truth metrics of ``ground_truth`` when the data
  supplies one (``ground_truth``: the synthetic data's planted rule, or a plugin's);

and ``win_rate``: the share of prompts where the aligned response scores higher than the base one (a tie
counts one half). Writes ``metrics.json``, ``samples.jsonl`` and the PNG plots.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .ground_truth import GroundTruthMetric

POLICIES = ("base", "aligned")
ROLE_OF_POLICY = {"base": "reference", "aligned": "policy"}
METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.jsonl"



# ------------------------------------------------------------------------------------------- sampling


def sampling_settings(ppo, evaluate, tokenizer, model):
    """PPO's ``SamplingSettings`` from the recipe's ``ppo`` section; ``evaluate`` may shorten the responses
    (``max_new_tokens``) or decode greedily (``do_sample: false``). Stop ids as the trainer resolves them."""
    from .prompts import pad_token_id
    from .rollout import ppo_sampling_settings, stop_token_ids

    return ppo_sampling_settings(ppo, stop_token_ids(tokenizer, model, ppo.stop_token), pad_token_id(tokenizer),
                                 max_new_tokens=evaluate.max_new_tokens or ppo.max_new_tokens,
                                 do_sample=evaluate.do_sample)


def reward_scores(model, tokenizer, settings, end_of_turn_token: str | None = "auto") -> Callable[[Any], torch.Tensor]:
    """rollout -> (B,) scores of the reward adapter exactly as PPO scores: on the training format (a stop token
    replaced by the chat template's end-of-turn tokens, ``scoring.RewardAdapterScores``)."""
    from .scoring import RewardAdapterScores, end_of_turn_ids

    scorer = RewardAdapterScores(model, settings.pad_token_id, settings.stop_token_ids,
                                 end_of_turn_ids(tokenizer, end_of_turn_token))
    return lambda rollout: scorer(rollout, {})


def mixed_precision(ppo, device: torch.device):
    """The autocast PPO ran under (the trainer's accelerator: ``bf16`` / ``fp16``), so the evaluation samples
    and scores with the same arithmetic; a no-op context without mixed precision."""
    import contextlib

    if getattr(ppo, "bf16", False):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if getattr(ppo, "fp16", False):
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def sample_policy(model, policy: str, query_ids: torch.Tensor, query_mask: torch.Tensor, settings, seed: int):
    """The rollout of ``policy`` ("base" or "aligned") from PPO's sampler, seeded with ``seed``.

    settings: the ``rollout.SamplingSettings`` PPO samples with; only the role changes (and nothing
    is kept that the evaluation does not read: no values, no logits).
    """
    from .rollout import sample_rollout

    torch.manual_seed(seed)
    settings = replace(settings, role=ROLE_OF_POLICY[policy], capture_values=False, keep_logits=False)
    return sample_rollout(model, query_ids, query_mask, settings)


def kl_full(model, rollout, role: str, temperature: float) -> torch.Tensor:
    """KL(π_role || π_ref) per response (B,): the exact vocabulary KL at every response token, summed.

    Both logits come from teacher-forced forwards over prompt + response at ``temperature``, so a role
    equal to the reference gives exactly 0 (the reference is not run twice).
    """
    from . import ppo_math

    length = rollout.response_ids.shape[1]
    input_ids, attention_mask = rollout.input_ids, rollout.attention_mask
    with torch.no_grad():
        # Position t predicts token t + 1: the last R + 1 logits minus the final one predict the R responses.
        ref_logits = model.reference_logits(input_ids, attention_mask, logits_to_keep=length + 1)[:, :-1]
        if role == "reference":
            logits = ref_logits
        else:
            logits = model.policy_forward(input_ids, attention_mask, logits_to_keep=length + 1)[0][:, :-1]
    logits, ref_logits = logits / temperature, ref_logits / temperature  # (B, R, V)
    labels = rollout.response_ids
    logprobs = ppo_math.logprobs_from_logits(logits, labels)
    ref_logprobs = logprobs if role == "reference" else ppo_math.logprobs_from_logits(ref_logits, labels)
    return ppo_math.sequence_kl(logprobs, ref_logprobs, rollout.response_mask, "full", logits=logits,
                                ref_logits=ref_logits)


# -------------------------------------------------------------------------------------------- metrics


def win_rate(aligned_scores: torch.Tensor, base_scores: torch.Tensor) -> float:
    """Share of prompts where the aligned score is higher; a tie counts one half."""
    wins = (aligned_scores > base_scores).float() + 0.5 * (aligned_scores == base_scores).float()
    return wins.mean().item()


def length_distribution(lengths: Sequence[int]) -> dict[str, float]:
    """Mean, median, 10th and 90th percentile of response lengths (linear interpolation, as numpy)."""
    values = torch.tensor([float(length) for length in lengths], dtype=torch.float64)
    quantiles = torch.quantile(values, torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64)).tolist()
    return {"response_length": values.mean().item(), "response_length_median": quantiles[0],
            "response_length_p10": quantiles[1], "response_length_p90": quantiles[2]}


# ---------------------------------------------------------------------------------------- the stage


@dataclass
class _PolicyRecord:
    """Per-prompt results of one policy, in prompt order."""

    scores: list[float] = field(default_factory=list)
    kl_full: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # decoded response, stop token and special tokens dropped
    response_ids: list[list[int]] = field(default_factory=list)  # as sampled, the stop token included


def evaluate_policies(model, tokenizer, prompts, settings, *, batch_size: int, seed: int,
                      ground_truth: GroundTruthMetric | None = None, end_of_turn_token: str | None = "auto",
                      score: Callable[[Any], torch.Tensor] | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, list[float]]]:
    """Metrics (the metrics.json shape), per-prompt records and per-policy score lists.

    prompts: a dataset with ``input_ids`` (and ``answers`` for SQuAD scores); settings: PPO's
    ``SamplingSettings``. Batch ``k`` (prompts ``start:start + batch_size``) samples both policies with
    seed ``seed + start``. score: rollout -> (B,) scores; default: the reward adapter on the training
    format, as PPO scores (``reward_scores`` with ``end_of_turn_token``, PPO's setting of that name).
    progress: called as ``progress(prompts_done, prompts_total)`` after each batch.
    """
    from .rollout import left_pad

    score = score or reward_scores(model, tokenizer, settings, end_of_turn_token)
    per_policy = {name: _PolicyRecord() for name in POLICIES}
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start:start + batch_size]
        query_ids, query_mask = left_pad([list(ids) for ids in rows["input_ids"]], settings.pad_token_id,
                                         model.device)
        for name in POLICIES:
            rollout = sample_policy(model, name, query_ids, query_mask, settings, seed + start)
            with torch.no_grad():
                scores = score(rollout)
            record = per_policy[name]
            record.scores += scores.float().cpu().tolist()
            record.kl_full += kl_full(model, rollout, ROLE_OF_POLICY[name], settings.temperature).cpu().tolist()
            record.lengths += rollout.response_mask.sum(dim=1).cpu().tolist()
            record.stopped += rollout.stopped.cpu().tolist()
            for response, stopped in zip(rollout.responses(), rollout.stopped.tolist()):
                ids = response.cpu().tolist()
                record.response_ids.append(ids)
                content = ids[:-1] if stopped else ids  # cut at the stop token
                record.texts.append(tokenizer.decode(content, skip_special_tokens=True).strip())
        if progress is not None:
            progress(min(start + batch_size, len(prompts)), len(prompts))
    answers = [list(answer["text"]) for answer in prompts["answers"]] if "answers" in prompts.column_names else None
    metrics: dict[str, Any] = {name: _policy_metrics(per_policy[name], answers, ground_truth, prompts)
                               for name in POLICIES}
    metrics["win_rate"] = win_rate(torch.tensor(per_policy["aligned"].scores), torch.tensor(per_policy["base"].scores))
    if answers is not None:  # which prompts the SQuAD scores cover, and why the others are skipped
        from .data import squad_coverage

        metrics["squad"] = squad_coverage(answers)
    metrics["num_prompts"] = len(prompts)
    records = [
        {"prompt": _prompt_text(prompts[index]), "answers": answers[index] if answers else None,
         **{f"{name}_response": per_policy[name].texts[index] for name in POLICIES},
         **{f"{name}_reward": per_policy[name].scores[index] for name in POLICIES},
         **{f"{name}_response_ids": per_policy[name].response_ids[index] for name in POLICIES}}
        for index in range(len(prompts))
    ]
    scores = {name: per_policy[name].scores for name in POLICIES}
    return metrics, records, scores


def _policy_metrics(record: _PolicyRecord, answers, ground_truth, prompts) -> dict[str, Any]:
    from .data import squad_scores

    count = len(record.scores)
    metrics: dict[str, Any] = {}
    if ground_truth is not None:
        metrics.update(ground_truth(responses=record.texts, prompts=prompts))
    metrics["mean_reward"] = sum(record.scores) / count
    metrics["kl_full"] = sum(record.kl_full) / count
    metrics.update(length_distribution(record.lengths))
    metrics["stop_rate"] = sum(record.stopped) / count
    if answers is not None:
        # v2.0 (chosen when some prompt has no answer) also scores the has_answer / no_answer groups.
        squad = squad_scores(record.texts, answers)
        metrics |= {key: value for key, value in squad.items()
                    if key in ("exact_match", "f1") or key.endswith(("_exact_match", "_f1"))}
    return metrics


def _prompt_text(row: dict[str, Any]) -> str:
    if "question" in row:
        return row["question"]
    prompt = row.get("prompt")
    if isinstance(prompt, list) and prompt:
        return prompt[-1].get("content", "")
    return str(prompt)


def write_outputs(stage_dir: Path, metrics: dict[str, Any], records: list[dict[str, Any]], shown: int) -> None:
    (stage_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    with (stage_dir / SAMPLES_FILE).open("w", encoding="utf-8") as handle:
        for record in records[:shown]:
            handle.write(json.dumps(record) + "\n")
