"""``builtin:<size>`` model names: the offline tiny Llama models of ``trl_multiadapter.testing``.

The one place that parses such a name and builds its model and tokenizer; recipes, the flat PPO
config, the pipeline and ``generate`` all call it.
"""

from __future__ import annotations

import difflib

BUILTIN_MODEL_PREFIX = "builtin:"


def is_builtin(name_or_path: str) -> bool:
    return str(name_or_path).startswith(BUILTIN_MODEL_PREFIX)


def builtin_size(name_or_path: str) -> str:
    """``'builtin:small'`` -> ``'small'``; ValueError (with the valid names) for an unknown size."""
    from .testing import MODEL_SIZES

    size = str(name_or_path)[len(BUILTIN_MODEL_PREFIX):]
    if size not in MODEL_SIZES:
        close = difflib.get_close_matches(size, list(MODEL_SIZES), n=1)
        hint = f" Did you mean '{BUILTIN_MODEL_PREFIX}{close[0]}'?" if close else ""
        raise ValueError(
            f"unknown builtin model {name_or_path!r}.{hint} Use one of: "
            + ", ".join(f"{BUILTIN_MODEL_PREFIX}{name}" for name in MODEL_SIZES)
        )
    return size


def builtin_tokenizer(name_or_path: str):
    from .testing import build_tiny_tokenizer_for

    return build_tiny_tokenizer_for(builtin_size(name_or_path))


def builtin_model(name_or_path: str, task: str = "causal", seed: int = 0):
    from .testing import build_tiny_model

    return build_tiny_model(builtin_size(name_or_path), task=task, seed=seed)


def save_builtin(name_or_path: str, folder, seed: int = 0) -> None:
    """Write the model and its tokenizer to ``folder`` (``from_pretrained``-loadable)."""
    builtin_model(name_or_path, seed=seed).save_pretrained(folder)
    builtin_tokenizer(name_or_path).save_pretrained(folder)
