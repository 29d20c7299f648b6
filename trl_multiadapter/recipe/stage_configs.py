"""What a stage gets from its section: ``MultiAdapterPPOConfig``, ``RewardAdapterConfig``, the policy LoRA.

The sections are plain data; the config classes' own checks run here, and their errors become
``RecipeError``s naming the key (``ppo.kl_estimator``, ``reward.lora_r``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from typing import Any

from ..lora import policy_lora_config
from .errors import RecipeError


def build_ppo_config(ppo: Any, output_dir: str | os.PathLike, **overrides: Any):
    """``MultiAdapterPPOConfig`` from the ppo section; the config's own errors become RecipeErrors."""
    return _build_config("ppo", ppo, output_dir=str(output_dir), **overrides)


def build_reward_config(reward: Any, model: Any, **overrides: Any):
    """``RewardAdapterConfig`` from the reward section; the base model's dtype and trust setting come from the
    model section (one base model: the reward stage loads it like every other stage). ``eval_fraction`` is 0:
    the data stage holds out the pairs (``data.preference.eval_fraction``), a second carve would hide others."""
    return _build_config("reward", reward, dtype=model.dtype, trust_remote_code=model.trust_remote_code,
                         eval_fraction=0.0, **overrides)


def ppo_lora_config(ppo: Any):
    """The peft ``LoraConfig`` of the policy adapter (``trl_multiadapter.lora.policy_lora_config``)."""
    return policy_lora_config(ppo)


def _build_config(name: str, section: Any, **overrides: Any):
    config_class = section.config_class
    names = {f.name for f in dataclasses.fields(config_class) if f.init}
    kwargs = {key: copy.deepcopy(getattr(section, key)) for key in names if hasattr(section, key)}
    kwargs.update(overrides)
    try:
        return config_class(**kwargs)
    except (ValueError, TypeError) as error:
        raise RecipeError(_key_in_message(name, str(error), names), str(error),
                          "change the value as the message says.") from None


def _key_in_message(name: str, message: str, names: set[str]) -> str:
    """The key a config class's message names (``reward.lora_r``, `` `kl_estimator` ``, ``--bf16``)."""
    for pattern in (rf"\b{name}\.([A-Za-z_]+)", r"`([A-Za-z_]+)`", r"--([A-Za-z_]+)"):
        for key in re.findall(pattern, message):
            if key in names:
                return f"{name}.{key}"
    return name
