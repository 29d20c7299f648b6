"""Row lists to ``datasets.Dataset`` and back, the shared features, and the argument checks of the
preparation steps."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

ENCODE_BATCH_SIZE = 512


def messages_feature():
    from datasets import List, Value

    return List({"role": Value("string"), "content": Value("string")})


def dataset_from_rows(rows: list[dict], features) -> Dataset:
    from datasets import Dataset

    # Column-wise with explicit features: also right for zero rows, where from_list cannot infer a schema.
    return Dataset.from_dict({name: [row[name] for row in rows] for name in features}, features=features)


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def check_columns(dataset, required: tuple[str, ...], step: str) -> None:
    missing = [name for name in required if name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{step}: the dataset has no {', '.join(repr(name) for name in missing)} column; "
            f"it has {', '.join(dataset.column_names)}"
        )


def check_length(value: Any, name: str, step: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{step}: {name}={value!r} must be a positive number of tokens")
