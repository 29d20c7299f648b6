"""TRL 0.11 / transformers ``generate`` keyword arguments -> ``rollout.SamplingSettings`` fields.

TRL 0.11 handed its generation kwargs to ``model.generate``. Here every response comes from the one
sampler (``rollout.sample_rollout``), whose distribution is exactly softmax(logits / temperature) with
optional top-k / top-p (or the argmax with ``do_sample=False``), so PPO's logprobs are the policy's.
What keeps that meaning is translated; what would change it is refused with the reason.
"""

from __future__ import annotations

import dataclasses

# Accepted and without effect here, and why.
IGNORED_KEYS = {
    "pad_token_id": "responses come back unpadded (a list) or padded with the tokenizer's pad id",
    "use_cache": "the sampler always uses a KV cache",
    "bos_token_id": "prompts are given as token ids",
    "return_dict_in_generate": "the trainer returns token tensors",
    "output_scores": "the trainer returns token tensors",
}
# Refused, and why.
REFUSED_KEYS = {
    "num_beams": "beam search does not sample from the policy; PPO needs samples of pi",
    "num_beam_groups": "beam search does not sample from the policy; PPO needs samples of pi",
    "num_return_sequences": "pass a query once per response you want",
    "repetition_penalty": "it changes the sampling distribution, so PPO's logprobs would not be the policy's",
    "no_repeat_ngram_size": "it changes the sampling distribution, so PPO's logprobs would not be the policy's",
    "typical_p": "it changes the sampling distribution, so PPO's logprobs would not be the policy's",
    "min_p": "it changes the sampling distribution, so PPO's logprobs would not be the policy's",
    "epsilon_cutoff": "it changes the sampling distribution, so PPO's logprobs would not be the policy's",
    "bad_words_ids": "it changes the sampling distribution, so PPO's logprobs would not be the policy's",
    "logits_processor": "it changes the sampling distribution, so PPO's logprobs would not be the policy's",
    "min_new_tokens": "forbidding the stop token changes the sampling distribution",
    "max_length": "it counts padded prompt tokens; use max_new_tokens",
    "generation_config": "pass max_new_tokens, top_k, top_p, temperature, do_sample or eos_token_id directly",
}


def sampling_overrides(generation_kwargs: dict, config_temperature: float | None = None) -> dict:
    """``SamplingSettings`` fields for TRL-style generation kwargs.

    config_temperature: the temperature PPO's logprobs use; a different sampling temperature is refused
    (None: any temperature, for sampling outside PPO).
    """
    kwargs = dict(generation_kwargs)
    overrides: dict = {}
    for key in list(kwargs):
        if key in IGNORED_KEYS:
            kwargs.pop(key)
        elif key in REFUSED_KEYS and not _is_neutral(key, kwargs[key]):
            raise ValueError(f"generate({key}={kwargs[key]!r}) is not supported: {REFUSED_KEYS[key]}")
        elif key in REFUSED_KEYS:
            kwargs.pop(key)
    min_length = kwargs.pop("min_length", None)
    if min_length is not None and min_length > 0:
        raise ValueError(f"generate(min_length={min_length}) is not supported: forbidding the stop token changes "
                         "the sampling distribution (TRL 0.11 scripts pass min_length=-1, which is accepted)")
    do_sample = kwargs.pop("do_sample", True)
    if do_sample is False:
        overrides["do_sample"] = False
    temperature = kwargs.pop("temperature", None)
    if temperature is not None and do_sample is not False:
        if config_temperature is None:
            overrides["temperature"] = float(temperature)
        elif float(temperature) != config_temperature:
            raise ValueError(
                f"generate(temperature={temperature}) differs from the config's temperature={config_temperature}: "
                "PPO's logprobs must use the sampling temperature, so set PPOConfig(temperature=...) instead"
            )
    if kwargs.get("top_k") is not None:
        overrides["top_k"] = int(kwargs.pop("top_k"))
    if kwargs.get("top_p") is not None:
        overrides["top_p"] = float(kwargs.pop("top_p"))
    if kwargs.get("max_new_tokens") is not None:
        overrides["max_new_tokens"] = int(kwargs.pop("max_new_tokens"))
    eos_token_id = kwargs.pop("eos_token_id", None)
    if eos_token_id is not None:
        ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        overrides["stop_token_ids"] = tuple(sorted({int(token) for token in ids}))
    for key in ("top_k", "top_p", "max_new_tokens"):
        kwargs.pop(key, None)  # given as None: keep the default
    if kwargs:
        raise ValueError(
            f"generate options {sorted(kwargs)} are not supported; the sampler takes max_new_tokens, top_k, top_p, "
            "temperature, do_sample and eos_token_id"
        )
    require_sampler_fields(overrides)
    return overrides


def _is_neutral(key: str, value) -> bool:
    """The value that asks for nothing (e.g. num_beams=1), which is accepted."""
    neutral = {"num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
               "no_repeat_ngram_size": 0, "typical_p": 1.0, "min_new_tokens": 0}
    return value is None or (key in neutral and value == neutral[key])


def require_sampler_fields(overrides: dict) -> None:
    """Raise a clear error when the installed sampler lacks a field (greedy decoding, sampling roles)."""
    from ..rollout import SamplingSettings

    known = {f.name for f in dataclasses.fields(SamplingSettings)}
    missing = sorted(set(overrides) - known)
    if missing:
        raise NotImplementedError(
            f"rollout.SamplingSettings has no {missing} field(s) in this version of trl_multiadapter: greedy "
            "decoding (do_sample=False) and reference responses (generate_ref_response=True) need the sampler "
            "that decodes greedily and in the reference role"
        )
