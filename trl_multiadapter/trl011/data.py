"""TRL 0.11's ``ppo_trainer.dataloader``: a ``torch.utils.data.DataLoader`` over the dataset as given.

Batches of ``config.batch_size`` per process, shuffled, incomplete tail dropped (so a dataset smaller
than one batch yields nothing and ``len()`` is 0), collated by the script's ``data_collator`` (torch's
default collation without one: a dataset of ``(query, response)`` tuples gives two stacked tensors).
With ``remove_unused_columns`` a ``datasets.Dataset`` keeps only the columns TRL 0.11 kept.
"""

from __future__ import annotations

import torch

# TRL 0.11 kept the arguments of its value-head model's forward plus three logging columns.
KEPT_COLUMNS = ("input_ids", "past_key_values", "attention_mask", "return_past_key_values", "kwargs", "label",
                "query", "response")


def check_dataset(dataset) -> None:
    from datasets import Dataset

    if dataset is not None and not isinstance(dataset, (torch.utils.data.Dataset, Dataset)):
        raise ValueError(f"dataset must be a torch.utils.data.Dataset or a datasets.Dataset, got {type(dataset).__name__}")


def trl_dataloader(dataset, batch_size: int, data_collator=None, remove_unused_columns: bool = True,
                   seed: int = 0) -> torch.utils.data.DataLoader:
    """The (not yet accelerator-prepared) dataloader TRL 0.11's ``prepare_dataloader`` built."""
    from datasets import Dataset

    check_dataset(dataset)
    if isinstance(dataset, Dataset) and remove_unused_columns:
        dataset = dataset.remove_columns([name for name in dataset.column_names if name not in KEPT_COLUMNS])
    # Shuffled from its own seeded generator: the order depends on config.seed only, not on how much of
    # the global RNG the script used before.
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=data_collator, shuffle=True,
                                       drop_last=True, generator=generator)
