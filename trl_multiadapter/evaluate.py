"""The evaluate stage: the base and the aligned policy answer the same held-out prompts.

For each policy (``base`` = the reference role: the base with adapters disabled, or the frozen starting
adapter with ``reference: policy_init``; ``aligned`` = the trained policy adapter), on the same prompts and
with the same sampling seed:

* ``mean_reward``: the reward adapter's score of prompt + response (read at the last response token);
* ``kl``: KL(policy || reference) summed over the response tokens, exact over the vocabulary at each
  position (``ppo_math.kl_penalty(..., "full")``) and averaged over prompts; 0 for the base, which is the
  reference;
* ``response_length`` (tokens, the stop token included), ``stop_rate`` (share of responses that emitted a
  stop token), SQuAD ``exact_match`` and ``f1`` of the decoded answers against the reference answers;

and ``win_rate``: the share of prompts where the aligned response scores higher than the base one (a tie
counts one half). Writes ``metrics.json``, ``samples.jsonl`` and the PNG plots.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

POLICIES = ("base", "aligned")
ROLE_OF_POLICY = {"base": "reference", "aligned": "policy"}
METRICS_FILE = "metrics.json"
SAMPLES_FILE = "samples.jsonl"


@dataclass
class Generations:
    """Responses of one policy to a batch of prompts; rows follow the prompt order."""

    input_ids: torch.Tensor  # (B, P + R): left-padded prompt, then the response, right-padded
    attention_mask: torch.Tensor  # (B, P + R)
    response_mask: torch.Tensor  # (B, R): 1 on response tokens up to and including the first stop token
    stopped: torch.Tensor  # (B,) bool


def response_mask_after_stop(response_ids: torch.Tensor, stop_token_ids: tuple[int, ...]) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """Mask (B, R) that keeps tokens up to and including the first stop token, and whether one occurred (B,)."""
    is_stop = torch.zeros_like(response_ids, dtype=torch.bool)
    for token_id in stop_token_ids:
        is_stop |= response_ids == token_id
    # A token is kept while no stop token occurred strictly before it.
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()
    return (stops_before == 0).long(), is_stop.any(dim=1)


def generate(model, role: str, query_ids: torch.Tensor, query_mask: torch.Tensor, *, max_new_tokens: int,
             do_sample: bool, temperature: float, top_k: int, top_p: float, pad_token_id: int,
             stop_token_ids: tuple[int, ...], seed: int) -> Generations:
    """Sample (or decode greedily) in ``role`` with transformers' ``generate`` on the shared base."""
    causal_lm = model.peft_model.get_base_model()
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"do_sample": do_sample, "max_new_tokens": max_new_tokens, "pad_token_id": pad_token_id,
                              "eos_token_id": list(stop_token_ids)}
    if do_sample:
        kwargs.update(temperature=temperature, top_k=top_k, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    with torch.no_grad(), model.role(role):
        output = causal_lm.generate(input_ids=query_ids, attention_mask=query_mask, **kwargs)
    response_ids = output[:, query_ids.shape[1]:]
    response_mask, stopped = response_mask_after_stop(response_ids, stop_token_ids)
    response_ids = torch.where(response_mask.bool(), response_ids, pad_token_id)
    return Generations(
        input_ids=torch.cat([query_ids, response_ids], dim=1),
        attention_mask=torch.cat([query_mask, response_mask], dim=1),
        response_mask=response_mask,
        stopped=stopped,
    )


def sequence_kl(model, generations: Generations, temperature: float) -> torch.Tensor:
    """KL(policy || reference) per sequence (B,), exact over the vocabulary at every response token."""
    from . import ppo_math

    length = generations.response_mask.shape[1]
    with torch.no_grad():
        policy_logits, _ = model.policy_forward(generations.input_ids, generations.attention_mask,
                                                logits_to_keep=length + 1)
        reference_logits = model.reference_logits(generations.input_ids, generations.attention_mask,
                                                  logits_to_keep=length + 1)
    # Position t predicts token t + 1: the last R + 1 logits minus the final one predict the R response tokens.
    policy_logits = policy_logits[:, :-1] / temperature
    reference_logits = reference_logits[:, :-1] / temperature
    labels = generations.input_ids[:, -length:]
    logprobs = ppo_math.logprobs_from_logits(policy_logits, labels)
    ref_logprobs = ppo_math.logprobs_from_logits(reference_logits, labels)
    kl = ppo_math.kl_penalty(logprobs, ref_logprobs, "full", logits=policy_logits, ref_logits=reference_logits)
    return (kl * generations.response_mask).sum(dim=1)


def win_rate(aligned_scores: torch.Tensor, base_scores: torch.Tensor) -> float:
    """Share of prompts where the aligned score is higher; a tie counts one half."""
    wins = (aligned_scores > base_scores).float() + 0.5 * (aligned_scores == base_scores).float()
    return wins.mean().item()


def evaluate_policies(model, tokenizer, prompts, *, batch_size: int, max_new_tokens: int, do_sample: bool,
                      temperature: float, top_k: int, top_p: float, stop_token_ids: tuple[int, ...],
                      seed: int) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, list[float]]]:
    """Metrics (the metrics.json shape), per-prompt records and per-policy score lists."""
    from .data import squad_scores
    from .rollout import left_pad

    pad_token_id = tokenizer.pad_token_id
    per_policy: dict[str, dict[str, list]] = {name: {"scores": [], "kl": [], "length": [], "stopped": [],
                                                     "text": []} for name in POLICIES}
    device = model.device
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start:start + batch_size]
        query_ids, query_mask = left_pad([list(ids) for ids in rows["input_ids"]], pad_token_id, device)
        for name in POLICIES:
            generations = generate(model, ROLE_OF_POLICY[name], query_ids, query_mask, max_new_tokens=max_new_tokens,
                                   do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                   pad_token_id=pad_token_id, stop_token_ids=stop_token_ids, seed=seed + start)
            with torch.no_grad():
                scores = model.score(generations.input_ids, generations.attention_mask)
            kl = (torch.zeros(len(rows["input_ids"])) if name == "base"  # the base is the reference
                  else sequence_kl(model, generations, temperature))
            record = per_policy[name]
            record["scores"] += scores.float().cpu().tolist()
            record["kl"] += kl.float().cpu().tolist()
            record["length"] += generations.response_mask.sum(dim=1).cpu().tolist()
            record["stopped"] += generations.stopped.cpu().tolist()
            response_ids = generations.input_ids[:, query_ids.shape[1]:]
            record["text"] += [tokenizer.decode(ids[mask.bool()], skip_special_tokens=True).strip()
                               for ids, mask in zip(response_ids, generations.response_mask)]
    answers = [list(answer["text"]) for answer in prompts["answers"]] if "answers" in prompts.column_names else None
    metrics: dict[str, Any] = {}
    for name in POLICIES:
        record = per_policy[name]
        count = len(record["scores"])
        metrics[name] = {
            "mean_reward": sum(record["scores"]) / count,
            "kl": sum(record["kl"]) / count,
            "response_length": sum(record["length"]) / count,
            "stop_rate": sum(record["stopped"]) / count,
        }
        if answers is not None:
            squad = squad_scores(record["text"], answers)
            metrics[name]["exact_match"] = squad["exact_match"]
            metrics[name]["f1"] = squad["f1"]
    metrics["win_rate"] = win_rate(torch.tensor(per_policy["aligned"]["scores"]),
                                   torch.tensor(per_policy["base"]["scores"]))
    metrics["num_prompts"] = len(prompts)
    records = [
        {"prompt": _prompt_text(prompts[index]), "answers": answers[index] if answers else None,
         **{f"{name}_response": per_policy[name]["text"][index] for name in POLICIES},
         **{f"{name}_reward": per_policy[name]["scores"][index] for name in POLICIES}}
        for index in range(len(prompts))
    ]
    scores = {name: per_policy[name]["scores"] for name in POLICIES}
    return metrics, records, scores


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
