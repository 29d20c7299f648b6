"""One prompt, k samples: compute each distinct prompt once and let its responses attend to it.

With ``num_generations = k`` the k rows of a prompt hold the same (left-padded) prompt tokens, and the
prompt is usually most of the sequence. Every pass here runs the decoder over the G distinct prompts
once (with a KV cache), gathers the cache rows so each of the B = G*k rows sees its prompt's keys and
values, and then runs only the response tokens of the B rows on top::

    prompt pass    decoder(prompts (G, P), cache)                -> hidden (G, P, H), cache (G rows)
    gather         cache.batch_select_indices(inverse)          -> cache (B rows), one index per row
    response pass  decoder(responses (B, R), cache, mask (B, P + R), positions from the mask)

Positions continue from the prompt mask (``cumsum - 1`` over prompt + response, as the unshared
forward computes them) and the attention mask covers prompt + response, so every response token sees
exactly the keys and values it sees in the unshared forward: the same math, deduplicated. With
gradients on, the gather is an indexing op, so the gradients of the k responses sum into the one
prompt computation.

Rows are grouped by their prompt ids and mask (``torch.unique``), not by position, so any batch order
works; a mini-batch only needs to hold several rows of a prompt for sharing to pay off.

Where sharing cannot apply, ``sharing_groups`` returns None, the caller runs the unshared forward, and
one log line (once per reason and process) says why: gradient checkpointing in a training forward (it
drops the cache), k-bit weights on CPU with gradients, an attention implementation other than eager /
sdpa, a cache with sliding-window or recurrent layers, a decoder that takes no cache, or prompts that
are not left-padded. A batch in which no two rows share a prompt runs unshared without a line.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch

from .model import last_non_pad_index, position_ids_from_mask
from .model_quant import is_kbit_model, kbit_weights_on_cpu

logger = logging.getLogger(__name__)

SHAREABLE_ATTENTION = ("eager", "sdpa")
_logged_reasons: set[str] = set()


@dataclass(frozen=True)
class PromptGroups:
    """Which rows share a prompt.

    representatives (G,) long: one row index per distinct prompt; inverse (B,) long: the distinct
    prompt (an index into ``representatives``) of each row.
    """

    representatives: torch.Tensor
    inverse: torch.Tensor

    @property
    def num_prompts(self) -> int:
        return self.representatives.numel()


def prompt_groups(query_ids: torch.Tensor, query_mask: torch.Tensor) -> PromptGroups:
    """Group the rows of (B, P) prompts by identical ids and mask."""
    key = torch.cat([query_ids, query_mask.to(query_ids.dtype)], dim=1)  # (B, 2P)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    rows = torch.arange(key.shape[0], device=key.device)
    num_prompts = int(inverse.max()) + 1
    representatives = torch.full((num_prompts,), key.shape[0], dtype=torch.long, device=key.device)
    representatives = representatives.scatter_reduce(0, inverse, rows, reduce="amin")
    return PromptGroups(representatives, inverse)


def log_fallback_once(reason: str) -> None:
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.warning("prompt sharing off, computing every row's prompt: %s", reason)


def sharing_groups(model, query_ids: torch.Tensor, query_mask: torch.Tensor, group_size: int,
                   needs_grad: bool = False) -> PromptGroups | None:
    """The prompt groups to share over, or None for the unshared computation.

    ``group_size`` 1 (sharing not asked for) and a batch without two rows of one prompt return None
    silently; otherwise a None is explained by one log line per reason. ``needs_grad``: the pass will back-propagate.
    """
    if group_size <= 1:
        return None
    reason = unshareable_reason(model, needs_grad)
    if reason is None:
        if not bool(query_mask[:, -1].all()):
            reason = "the prompts are not left-padded (a row's last prompt column is padding)"
        else:
            groups = prompt_groups(query_ids, query_mask)
            # A batch of distinct prompts (evaluation, a mini-batch of one row) has nothing to share: no line.
            return groups if groups.num_prompts < query_ids.shape[0] else None
    log_fallback_once(reason)
    return None


def unshareable_reason(model, needs_grad: bool) -> str | None:
    """Why this model cannot share prompts in such a pass, or None when it can."""
    causal_lm = model.peft_model.get_base_model()
    if needs_grad and model.gradient_checkpointing:
        return "gradient checkpointing recomputes layers in backward and drops the KV cache of a training forward"
    if needs_grad and is_kbit_model(causal_lm) and kbit_weights_on_cpu(causal_lm):
        return "k-bit weights on CPU cannot train"
    attention = getattr(causal_lm.config, "_attn_implementation", None) or "eager"
    if attention not in SHAREABLE_ATTENTION:
        return f"attention implementation {attention!r} is not one sharing supports {SHAREABLE_ATTENTION}"
    if cache_argument(causal_lm.get_decoder()) is None:
        return f"the decoder of {type(causal_lm).__name__} takes no KV cache"
    from transformers.cache_utils import DynamicLayer

    layer_types = {type(layer).__name__ for layer in new_cache(causal_lm).layers if type(layer) is not DynamicLayer}
    if layer_types:
        return f"the model's cache has {sorted(layer_types)} layers (sliding-window or recurrent), not plain ones"
    return None


def cache_argument(decoder) -> str | None:
    """The decoder's KV-cache keyword: ``cache`` (transformers 5.x), ``past_key_values``, or None."""
    parameters = inspect.signature(decoder.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def new_cache(causal_lm):
    from transformers import DynamicCache

    return DynamicCache(config=causal_lm.config)


# ----------------------------------------------------------------------------------------------------
# the decoder passes (in whatever role is active)


def prefill(decoder, query_ids: torch.Tensor, query_mask: torch.Tensor, groups: PromptGroups, cache) -> torch.Tensor:
    """Run the G distinct prompts into ``cache``, then gather its rows to the B rows.

    Returns the final hidden state of the last prompt position of each row (B, H); ``cache`` then
    holds B rows of prompt keys/values.
    """
    ids, mask = query_ids[groups.representatives], query_mask[groups.representatives]  # (G, P)
    outputs = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True,
                      **{cache_argument(decoder): cache})
    cache.batch_select_indices(groups.inverse)
    return outputs.last_hidden_state[:, -1].index_select(0, groups.inverse)


def continuation_hidden(decoder, query_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor,
                        cache) -> torch.Tensor:
    """Final hidden states (B, R, H) of right-padded response tokens on top of a prefilled cache of B rows."""
    attention_mask = torch.cat([query_mask, response_mask.to(query_mask.dtype)], dim=1)  # (B, P + R)
    position_ids = position_ids_from_mask(attention_mask)[:, query_mask.shape[1]:]
    outputs = decoder(input_ids=response_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, **{cache_argument(decoder): cache})
    return outputs.last_hidden_state


def shared_hidden(model, role: str, query_ids, query_mask, response_ids, response_mask,
                  groups: PromptGroups) -> tuple[torch.Tensor, torch.Tensor]:
    """In ``role``: (last prompt hidden (B, H), response hidden (B, R, H)), the prompt computed once per group."""
    causal_lm = model.peft_model.get_base_model()
    decoder = causal_lm.get_decoder()
    with model.role(role):
        cache = new_cache(causal_lm)
        prompt_last = prefill(decoder, query_ids, query_mask, groups, cache)
        if response_ids.shape[1] == 0:
            return prompt_last, prompt_last.new_zeros((prompt_last.shape[0], 0, prompt_last.shape[1]))
        return prompt_last, continuation_hidden(decoder, query_mask, response_ids, response_mask, cache)


def prediction_hidden(model, role: str, query_ids, query_mask, response_ids, response_mask,
                      groups: PromptGroups) -> torch.Tensor:
    """Hidden states (B, R, H) at the positions P-1 .. P+R-2 that predict the R response tokens."""
    prompt_last, hidden = shared_hidden(model, role, query_ids, query_mask, response_ids[:, :-1],
                                        response_mask[:, :-1], groups)
    return torch.cat([prompt_last[:, None], hidden], dim=1)


# ----------------------------------------------------------------------------------------------------
# what the passes read off the hidden states (as MultiAdapterModel's own forwards do)


def policy_logits_and_values(model, query_ids, query_mask, response_ids, response_mask,
                             groups: PromptGroups) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Policy logits (B, R, V) float32 and values (B, R) float32 of the response predictions (None without
    a value model); gradients follow the caller. Same numbers as ``policy_forward(prompt + response[:, :-1],
    logits_to_keep=R)`` with its values from column P-1 on."""
    hidden = prediction_hidden(model, "policy", query_ids, query_mask, response_ids, response_mask, groups)
    logits = model.logits_from_hidden(hidden)
    if model.value_model == "head":
        return logits, model.values_from_hidden(hidden)
    if model.value_model != "critic":  # critic-free estimators: no value model exists
        return logits, None
    return logits, critic_values(model, query_ids, query_mask, response_ids, response_mask, groups)


def critic_values(model, query_ids, query_mask, response_ids, response_mask, groups: PromptGroups) -> torch.Tensor:
    """Values (B, R) float32 at the response predictions, in the critic role (or the policy's head)."""
    role = "critic" if model.value_model == "critic" else "policy"
    return model.values_from_hidden(
        prediction_hidden(model, role, query_ids, query_mask, response_ids, response_mask, groups))


@torch.no_grad()
def reference_logits(model, query_ids, query_mask, response_ids, response_mask, groups: PromptGroups) -> torch.Tensor:
    """Reference logits (B, R, V) float32 of the response predictions, without gradients."""
    return model.logits_from_hidden(prediction_hidden(model, "reference", query_ids, query_mask, response_ids,
                                                      response_mask, groups))


@torch.no_grad()
def reward_scores(model, query_ids, query_mask, response_ids, response_mask, groups: PromptGroups) -> torch.Tensor:
    """Reward (B,) float32: the score head at each row's last response token (at least one
    response token per row), as ``MultiAdapterModel.score`` reads it on the whole sequence."""
    _, hidden = shared_hidden(model, "reward", query_ids, query_mask, response_ids, response_mask, groups)
    last = last_non_pad_index(response_mask)  # (B,)
    return model.scores_from_hidden(hidden[torch.arange(hidden.shape[0], device=hidden.device),
                                           last.to(hidden.device)])  # (B, H) -> (B,)
