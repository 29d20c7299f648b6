"""Where rows come from: a hub id (``datasets.load_dataset``), a local file, or a folder of split files.

Each record is yielded with its location (``"<file>: row 3 (line 4)"``), so that errors and reports can
name it. Heavy libraries (``datasets``, ``pyarrow``) are imported inside the functions.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
SUPPORTED_SUFFIXES = (*JSON_SUFFIXES, ".parquet")
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class SourceRow:
    location: str  # "<file>: row 3 (line 4)" for messages
    record: Any  # a decoded record, or InvalidJson


@dataclass
class InvalidJson:
    error: str


def is_local(path_or_hub_id: str | os.PathLike) -> bool:
    return Path(path_or_hub_id).expanduser().exists()


def check_source(path_or_hub_id: str | os.PathLike, loader: str) -> None:
    if is_local(path_or_hub_id):
        return
    looks_like_file = str(path_or_hub_id).endswith(SUPPORTED_SUFFIXES)
    if isinstance(path_or_hub_id, str) and _HUB_ID_PATTERN.match(path_or_hub_id) and not looks_like_file:
        return
    raise FileNotFoundError(
        f"{loader}: {str(path_or_hub_id)!r} is neither an existing file or folder nor a hub id like "
        f"'owner/name'; check the path"
    )


def local_files(path: Path, data_dir: str | None, split: str, loader: str) -> list[Path]:
    """The files of a local source: the file itself, or ``split*`` files in ``path / data_dir``."""
    if path.is_file():
        if data_dir is not None:
            raise ValueError(
                f"{loader}: data_dir={data_dir!r} applies to hub ids and folders, not to the file {path}"
            )
        if not path.name.endswith(SUPPORTED_SUFFIXES):
            raise ValueError(f"{loader}: cannot read {path}: use one of {', '.join(SUPPORTED_SUFFIXES)}")
        return [path]
    folder = path / data_dir if data_dir else path
    if not folder.is_dir():
        raise FileNotFoundError(f"{loader}: folder {folder} does not exist; check data_dir={data_dir!r}")
    files = sorted(
        candidate
        for candidate in folder.iterdir()
        if candidate.is_file()
        and candidate.name.endswith(SUPPORTED_SUFFIXES)
        and re.match(rf"{re.escape(split)}[.\-_]", candidate.name)
    )
    if not files:
        present = ", ".join(sorted(entry.name for entry in folder.iterdir())) or "nothing"
        raise FileNotFoundError(
            f"{loader}: no '{split}' file ({split}.jsonl, {split}.jsonl.gz, {split}-*.parquet, ...) in "
            f"{folder}; it holds: {present}. Check split= and data_dir="
        )
    return files


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_json_document(path: Path) -> tuple[Any, bool]:
    """``(document, True)`` for one JSON document, ``(list of line records, False)`` for JSON lines."""
    with _open_text(path) as handle:
        text = handle.read()
    if not path.name.endswith((".jsonl", ".jsonl.gz")):
        try:
            return json.loads(text), True
        except json.JSONDecodeError as error:
            if "Extra data" not in str(error):
                raise ValueError(f"{path} is not valid JSON: {error}") from error
    return [_decode_line(line) for line in text.splitlines()], False


def _decode_line(line: str) -> Any:
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        return InvalidJson(str(error))


def _json_rows(path: Path, record_key: str | None = "data") -> Iterator[SourceRow]:
    document, whole = _read_json_document(path)
    if not whole:
        row = 0
        for line_number, record in enumerate(document, start=1):
            if record is None:
                continue  # blank line
            yield SourceRow(f"{path}: row {row} (line {line_number})", record)
            row += 1
        return
    if isinstance(document, dict) and record_key is not None and isinstance(document.get(record_key), list):
        document = document[record_key]
    if not isinstance(document, list):
        keys = ", ".join(sorted(document)) if isinstance(document, dict) else type(document).__name__
        raise ValueError(
            f"{path}: expected a list of records, JSON lines or {{'{record_key}': [...]}}; found {keys}"
        )
    for row, record in enumerate(document):
        yield SourceRow(f"{path}: row {row}", record)


def _parquet_rows(path: Path) -> Iterator[SourceRow]:
    import pyarrow.parquet as pq

    for row, record in enumerate(pq.read_table(path).to_pylist()):
        yield SourceRow(f"{path}: row {row}", record)


def _local_rows(files: list[Path]) -> Iterator[SourceRow]:
    for path in files:
        yield from _parquet_rows(path) if path.name.endswith(".parquet") else _json_rows(path)


def _hub_rows(hub_id: str, data_dir: str | None, split: str) -> Iterator[SourceRow]:
    from datasets import load_dataset

    dataset = load_dataset(hub_id, data_dir=data_dir, split=split)
    label = f"{hub_id}" + (f" (data_dir={data_dir})" if data_dir else "") + f" split {split}"
    for row, record in enumerate(dataset):
        yield SourceRow(f"{label}: row {row}", record)


def source_rows(path_or_hub_id, data_dir: str | None, split: str, loader: str) -> Iterator[SourceRow]:
    check_source(path_or_hub_id, loader)
    if is_local(path_or_hub_id):
        return _local_rows(local_files(Path(path_or_hub_id).expanduser(), data_dir, split, loader))
    return _hub_rows(str(path_or_hub_id), data_dir, split)


def source_label(path_or_hub_id, data_dir: str | None, split: str) -> str:
    if is_local(path_or_hub_id):
        return str(path_or_hub_id)
    return f"{path_or_hub_id}" + (f", data_dir={data_dir}" if data_dir else "") + f", split={split}"
