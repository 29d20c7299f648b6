"""The built-in synthetic data sources (planted preference, SQuAD-style prompts), read by the real loaders."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..ground_truth import planted_rule_metrics, supplies_ground_truth
from ..registry import register_data_source

# ------------------------------------------------------------------------------------ synthetic sources


@register_data_source("synthetic_hh_rlhf")
@supplies_ground_truth(planted_rule_metrics)
def synthetic_hh_rlhf(split: str = "train", train_size: int = 256, eval_size: int = 64, seed: int = 0,
                      neutral_rejected: float = 0.0, terse_rejected: float = 0.0, sparse_rejected: float = 0.0,
                      unpunctuated: float = 0.0, nonce_words: float = 0.0, on_bad_row: str = "skip",
                      return_report: bool = False):
    """Synthetic hh-rlhf pairs with a planted preference (trl_multiadapter.testing), read by the real loader."""
    from ..data import load_hh_rlhf
    from ..testing import write_tiny_hh_rlhf

    size, split_seed = (train_size, seed) if split == "train" else (eval_size, seed + 10_000)
    with tempfile.TemporaryDirectory() as folder:
        path = write_tiny_hh_rlhf(Path(folder) / f"{split}.jsonl", n=size, seed=split_seed,
                                  neutral_rejected=neutral_rejected, terse_rejected=terse_rejected,
                                  sparse_rejected=sparse_rejected, unpunctuated=unpunctuated,
                                  nonce_words=nonce_words)
        return load_hh_rlhf(path, split=split, on_bad_row=on_bad_row, return_report=return_report)


@register_data_source("synthetic_squad")
def synthetic_squad(split: str = "train", train_size: int = 128, eval_size: int = 32, seed: int = 0,
                    system_prompt: str | None = None):
    """Synthetic SQuAD questions in the original nested format, read by the real loader."""
    from ..data import load_squad_prompts
    from ..testing import write_tiny_squad

    size, split_seed = (train_size, seed) if split == "train" else (eval_size, seed + 10_000)
    with tempfile.TemporaryDirectory() as folder:
        path = write_tiny_squad(Path(folder) / f"{split}.json", n=size, seed=split_seed)
        return load_squad_prompts(path, split=split, system_prompt=system_prompt)
