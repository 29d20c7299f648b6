"""Files and loading for ``MultiAdapterModel``: base models, reward-adapter score heads, saved roles.

Kept apart from ``model.py`` so the model class reads as roles and forwards. Formats:

- a reward adapter is a PEFT SEQ_CLS adapter directory whose ``adapter_model.safetensors`` also holds
  the sequence-classification head under ``base_model.model.score.weight`` (peft's modules_to_save
  key, as ``trl.RewardTrainer`` writes it);
- ``save_adapters`` writes one PEFT adapter folder per adapter, ``value_head.safetensors`` and
  ``multiadapter.json`` (``ROLES_FILE``) describing the roles.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .model_quant import (
    KBIT_CPU_TRAINING_ERROR,
    is_kbit_config,
    is_kbit_model,
    kbit_weights_on_cpu,
    prepare_kbit_base,
    require_bitsandbytes,
)

ROLES_FILE = "multiadapter.json"
VALUE_HEAD_FILE = "value_head.safetensors"
SCORE_WEIGHT_KEY = "base_model.model.score.weight"
SCORE_BIAS_KEY = "base_model.model.score.bias"
SAVE_FORMAT_VERSION = 1

_ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _load_adapter_state(adapter_dir: Path) -> dict[str, torch.Tensor]:
    for file_name in _ADAPTER_WEIGHT_FILES:
        path = adapter_dir / file_name
        if path.is_file():
            if file_name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"adapter directory {adapter_dir} has no {' or '.join(_ADAPTER_WEIGHT_FILES)}; "
        "pass the directory a PEFT adapter was saved to (save_pretrained)"
    )


def score_key_kind(key: str) -> str | None:
    """'weight'/'bias' when ``key`` names the seq-cls ``score`` head (with or without peft's wrapper path)."""
    parts = key.split(".")
    if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
        return None
    module_path = parts[:-1]
    # peft may keep the ModulesToSaveWrapper path: score.modules_to_save.<adapter>.weight
    if len(module_path) >= 3 and module_path[-2] == "modules_to_save":
        module_path = module_path[:-2]
    return parts[-1] if module_path and module_path[-1] == "score" else None


def read_score_head(adapter_dir: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``score`` head (weight ``[num_labels, hidden]``, optional bias) saved in a SEQ_CLS adapter dir.

    peft drops ``modules_to_save`` entries such as ``score`` when the adapter is loaded onto a causal
    LM (the module does not exist there), so the head is read from the adapter file itself.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise FileNotFoundError(f"reward adapter directory {adapter_dir} does not exist")
    state = _load_adapter_state(adapter_dir)
    weights = {score_key_kind(key): value for key, value in state.items() if score_key_kind(key)}
    if "weight" not in weights:
        raise ValueError(
            f"reward adapter {adapter_dir} has no score head weights (no '...score.weight' key in its adapter "
            "file). A reward adapter must be a SEQ_CLS LoRA adapter saved with its score head, e.g. trained by "
            "trl.RewardTrainer (or trl_multiadapter.reward.train_reward_adapter) with "
            "LoraConfig(task_type='SEQ_CLS'), which saves `score` through modules_to_save."
        )
    weight = weights["weight"]
    if weight.dim() != 2:
        raise ValueError(f"reward adapter {adapter_dir}: score weight must be 2-D, got shape {tuple(weight.shape)}")
    return weight, weights.get("bias")


def check_adapter_dir(path: str | os.PathLike, argument: str) -> Path:
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{argument}={str(path)!r} is not a PEFT adapter directory (no adapter_config.json there)"
        )
    return path


def read_roles_file(directory) -> dict:
    path = Path(directory) / ROLES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"from_saved={str(directory)!r} has no {ROLES_FILE}; pass a directory written by MultiAdapterModel.save_adapters"
        )
    saved = json.loads(path.read_text())
    if saved.get("format_version") != SAVE_FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {saved.get('format_version')!r} (expected {SAVE_FORMAT_VERSION})")
    return saved


def resolve_dtype(dtype, device_map, quantization_config):
    """The dtype to load with: a name becomes a torch dtype; None means float32 on CPU and "auto"
    (the checkpoint's dtype) when the model goes to an accelerator or is quantized."""
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype name (e.g. 'float32', 'bfloat16', 'auto')")
        return resolved
    if dtype is not None:
        return dtype
    on_cpu = device_map is None or str(device_map) == "cpu" or device_map == {"": "cpu"}
    return torch.float32 if on_cpu and quantization_config is None else "auto"


def load_base(model_or_path, quantization_config, dtype, device_map, model_kwargs):
    from transformers import AutoModelForCausalLM, PreTrainedModel

    if is_kbit_config(quantization_config):
        require_bitsandbytes()
    if isinstance(model_or_path, PreTrainedModel):
        base = _adopt_built_model(model_or_path, quantization_config, dtype, device_map, model_kwargs)
    elif isinstance(model_or_path, (str, os.PathLike)):
        kwargs = dict(model_kwargs)
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        if device_map is not None:
            kwargs["device_map"] = device_map
        base = AutoModelForCausalLM.from_pretrained(
            str(model_or_path), dtype=resolve_dtype(dtype, device_map, quantization_config), **kwargs
        )
    else:
        raise TypeError(
            f"model_or_path must be a hub id, a local directory or a transformers PreTrainedModel, got "
            f"{type(model_or_path).__name__}"
        )
    if base.get_output_embeddings() is None:
        raise ValueError(
            f"{type(base).__name__} has no LM head; MultiAdapterModel needs a causal LM (AutoModelForCausalLM)"
        )
    if is_kbit_model(base):
        prepare_kbit_base(base)
        if kbit_weights_on_cpu(base):
            warnings.warn(KBIT_CPU_TRAINING_ERROR, stacklevel=3)
    return base


def _adopt_built_model(model, quantization_config, dtype, device_map, model_kwargs):
    from peft import PeftModel

    if isinstance(model, PeftModel) or hasattr(model, "peft_config"):
        raise ValueError("pass the plain base model; MultiAdapterModel.from_pretrained adds the adapters itself")
    if quantization_config is not None:
        raise ValueError("quantization_config applies when loading from a path or hub id, not to a built model")
    if model_kwargs:
        raise ValueError(f"loading keyword arguments {sorted(model_kwargs)} apply to a path or hub id, not a built model")
    if dtype is not None and dtype != "auto":  # "auto": keep the built model's own dtype
        model = model.to(resolve_dtype(dtype, None, None))
    if device_map is not None:
        if isinstance(device_map, dict):
            raise ValueError("with a built model, device_map must be a single device (e.g. 'cuda:0'), not a dict")
        model = model.to(device_map)
    return model


def add_score_head(adapter_dir: Path, reward_head: nn.Linear) -> None:
    """Put the score head into a saved adapter file under peft's SEQ_CLS key, as RewardTrainer saves it."""
    from safetensors.torch import load_file, save_file

    weights_path = adapter_dir / "adapter_model.safetensors"
    state: dict[str, Any] = load_file(str(weights_path))
    state[SCORE_WEIGHT_KEY] = reward_head.weight.detach().cpu().contiguous()
    if reward_head.bias is not None:
        state[SCORE_BIAS_KEY] = reward_head.bias.detach().cpu().contiguous()
    save_file(state, str(weights_path), metadata={"format": "pt"})
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["task_type"] = "SEQ_CLS"
    modules_to_save = config.get("modules_to_save") or []
    if "score" not in modules_to_save:
        config["modules_to_save"] = [*modules_to_save, "score"]
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
