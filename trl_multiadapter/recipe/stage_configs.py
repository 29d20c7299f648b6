"""What a stage gets from its section: the ``MultiAdapterPPOConfig`` and the policy ``LoraConfig``."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from typing import Any

from .errors import RecipeError


def build_ppo_config(ppo: Any, output_dir: str | os.PathLike, **overrides: Any):
    """``MultiAdapterPPOConfig`` from the ppo section; the config's own errors become RecipeErrors."""
    config_class = ppo.config_class
    names = {f.name for f in dataclasses.fields(config_class) if f.init}
    kwargs = {key: copy.deepcopy(getattr(ppo, key)) for key in names if hasattr(ppo, key)}
    kwargs.update(output_dir=str(output_dir), **overrides)
    try:
        return config_class(**kwargs)
    except (ValueError, TypeError) as error:
        match = re.search(r"`([A-Za-z_]+)`|--([A-Za-z_]+)", str(error))
        key = next((g for g in match.groups() if g), "") if match else ""
        raise RecipeError(f"ppo.{key}" if key in names else "ppo", str(error),
                          "change the value as the message says.") from None


def ppo_lora_config(ppo: Any):
    """The peft ``LoraConfig`` of the policy adapter."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=ppo.lora_r,
        lora_alpha=ppo.lora_alpha,
        lora_dropout=ppo.lora_dropout,
        target_modules=copy.copy(ppo.lora_target_modules),
    )
