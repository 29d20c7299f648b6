"""Rollouts for multi-adapter PPO: the one sampler, padding, and per-mini-batch slicing.

``sample_rollout`` is the project's only sampler: PPO's rollouts, the evaluate stage (base and aligned
policy) and ``trl-multiadapter generate`` all call it, so every stage samples from the same distribution.
It runs its own short decode loop over the model's decoder instead of ``generate()``: each step
already computes the final hidden state and the raw logits of the next token, so the log-probabilities
(at the sampling temperature) and the value head's values are read off the same pass. That removes the
separate no-grad "rollout forward" TRL 0.11 ran after generation, and the sampling distribution is
exactly softmax(logits / temperature) with optional top-k / top-p, whatever a model's
``generation_config`` says (``generate()`` would merge in e.g. a checkpoint's repetition penalty).
Top-k and top-p use transformers' own warpers; ``do_sample=False`` takes the argmax of the raw logits.
``SamplingSettings.role`` picks who samples: the policy adapter, or the reference (adapters disabled, or
the frozen ``policy_init`` adapter), which is the "base" policy of the evaluate stage.

Layout (one row per prompt)::

    query_ids      [pad pad p1 p2 p3]          left-padded prompt, shape (B, P)
    response_ids   [r1 r2 <eot> pad pad]       sampled tokens, pad after the first stop token, (B, R)
    response_mask  [ 1  1   1    0   0 ]       1 up to and including the stop token

``input_ids = cat(query_ids, response_ids)``; response token j sits at column P + j and is predicted by
the logits at column P + j - 1, where the value V(s_j) is read as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from . import ppo_math, shared_prompt
from .model import position_ids_from_mask

SAMPLING_ROLES = ("policy", "reference")


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled. ``stop_token_ids`` empty: fixed-length responses.

    ``temperature`` divides the logits both for sampling and for the recorded logprobs; with
    ``do_sample=False`` the token is the argmax of the raw logits (temperature, top-k and top-p do not
    change it) and the logprobs are still those of ``softmax(logits / temperature)``.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    keep_logits: bool = False  # keep the (B, R, V) raw logits, for the "full" KL estimator
    # Values V(s_j) from the value head on the policy's hidden states (value_model="head"). None: exactly
    # when that head exists and the policy samples.
    capture_values: bool | None = None
    do_sample: bool = True  # False: greedy decoding
    role: str = "policy"  # who samples: "policy" or "reference" (the base policy of the evaluate stage)
    # k of num_generations: > 1 prefills each distinct prompt once and gathers its KV cache to the rows
    # that repeat it (``shared_prompt``); 1 prefills every row, as without groups.
    group_size: int = 1

    def __post_init__(self):
        if self.role not in SAMPLING_ROLES:
            raise ValueError(f"SamplingSettings.role={self.role!r} is not a sampling role; use one of {SAMPLING_ROLES}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingSettings.max_new_tokens={self.max_new_tokens}; sample at least 1 token")
        if self.temperature <= 0:
            raise ValueError(f"SamplingSettings.temperature={self.temperature}; use a temperature > 0 "
                             "(do_sample=False for greedy decoding)")
        if self.group_size < 1:
            raise ValueError(f"SamplingSettings.group_size={self.group_size}; use 1 (no sharing) or k, the samples "
                             "per prompt")


@dataclass
class Rollout:
    """Prompts and sampled responses of one PPO batch (shapes in the comments)."""

    query_ids: torch.Tensor  # (B, P) long, left-padded
    query_mask: torch.Tensor  # (B, P) long, 1 on prompt tokens
    response_ids: torch.Tensor  # (B, R) long, pad after the stop token
    response_mask: torch.Tensor  # (B, R) long, 1 up to and including the first stop token
    stopped: torch.Tensor  # (B,) bool, the response contains a stop token
    logprobs: torch.Tensor | None = None  # (B, R) float32, log pi_old(a_j | s_j) at the sampling temperature
    values: torch.Tensor | None = None  # (B, R) float32, V_old(s_j)
    logits: torch.Tensor | None = None  # (B, R, V) float32 raw policy logits (full KL only)
    # (B, R) long, 1 on the response tokens that train (rewards, KL, losses); default: response_mask.
    # step(response_masks=...) narrows it; attention always covers every response token.
    loss_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.loss_mask is None:
            self.loss_mask = self.response_mask

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)  # (B, P + R)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)  # (B, P + R)

    @property
    def batch_size(self) -> int:
        return self.query_ids.shape[0]

    def responses(self) -> list[torch.Tensor]:
        """The response of each row as a 1-D tensor of its tokens (the stop token included, no padding)."""
        return [ids[mask.bool()] for ids, mask in zip(self.response_ids, self.response_mask)]

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rollout restricted to ``rows`` (B',) in that order."""
        return replace(self, **_select_fields(self, rows))


@dataclass
class TrainingBatch:
    """What one PPO optimisation needs per rollout; every (B, R) tensor is aligned with the responses."""

    query_ids: torch.Tensor  # (B, P)
    query_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R)
    response_mask: torch.Tensor  # (B, R)
    old_logprobs: torch.Tensor  # (B, R)
    old_values: torch.Tensor | None  # (B, R); None without a value model (critic-free estimators)
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor | None  # (B, R) value targets; None without a value model
    loss_mask: torch.Tensor | None = None  # (B, R) positions that train; default: response_mask
    ref_logprobs: torch.Tensor | None = None  # (B, R) reference logprobs, for the KL in the loss

    def __post_init__(self) -> None:
        if self.loss_mask is None:
            self.loss_mask = self.response_mask

    @property
    def batch_size(self) -> int:
        return self.query_ids.shape[0]

    def select(self, rows: torch.Tensor) -> TrainingBatch:
        return replace(self, **_select_fields(self, rows))

    def trimmed(self) -> TrainingBatch:
        """Drop prompt columns that are padding in every row and response columns after every stop.

        Positions come from the attention mask, so the forward pass gives the same numbers for the
        kept tokens; a mini-batch of one becomes its unpadded sequence.
        """
        first_query_column = int(ppo_math.first_true_indices(self.query_mask.any(dim=0, keepdim=True))[0])
        response_length = int(ppo_math.last_token_indices(self.response_mask.any(dim=0, keepdim=True))[0]) + 1
        response_length = max(response_length, 1)
        trimmed = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            if field.name.startswith("query"):
                trimmed[field.name] = value[:, first_query_column:]
            else:
                trimmed[field.name] = value[:, :response_length]
        return replace(self, **trimmed)


def _select_fields(batch, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    selected = {}
    for field in fields(batch):
        value = getattr(batch, field.name)
        if isinstance(value, torch.Tensor):
            selected[field.name] = value.index_select(0, rows.to(value.device))
    return selected


# ---------------------------------------------------------------------------------------------------
# padding


def left_pad(sequences: Sequence[Sequence[int] | torch.Tensor], pad_token_id: int, device=None):
    """Token id lists -> (ids (B, L) left-padded with ``pad_token_id``, mask (B, L))."""
    return _pad(sequences, pad_token_id, device, left=True)


def right_pad(sequences: Sequence[Sequence[int] | torch.Tensor], pad_token_id: int, device=None):
    """Token id lists -> (ids (B, L) right-padded with ``pad_token_id``, mask (B, L))."""
    return _pad(sequences, pad_token_id, device, left=False)


def _pad(sequences, pad_token_id: int, device, left: bool):
    rows = [torch.as_tensor(sequence, dtype=torch.long).flatten() for sequence in sequences]
    if not rows:
        raise ValueError("cannot pad an empty list of sequences")
    empty = [index for index, row in enumerate(rows) if row.numel() == 0]
    if empty:
        raise ValueError(f"sequences {empty} are empty; every prompt and response needs at least one token")
    length = max(row.numel() for row in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, row in enumerate(rows):
        columns = slice(length - row.numel(), length) if left else slice(0, row.numel())
        ids[index, columns] = row
        mask[index, columns] = 1
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------------------------------------------
# sampling


def sample_rollout(model, query_ids: torch.Tensor, query_mask: torch.Tensor, settings: SamplingSettings) -> Rollout:
    """Sample (or decode greedily) one response per prompt in ``settings.role``; record logprobs and values.

    model: a ``MultiAdapterModel``; query_ids, query_mask (B, P) left-padded prompts. Random draws come
    from torch's global generator (seed it with ``torch.manual_seed`` for reproducible samples). Runs
    under ``torch.inference_mode`` and returns ordinary tensors (usable as constants in a later backward).
    """
    capture_values = _captures_values(model, settings)
    with torch.inference_mode():
        rollout = _sample(model, query_ids, query_mask, settings, capture_values)
    return Rollout(**{key: _plain(value) for key, value in vars(rollout).items()})


def _captures_values(model, settings: SamplingSettings) -> bool:
    has_head = model.value_model == "head"
    if settings.capture_values is None:
        return has_head and settings.role == "policy"
    if settings.capture_values and not (has_head and settings.role == "policy"):
        raise ValueError(
            "capture_values=True reads the value head on the policy's hidden states: it needs role='policy' and "
            f"value_model='head' (got role={settings.role!r}, value_model={model.value_model!r}); pass "
            "capture_values=None or False"
        )
    return bool(settings.capture_values)


def _plain(value):
    # Inference tensors cannot be saved for backward; the rollout feeds the training forward.
    return value.clone() if isinstance(value, torch.Tensor) else value


def _sample(model, query_ids, query_mask, settings: SamplingSettings, capture_values: bool) -> Rollout:
    causal_lm = model.peft_model.get_base_model()
    decoder = causal_lm.get_decoder()
    warpers = _warpers(settings)
    device = query_ids.device
    batch_size = query_ids.shape[0]
    stop_ids = torch.tensor(settings.stop_token_ids, dtype=torch.long, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    tokens, logprobs, values, kept_logits = [], [], [], []
    with model.role(settings.role):
        model.train(False)  # role() restores the mode; a checkpointing layer in training mode drops the cache
        cache = shared_prompt.new_cache(causal_lm)
        attention_mask = query_mask
        groups = shared_prompt.sharing_groups(model, query_ids, query_mask, settings.group_size)
        if groups is None:
            hidden = _decode(decoder, query_ids, query_mask, position_ids_from_mask(query_mask), cache)  # (B, H)
        else:  # each distinct prompt once, its cache rows gathered to the rows that repeat it
            hidden = shared_prompt.prefill(decoder, query_ids, query_mask, groups, cache)
        for step in range(settings.max_new_tokens):
            logits = model.logits_from_hidden(hidden)  # (B, V)
            active = ~finished
            token = torch.where(active, _draw(logits, settings, warpers), settings.pad_token_id)
            # (1, B, V): the step's rows as one "sequence", so the vocabulary reduction is one batched op
            logprobs.append(ppo_math.logprobs_from_logits(logits[None], token[None], settings.temperature)[0])
            tokens.append(token)
            if capture_values:
                values.append(model.values_from_hidden(hidden))
            if settings.keep_logits:
                kept_logits.append(logits)
            if stop_ids.numel():
                finished = finished | (active & torch.isin(token, stop_ids))
            if bool(finished.all()):
                break
            # tokens after a row's stop token are padding: masked out of attention for the later steps
            attention_mask = torch.cat([attention_mask, active[:, None].to(attention_mask.dtype)], dim=1)
            if step + 1 < settings.max_new_tokens:  # the next step's hidden state (B, H)
                position_ids = attention_mask.sum(dim=1, keepdim=True) - 1
                hidden = _decode(decoder, token[:, None], attention_mask, position_ids, cache)
    response_ids = torch.stack(tokens, dim=1)  # (B, R)
    response_mask = _response_mask(response_ids, settings.stop_token_ids)  # (B, R)
    keep = response_mask.bool()
    return Rollout(
        query_ids=query_ids,
        query_mask=query_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        stopped=finished,
        logprobs=torch.where(keep, torch.stack(logprobs, dim=1), 0.0),
        values=torch.where(keep, torch.stack(values, dim=1), 0.0) if values else None,
        logits=torch.stack(kept_logits, dim=1) if kept_logits else None,
    )


def _response_mask(response_ids: torch.Tensor, stop_token_ids: tuple[int, ...]) -> torch.Tensor:
    """1 up to and including the first stop token. A row that never stopped has no padding (the loop
    only pads after a stop), so it keeps every sampled token: ``pad_token_id=None``."""
    if not stop_token_ids:
        return torch.ones_like(response_ids)
    return ppo_math.response_mask_from_stop_tokens(response_ids, stop_token_ids, pad_token_id=None)


def _decode(decoder, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
    outputs = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        **{shared_prompt.cache_argument(decoder) or "past_key_values": cache},
    )
    return outputs.last_hidden_state[:, -1]


def _warpers(settings: SamplingSettings) -> list:
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    warpers = []
    if settings.top_k > 0:
        warpers.append(TopKLogitsWarper(top_k=settings.top_k))
    if settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=settings.top_p))
    return warpers


def _draw(logits: torch.Tensor, settings: SamplingSettings, warpers: list) -> torch.Tensor:
    """One token per row from softmax(warp(logits / temperature)), or its argmax. (B, V) -> (B,)."""
    if not settings.do_sample:
        return logits.argmax(dim=-1)
    scores = logits / settings.temperature if settings.temperature != 1.0 else logits
    for warper in warpers:
        scores = warper(None, scores)
    probabilities = torch.softmax(scores, dim=-1)
    return torch.multinomial(probabilities, num_samples=1).squeeze(1)


def ppo_sampling_settings(ppo, stop_ids: Sequence[int], pad_id: int, /, **overrides) -> SamplingSettings:
    """How PPO samples, from a ``MultiAdapterPPOConfig`` or the recipe's ``ppo`` section (max_new_tokens,
    temperature, top_k, top_p); the trainer and the evaluate stage both ask here, so they sample alike.
    ``overrides`` replace any field (e.g. ``do_sample=False``, ``keep_logits=True``, ``stop_token_ids``)."""
    settings = {"max_new_tokens": ppo.max_new_tokens, "temperature": ppo.temperature, "top_k": ppo.top_k,
                "top_p": ppo.top_p, "stop_token_ids": tuple(stop_ids), "pad_token_id": pad_id}
    return SamplingSettings(**{**settings, **overrides})


# ---------------------------------------------------------------------------------------------------
# where responses end


def stop_token_ids(tokenizer, model, stop_token: str | None = "eos") -> tuple[int, ...]:
    """The token ids that end a response, sorted; ``()`` for fixed-length responses.

    stop_token: "eos" (the tokenizer's EOS and every id of the model's ``generation_config.eos_token_id``,
    or of ``config.eos_token_id`` when the generation config has none; e.g. ``<|eot_id|>`` and
    ``<|end_of_text|>`` for Llama 3), a token string (that one token only), or None (no stop token).
    model: a ``MultiAdapterModel`` or a transformers model.
    Raises ValueError when the tokenizer and model define no EOS, or the token string is not a token.
    """
    if stop_token is None:
        return ()
    if stop_token == "eos":
        ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        causal_lm = _causal_lm(model)
        configured = getattr(getattr(causal_lm, "generation_config", None), "eos_token_id", None)
        if configured is None:
            configured = getattr(getattr(causal_lm, "config", None), "eos_token_id", None)
        ids |= set(configured if isinstance(configured, (list, tuple)) else [configured] if configured is not None else [])
        if not ids:
            raise ValueError("stop_token='eos' but neither the tokenizer nor the model defines an EOS token")
        return tuple(sorted(ids))
    token_id = tokenizer.convert_tokens_to_ids(stop_token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"stop_token={stop_token!r} is not a token of the tokenizer; use 'eos' or an existing token")
    return (token_id,)


def _causal_lm(model):
    peft_model = getattr(model, "peft_model", None)  # a MultiAdapterModel
    return peft_model.get_base_model() if peft_model is not None else model


# ---------------------------------------------------------------------------------------------------
# prompt order


class PromptSampler:
    """Which prompts each PPO iteration uses: a seeded shuffle per data epoch, sharded by process.

    Process ``k`` of ``n`` takes every n-th prompt of the epoch's order, so ranks sample different
    prompts; each iteration takes the next ``batch_size`` of them and an incomplete tail is dropped
    (as TRL 0.11's dataloader did). The state is (epoch, batch), so a resumed run continues with
    the very prompts it would have used.
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int, process_index: int = 0, num_processes: int = 1):
        self.batches_per_epoch = (num_prompts // num_processes) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"train_dataset has {num_prompts} prompts, fewer than one PPO batch: batch_size ({batch_size}) x "
                f"processes ({num_processes}) = {batch_size * num_processes}; add prompts or lower batch_size"
            )
        self.num_prompts = num_prompts
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes
        self.epoch = 0
        self.batch_index = 0
        self._shard_epoch, self._shard = None, None

    def next_batch(self) -> list[int]:
        if self.batch_index == self.batches_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
        start = self.batch_index * self.batch_size
        self.batch_index += 1
        return self._epoch_shard()[start : start + self.batch_size]

    def _epoch_shard(self) -> list[int]:
        if self._shard_epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_prompts, generator=generator).tolist()
            self._shard_epoch, self._shard = self.epoch, order[self.process_index :: self.num_processes]
        return self._shard

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "num_prompts": self.num_prompts}

    def load_state_dict(self, state: dict) -> None:
        if state["num_prompts"] != self.num_prompts:
            raise ValueError(
                f"the checkpoint was trained on {state['num_prompts']} prompts but train_dataset has "
                f"{self.num_prompts}; resume with the same dataset"
            )
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])


# ---------------------------------------------------------------------------------------------------
# rollouts of given responses


def rollout_from_tensors(queries: Sequence[torch.Tensor], responses: Sequence[torch.Tensor],
                         response_masks: Sequence[torch.Tensor] | None, pad_token_id: int,
                         stop_token_ids: Sequence[int], device) -> Rollout:
    """A Rollout of given 1-D prompt and response tensors (TRL 0.11's ``step`` inputs).

    ``response_masks`` (optional 1-D 0/1 per response) narrow the ``loss_mask`` only, as TRL 0.11 did: the
    masked tokens stay in the sequence the model attends to.
    """
    if len(queries) != len(responses):
        raise ValueError(f"got {len(queries)} queries but {len(responses)} responses; give one response per query")
    query_ids, query_mask = left_pad(queries, pad_token_id, device)
    response_ids, response_mask = right_pad(responses, pad_token_id, device)
    loss_mask = response_mask
    if response_masks is not None:
        given, _ = right_pad(response_masks, 0, device)
        loss_mask = response_mask * given
    stopped = torch.zeros(len(queries), dtype=torch.bool, device=device)
    if stop_token_ids:
        stopped = ppo_math.contains_stop_token(torch.where(response_mask.bool(), response_ids, -1), stop_token_ids)
    return Rollout(query_ids, query_mask, response_ids, response_mask, stopped, loss_mask=loss_mask)
