"""Held out means held out: a seeded carve when a source has no eval split, and no eval row that train has.

A local file is one split; a folder may lack the eval split; a recipe may ask for no eval split at all.
Then :func:`carve_held_out` takes a deterministic share of the train rows as the eval split. Rows are
grouped by a content key (the conversation of a preference pair, the context of a SQuAD question), and a
group goes wholly to one side, so that a repeated conversation or paragraph never lands on both. Which
groups are held out depends only on their content and the seed: not on the row order, the file layout or
the process. :func:`drop_train_overlap` removes from an eval split every row whose content key train
also has (real train/test splits share some rows). Both return a :class:`HeldOutReport` for the data
report.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .sources import find_split

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

CARVED = "carved"  # HeldOutReport.method: held out from the train rows
EVAL_SPLIT = "eval_split"  # the source's own eval split (or eval files)
NO_HELD_OUT = "none"  # no eval split and eval_fraction 0


@dataclass
class HeldOutReport:
    """How an eval split came to be: carved from train (``method="carved"``, with ``reason``) or read from
    the source's own eval split (``"eval_split"``); rows on each side and eval rows removed as repeats."""

    method: str
    reason: str
    key_columns: list[str] = field(default_factory=list)  # what groups rows for the carve
    train_rows: int = 0
    eval_rows: int = 0
    eval_fraction: float | None = None
    seed: int | None = None
    groups: int = 0  # distinct content keys in what was carved
    overlap_columns: list[str] = field(default_factory=list)  # what makes an eval row a repeat of train
    removed_from_eval: int = 0  # eval rows whose content train also has
    removed_examples: list[int] = field(default_factory=list)  # their eval row indices (first few)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def carve_reason(path_or_hub_id: Any, data_dir: str | None, eval_split: str | None,
                 reads_split_files: bool = True) -> str | None:
    """Why the eval split must be carved from train, or None when the source has an eval split of its own.

    ``reads_split_files``: the source reads ``path_or_hub_id`` with the rules of :func:`.find_split` (the
    built-in loaders do); for other sources only ``eval_split=None`` asks for a carve.
    """
    if eval_split is None:
        return "eval_split is null"
    if not reads_split_files or path_or_hub_id is None:
        return None
    found = find_split(path_or_hub_id, data_dir, eval_split)
    if found is None:
        folder = Path(path_or_hub_id).expanduser() / (data_dir or "")
        return f"{folder} has no '{eval_split}' split"
    if found.whole_file:
        return f"{source_name(path_or_hub_id)} is one split (a file, or a list of files)"
    return None


def source_name(path_or_hub_id: Any) -> str:
    if isinstance(path_or_hub_id, (list, tuple)):
        return ", ".join(str(path) for path in path_or_hub_id)
    return str(path_or_hub_id)


def content_keys(dataset: Dataset, columns: Sequence[str]) -> list[str]:
    """One SHA-256 hex digest per row of the values in ``columns`` (JSON, keys sorted)."""
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise ValueError(f"content_keys: no {', '.join(map(repr, missing))} column; it has {dataset.column_names}")
    values = dataset.select_columns(list(columns)).to_list()
    return [_digest(json.dumps([row[column] for column in columns], sort_keys=True, ensure_ascii=False))
            for row in values]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def carve_held_out(dataset: Dataset, eval_fraction: float, seed: int, key_columns: Sequence[str],
                   reason: str) -> tuple[Dataset, Dataset, HeldOutReport]:
    """``(train, eval, report)``: about ``eval_fraction`` of the rows (at least one group) as eval.

    Groups of rows with one content key are ranked by ``sha256(seed, key)`` and taken in that order until
    the eval side holds ``ceil(eval_fraction * rows)`` rows or more; both sides keep the input order.
    Raises ``ValueError`` when the rows cannot be split (fewer than two distinct keys).
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction!r}: a share of the rows to hold out, above 0 and below 1")
    keys = content_keys(dataset, key_columns)
    distinct = sorted(set(keys), key=lambda key: _digest(f"{seed}:{key}"))
    if len(distinct) < 2:
        raise ValueError(
            f"cannot hold out part of {len(keys)} rows with {len(distinct)} distinct {'/'.join(key_columns)}: "
            f"give the source an eval split, or more rows"
        )
    wanted = max(1, math.ceil(eval_fraction * len(keys)))
    sizes: dict[str, int] = {}
    for key in keys:
        sizes[key] = sizes.get(key, 0) + 1
    held_out, count = set(), 0
    for key in distinct[:-1]:  # the last group always stays in train: train is never empty
        if count >= wanted:
            break
        held_out.add(key)
        count += sizes[key]
    eval_indices = [index for index, key in enumerate(keys) if key in held_out]
    train_indices = [index for index, key in enumerate(keys) if key not in held_out]
    report = HeldOutReport(CARVED, reason, list(key_columns), len(train_indices), len(eval_indices),
                           eval_fraction, seed, groups=len(distinct))
    return dataset.select(train_indices), dataset.select(eval_indices), report


def drop_train_overlap(train: Dataset, eval_dataset: Dataset, key_columns: Sequence[str],
                       report: HeldOutReport | None = None) -> tuple[Dataset, HeldOutReport]:
    """``eval_dataset`` without the rows whose content key ``train`` also has, and the report (a new one
    of method ``"eval_split"``, or ``report`` updated)."""
    train_keys = set(content_keys(train, key_columns))
    eval_keys = content_keys(eval_dataset, key_columns)
    repeated = [index for index, key in enumerate(eval_keys) if key in train_keys]
    if report is None:
        report = HeldOutReport(EVAL_SPLIT, "the source's own eval split")
    report.overlap_columns = list(key_columns)
    report.removed_from_eval += len(repeated)
    report.removed_examples += repeated[: max(0, 5 - len(report.removed_examples))]
    if repeated:
        drop = set(repeated)
        eval_dataset = eval_dataset.select([index for index in range(len(eval_keys)) if index not in drop])
    report.train_rows, report.eval_rows = len(train), len(eval_dataset)
    return eval_dataset, report
