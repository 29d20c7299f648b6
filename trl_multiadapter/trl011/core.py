"""The ``trl.core`` names TRL 0.11 scripts import, with TRL 0.11's signatures.

    # from trl.core import LengthSampler, respond_to_batch
    from trl_multiadapter.trl011.core import LengthSampler, respond_to_batch

The tensor helpers call ``ppo_math`` where it computes the same quantity, so there is one
implementation of each; the differences are named in each docstring. ``respond_to_batch`` samples
with the project's one sampler (``rollout.sample_rollout``) when given a ``MultiAdapterModel``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .. import ppo_math

WANDB_PADDING = -1  # fill value of stack_dicts, as in TRL 0.11


class LengthSampler:
    """Draws an integer uniformly from ``[min_value, max_value)`` (the upper end excluded, as in TRL 0.11)
    with numpy's global generator, so ``set_seed`` makes the draws reproducible."""

    def __init__(self, min_value: int, max_value: int):
        if int(max_value) <= int(min_value):
            raise ValueError(
                f"LengthSampler({min_value}, {max_value}) has no values: max_value is excluded, so it must be "
                "larger than min_value"
            )
        self.values = list(range(int(min_value), int(max_value)))

    def __call__(self) -> int:
        return int(self.values[np.random.randint(len(self.values))])


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, numpy and torch (every device), as TRL 0.11's ``set_seed``."""
    from transformers import set_seed as transformers_set_seed

    transformers_set_seed(seed)


def respond_to_batch(model, queries: torch.Tensor, txt_len: int = 20, top_k: int = 0,
                     top_p: float = 1.0) -> torch.Tensor:
    """Sample exactly ``txt_len`` tokens after each row of ``queries`` (B, P) (no stop token, no padding).
    Returns the sampled tokens (B, txt_len).

    A ``MultiAdapterModel`` samples with its policy adapter through ``rollout.sample_rollout`` (KV cache,
    dropout off); a plain transformers causal LM through its own ``generate``.
    """
    from ..model import MultiAdapterModel
    from ..rollout import SamplingSettings, sample_rollout

    queries = torch.as_tensor(queries)
    if queries.dim() != 2:
        raise ValueError(f"respond_to_batch takes queries of shape (batch, length), got {tuple(queries.shape)}")
    if isinstance(model, MultiAdapterModel):
        settings = SamplingSettings(max_new_tokens=int(txt_len), top_k=int(top_k), top_p=float(top_p),
                                    stop_token_ids=(), capture_values=False)
        queries = queries.to(model.device)
        return sample_rollout(model, queries, torch.ones_like(queries), settings).response_ids
    output = model.generate(input_ids=queries, attention_mask=torch.ones_like(queries), do_sample=True,
                            top_k=int(top_k), top_p=float(top_p), min_new_tokens=int(txt_len),
                            max_new_tokens=int(txt_len))
    return output[:, -int(txt_len):]


def top_k_top_p_filtering(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, filter_value: float = -float("inf"),
                          min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Logits (B, V) with everything outside the top-k / nucleus set to ``filter_value`` (transformers' warpers)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    if top_k > 0:
        logits = TopKLogitsWarper(top_k=int(top_k), filter_value=filter_value,
                                  min_tokens_to_keep=min_tokens_to_keep)(None, logits)
    if 0 <= top_p < 1.0:
        logits = TopPLogitsWarper(top_p=top_p, filter_value=filter_value,
                                  min_tokens_to_keep=min_tokens_to_keep)(None, logits)
    return logits


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor | None, gather: bool = True) -> torch.Tensor:
    """log softmax of logits (B, T, V) at ``labels`` (B, T), or the whole (B, T, V) with ``gather=False``."""
    if not gather:
        return torch.log_softmax(logits.float(), dim=-1)
    return ppo_math.logprobs_from_logits(logits, labels)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    return ppo_math.masked_mean(values, mask, axis)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked entries (n - 1 divisor when ``unbiased``); an empty mask raises, as in TRL 0.11."""
    if unbiased and int(mask.sum()) == 0:
        raise ValueError("masked_var: the mask is empty (mini_batch_size=1 with a fully masked response?)")
    return ppo_math.masked_var(values, mask, unbiased)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whitened values over the mask. Differs from TRL 0.11 where that divided by zero or leaked: one
    masked entry keeps scale 1 (TRL: nan), and entries outside the mask are 0."""
    return ppo_math.masked_whiten(values, mask, shift_mean)


def whiten(values: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``masked_whiten`` over every entry."""
    return ppo_math.masked_whiten(values, torch.ones_like(values, dtype=torch.bool), shift_mean)


def clip_by_value(x: torch.Tensor, tensor_min, tensor_max) -> torch.Tensor:
    """Elementwise clamp of ``x`` to [tensor_min, tensor_max] (tensors or numbers)."""
    return torch.max(torch.min(x, torch.as_tensor(tensor_max, dtype=x.dtype, device=x.device)),
                     torch.as_tensor(tensor_min, dtype=x.dtype, device=x.device))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    return ppo_math.entropy_from_logits(logits)


def flatten_dict(nested: Mapping, sep: str = "/") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; a key containing ``sep`` raises."""
    flat: dict = {}

    def visit(mapping: Mapping, prefix: str) -> None:
        for key, value in mapping.items():
            if sep in key:
                raise ValueError(f"flatten_dict: separator {sep!r} is not allowed in key {key!r}")
            if isinstance(value, Mapping):
                visit(value, f"{prefix}{key}{sep}")
            else:
                flat[f"{prefix}{key}"] = value

    visit(nested, "")
    return flat


def stack_dicts(stats_dicts: list[dict]) -> dict:
    """One (n, longest) tensor per key: each dict's flattened value as a row, padded with WANDB_PADDING."""
    from torch.nn.utils.rnn import pad_sequence

    return {key: pad_sequence([torch.flatten(stats[key]) for stats in stats_dicts], batch_first=True,
                              padding_value=WANDB_PADDING) for key in stats_dicts[0]}


def stats_to_np(stats: dict) -> dict:
    """Tensors -> numpy arrays (bf16 as float32); numpy and Python scalars -> float."""
    converted = {}
    for key, value in stats.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
        converted[key] = float(value) if np.isscalar(value) else value
    return converted


def convert_to_scalar(stats: dict) -> dict:
    """Single-element tensors and arrays -> Python numbers (what tensorboard can log); others unchanged."""
    converted = {}
    for key, value in stats.items():
        if isinstance(value, (torch.Tensor, np.ndarray)) and (value.ndim == 0 or value.shape == (1,)):
            value = value.item()
        converted[key] = value
    return converted
