"""Where PPO's scores come from: the reward adapter, or reward functions, in the training format.

A reward adapter was trained on conversations rendered by the chat template, so every answer it saw
ends the way the template ends an assistant turn (``<|eot_id|>`` for Llama 3). Sampling may stop on
any of the model's stop ids (Llama-3.1-8B-Instruct also stops on ``<|end_of_text|>`` and
``<|eom_id|>``); a policy scored on a stop token the reward never saw learns to pick that token (it
did, in the tiny demo). So the scorer replaces the stop token that ended a response by the template's
end-of-turn tokens before scoring, on token ids (no decode/re-encode). A response that never stopped is
scored as it stands.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from . import shared_prompt
from .prompts import is_conversational, pad_token_id
from .rollout import Rollout, left_pad, right_pad

RewardFunction = Callable[..., Sequence[float | None]]
_CONTENT_MARK = "trl-multiadapter-end-of-turn-probe"


def end_of_turn_ids(tokenizer, token: str | None = "auto") -> tuple[int, ...]:
    """The token ids that close an assistant turn in the training format.

    ``"auto"``: render a one-message assistant conversation with the tokenizer's chat template and read
    what follows the content (``()`` when there is no template). A token string: that token. None: no
    replacement (score responses exactly as sampled).
    """
    if token is None:
        return ()
    if token != "auto":
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"end_of_turn_token={token!r} is not a token of the tokenizer; use 'auto', null or a token")
        return (int(token_id),)
    if getattr(tokenizer, "chat_template", None) is None:
        return ()
    conversation = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _CONTENT_MARK}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    suffix = text[text.rindex(_CONTENT_MARK) + len(_CONTENT_MARK):]
    return tuple(tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else ()


def training_format_ids(response_ids: Sequence[int], stop_ids, end_ids: Sequence[int]) -> list[int]:
    """One response as the reward saw answers in training: a final stop token replaced by ``end_ids``.

    Sampling cuts a response after its first stop token, so a stopped response ends with it; a response
    that never stopped is returned as it stands.
    """
    ids = [int(token) for token in response_ids]
    if end_ids and ids and ids[-1] in stop_ids:
        return ids[:-1] + list(end_ids)
    return ids


def training_format_responses(rollout: Rollout, stop_ids: Sequence[int], end_ids: Sequence[int]) -> list[torch.Tensor]:
    """Every response of a rollout in the training format (``training_format_ids``), as 1-D tensors."""
    return [ids.new_tensor(training_format_ids(ids[mask.bool()].tolist(), stop_ids, end_ids))
            for ids, mask in zip(rollout.response_ids, rollout.response_mask)]


class RewardAdapterScores:
    """Scores (B,) float32 from the model's reward adapter, read at the last token of the training format.

    ``group_size`` k > 1 (k samples per prompt): rows with the same prompt compute it once
    (``shared_prompt``); only the responses differ, end-of-turn replacement included.
    """

    def __init__(self, model, pad_token_id: int, stop_ids: Sequence[int] = (), end_ids: Sequence[int] = (),
                 autocast: Callable[[], AbstractContextManager] = nullcontext, group_size: int = 1):
        if "reward" not in model.roles:
            raise ValueError(
                "no reward source: pass reward_adapter=<dir> (or a MultiAdapterModel built with one) or "
                "reward_funcs=[callable], or give scores to step()"
            )
        self.model, self.pad_token_id, self.autocast = model, pad_token_id, autocast
        self.stop_ids, self.end_ids = {int(i) for i in stop_ids}, tuple(end_ids)
        self.group_size = group_size

    def __call__(self, rollout: Rollout, columns: dict[str, list]) -> torch.Tensor:
        responses = training_format_responses(rollout, self.stop_ids, self.end_ids)
        groups = shared_prompt.sharing_groups(self.model, rollout.query_ids, rollout.query_mask, self.group_size)
        if groups is not None and all(response.numel() for response in responses):
            response_ids, response_mask = right_pad(responses, self.pad_token_id, rollout.query_ids.device)
            with torch.inference_mode(), self.autocast():
                scores = shared_prompt.reward_scores(self.model, rollout.query_ids, rollout.query_mask,
                                                     response_ids, response_mask, groups)
            return scores.float().clone()
        prompts = [ids[mask.bool()] for ids, mask in zip(rollout.query_ids, rollout.query_mask)]
        input_ids, attention_mask = left_pad(
            [torch.cat([prompt, response]) for prompt, response in zip(prompts, responses)],
            self.pad_token_id, rollout.query_ids.device,
        )
        with torch.inference_mode(), self.autocast():
            scores = self.model.score(input_ids, attention_mask)
        return scores.float().clone()


class RewardFunctionScores:
    """Scores from TRL-style reward functions ``f(prompts=, completions=, completion_ids=, **columns)``.

    Several functions are summed with ``weights``; a function may return None for a row it does not
    apply to (as in TRL's GRPO), but every row needs at least one score.
    """

    def __init__(self, functions: Sequence[RewardFunction], weights: Sequence[float] | None, tokenizer,
                 trainer_state: Callable[[], Any] = lambda: None):
        self.functions = list(functions)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.functions)
        if len(self.weights) != len(self.functions):
            raise ValueError(
                f"reward_weights has {len(self.weights)} entries but there are {len(self.functions)} reward_funcs; "
                "give one weight per function"
            )
        self.tokenizer, self.trainer_state = tokenizer, trainer_state

    def __call__(self, rollout: Rollout, columns: dict[str, list]) -> torch.Tensor:
        completion_ids = [ids[mask.bool()].tolist() for ids, mask in zip(rollout.response_ids, rollout.response_mask)]
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        prompts = columns.get("prompt") or self.tokenizer.batch_decode(
            [ids[mask.bool()].tolist() for ids, mask in zip(rollout.query_ids, rollout.query_mask)]
        )
        completions = [
            [{"role": "assistant", "content": text}] if is_conversational(prompt) else text
            for prompt, text in zip(prompts, texts)
        ]
        extra = {key: value for key, value in columns.items() if key not in ("prompt", "completion")}
        total = torch.zeros(rollout.batch_size, dtype=torch.float64)
        seen = torch.zeros(rollout.batch_size, dtype=torch.bool)
        for function, weight in zip(self.functions, self.weights):
            values = function(prompts=prompts, completions=completions, completion_ids=completion_ids,
                              trainer_state=self.trainer_state(), **extra)
            values, present = _reward_values(values, rollout.batch_size, _function_name(function))
            total += torch.where(present, weight * values, 0.0)
            seen |= present
        if not bool(seen.all()):
            rows = (~seen).nonzero().flatten().tolist()
            raise ValueError(f"every reward function returned None for rows {rows}; at least one must score each row")
        return total.float().to(rollout.query_ids.device)


def as_reward_functions(reward_funcs) -> list[RewardFunction]:
    if reward_funcs is None:
        return []
    functions = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
    for index, function in enumerate(functions):
        if not callable(function):
            raise TypeError(
                f"reward_funcs[{index}] is a {type(function).__name__}; pass callables "
                "f(prompts=..., completions=..., **kwargs) -> list[float]"
            )
    return functions


def scores_tensor(scores, batch_size: int, device) -> torch.Tensor:
    """Scores given to ``step()`` (a tensor or a list of scalars) as a (B,) float32 tensor."""
    if isinstance(scores, torch.Tensor):
        values = scores.detach().float().flatten()
    else:
        values = torch.stack([torch.as_tensor(score, dtype=torch.float32).reshape(()) for score in scores])
    if values.numel() != batch_size:
        raise ValueError(f"step() got {values.numel()} scores for {batch_size} responses; give one per response")
    return values.to(device)


def _function_name(function) -> str:
    return getattr(function, "__name__", type(function).__name__)


def _reward_values(values, batch_size: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B,) float64, present (B,) bool); a NaN stays NaN so the finiteness check reports it."""
    values = list(values)
    if len(values) != batch_size:
        raise ValueError(f"reward function {name} returned {len(values)} values for {batch_size} completions")
    present = torch.tensor([value is not None for value in values])
    numbers = torch.tensor([0.0 if value is None else float(value) for value in values], dtype=torch.float64)
    return numbers, present


def reward_source_for(model, functions: Sequence[RewardFunction], args, tokenizer, stop_ids: Sequence[int],
                      autocast=nullcontext, trainer_state: Callable[[], Any] = lambda: None, group_size: int = 1):
    """The trainer's reward source: the reward functions when given, else the model's reward adapter
    (scoring in the training format; ``group_size`` k > 1 shares each prompt's computation), else None
    (scores must then come with ``step()``)."""
    if functions:
        return RewardFunctionScores(functions, args.reward_weights, tokenizer, trainer_state)
    if args.reward_weights is not None:
        raise ValueError("reward_weights are given but there are no reward_funcs; drop them or pass the functions")
    if "reward" not in model.roles:
        return None
    end_ids = end_of_turn_ids(tokenizer, args.end_of_turn_token)
    return RewardAdapterScores(model, pad_token_id(tokenizer), stop_ids, end_ids, autocast, group_size)
