"""Where rows come from: a hub id (``datasets.load_dataset``), a local file, a folder of split files, or an
explicit list of files.

Each record is yielded with its location (``"<file>: row 3 (line 4)"``), so that errors and reports can
name it. A file that is not what its name says (a Git LFS pointer left by a clone without git-lfs, a JSON
array saved as ``.jsonl``, a corrupt gzip or parquet file) is a :class:`DataSourceError`: one line naming
the file, what it is, and the fix. Heavy libraries (``datasets``, ``pyarrow``) are imported inside the
functions.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
JSON_LINES_SUFFIXES = (".jsonl", ".jsonl.gz")
SUPPORTED_SUFFIXES = (*JSON_SUFFIXES, ".parquet")
# Other names a split goes by: the original SQuAD files are dev-v1.1.json / dev-v2.0.json.
SPLIT_ALIASES = {"validation": ("dev", "valid", "val"), "dev": ("validation", "valid", "val"),
                 "valid": ("validation", "dev", "val"), "val": ("validation", "dev", "valid")}
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHARD_PATTERN = r"-\d+-of-(\d+)\."  # train-00000-of-00004.parquet: several files, one split
_HEAD_BYTES = 4096


class DataSourceError(ValueError):
    """A data source that cannot be used as given. ``str()`` is one line: the source, the problem, the fix.

    ``argument`` names the loader argument that chose the source (``path_or_hub_id``, ``data_dir``,
    ``split`` or ``files``), so that callers can point at their own setting (a recipe key path).
    """

    def __init__(self, source: str | os.PathLike, problem: str, fix: str, argument: str = "path_or_hub_id",
                 hub: bool = False):
        self.source, self.problem, self.fix, self.argument, self.hub = str(source), problem, fix, argument, hub
        super().__init__(f"{source}: {problem}; {fix}")


class DataSourceNotFoundError(DataSourceError, FileNotFoundError):
    """A file, folder or split that does not exist."""


@dataclass
class SourceRow:
    location: str  # "<file>: row 3 (line 4)" for messages
    record: Any  # a decoded record, or InvalidJson


@dataclass
class InvalidJson:
    error: str


@dataclass(frozen=True)
class SplitSource:
    """Where one split of a source is read from: local ``files``, or the hub id ``hub_id``.

    ``whole_file``: the source is one local file (or one explicit list of files), which is every split
    at once; asking it for another split gives the same rows.
    """

    files: tuple[Path, ...] = ()
    hub_id: str | None = None
    whole_file: bool = False


# ------------------------------------------------------------------------------------------- resolution


def reads_split_files(loader):
    """Mark a data source that reads its ``path_or_hub_id`` / ``data_dir`` / ``split`` with the rules of
    :func:`find_split` (so the data stage knows when a source has no eval split of its own)."""
    loader.reads_split_files = True
    return loader


def is_local(path_or_hub_id: str | os.PathLike | Sequence) -> bool:
    if isinstance(path_or_hub_id, (list, tuple)):
        return True
    return Path(path_or_hub_id).expanduser().exists()


def check_source(path_or_hub_id: str | os.PathLike | Sequence, loader: str) -> None:
    """Raise unless ``path_or_hub_id`` is an existing file or folder, a list of files, or looks like a hub
    id."""
    if isinstance(path_or_hub_id, (list, tuple)):
        if not path_or_hub_id:
            raise DataSourceError(loader, "the list of files is empty", "name at least one file", "files")
        for path in path_or_hub_id:
            if not Path(path).expanduser().is_file():
                raise DataSourceNotFoundError(path, "no such file", "check the list of files", "files")
        return
    if is_local(path_or_hub_id):
        return
    looks_like_file = str(path_or_hub_id).endswith(SUPPORTED_SUFFIXES)
    if isinstance(path_or_hub_id, str) and _HUB_ID_PATTERN.match(path_or_hub_id) and not looks_like_file:
        return
    raise DataSourceNotFoundError(
        path_or_hub_id, f"{loader}: neither an existing file or folder nor a hub id like 'owner/name'",
        f"check the path (relative paths are read from {os.getcwd()})",
    )


def find_split(path_or_hub_id: str | os.PathLike | Sequence, data_dir: str | None, split: str,
               loader: str = "load") -> SplitSource | None:
    """Where ``split`` of a source lives; None when the source is a local folder without that split.

    A file (or a list of files) is every split. In a folder (``path / data_dir``), a split is the file
    whose name starts with the split name and a separator (``test.jsonl.gz``, ``dev-v1.1.json``), or the
    shards of one (``train-00000-of-00002.parquet``, ...); ``validation`` also finds ``dev*`` / ``valid*`` /
    ``val*``. A name that matches several other files is an error listing them.
    """
    check_source(path_or_hub_id, loader)
    if isinstance(path_or_hub_id, (list, tuple)):
        if data_dir is not None:
            raise _data_dir_with_files(data_dir, loader)
        return SplitSource(files=tuple(Path(path).expanduser() for path in path_or_hub_id), whole_file=True)
    if not is_local(path_or_hub_id):
        return SplitSource(hub_id=str(path_or_hub_id))
    path = Path(path_or_hub_id).expanduser()
    if path.is_file():
        if data_dir is not None:
            raise _data_dir_with_files(data_dir, loader, path)
        check_suffix(path)
        return SplitSource(files=(path,), whole_file=True)
    folder = path / data_dir if data_dir else path
    if not folder.is_dir():
        raise DataSourceNotFoundError(folder, "no such folder", f"check data_dir={data_dir!r}", "data_dir")
    for name in (split, *SPLIT_ALIASES.get(split, ())):
        files = _split_files(folder, name)
        if files:
            return SplitSource(files=tuple(files))
    return None


def local_split_files(path_or_hub_id, data_dir: str | None, split: str, loader: str) -> SplitSource:
    """:func:`find_split`, with a missing split as an error that lists what the folder holds."""
    found = find_split(path_or_hub_id, data_dir, split, loader)
    if found is not None:
        return found
    folder = Path(path_or_hub_id).expanduser() / (data_dir or "")
    present = ", ".join(sorted(entry.name for entry in folder.iterdir())) or "nothing"
    aliases = "".join(f", {alias}*" for alias in SPLIT_ALIASES.get(split, ()))
    raise DataSourceNotFoundError(
        folder, f"{loader}: no '{split}' file ({split}.jsonl, {split}.jsonl.gz, {split}-*.parquet{aliases}, ...); "
        f"it holds: {present}", "check the split name and data_dir", "split",
    )


def _split_files(folder: Path, name: str) -> list[Path]:
    matches = sorted(
        candidate
        for candidate in folder.iterdir()
        if candidate.is_file()
        and candidate.name.endswith(SUPPORTED_SUFFIXES)
        and re.match(rf"{re.escape(name)}[.\-_]", candidate.name)
    )
    if len(matches) > 1 and not _shards_of_one_split(matches, name):
        names = ", ".join(match.name for match in matches)
        raise DataSourceError(
            folder, f"the split name '{name}' matches {len(matches)} files ({names}), which would be merged",
            "point the path at one file, or list the files of each split explicitly", "split",
        )
    return matches


def _shards_of_one_split(files: list[Path], name: str) -> bool:
    """True when every file is ``<name>-<i>-of-<n>.*`` with the same ``n``."""
    matches = [re.match(rf"{re.escape(name)}{_SHARD_PATTERN}", path.name) for path in files]
    shard_counts = {match.group(1) if match else None for match in matches}
    return None not in shard_counts and len(shard_counts) == 1


def _data_dir_with_files(data_dir: str, loader: str, path: Path | None = None) -> DataSourceError:
    what = f"the file {path}" if path else "a list of files"
    return DataSourceError(
        data_dir, f"{loader}: data_dir applies to hub ids and folders, not to {what}",
        "remove data_dir (null), or point the path at the folder", "data_dir",
    )


def check_suffix(path: Path) -> None:
    if not path.name.endswith(SUPPORTED_SUFFIXES):
        raise DataSourceError(path, "cannot read this kind of file", f"use one of {', '.join(SUPPORTED_SUFFIXES)}",
                              "path_or_hub_id")


def source_label(path_or_hub_id, data_dir: str | None, split: str) -> str:
    if isinstance(path_or_hub_id, (list, tuple)):
        return ", ".join(str(path) for path in path_or_hub_id)
    if is_local(path_or_hub_id):
        return str(path_or_hub_id)
    return f"{path_or_hub_id}" + (f", data_dir={data_dir}" if data_dir else "") + f", split={split}"


# ------------------------------------------------------------------------------------------- file checks


def inspect_file(path: Path) -> None:
    """Raise :class:`DataSourceError` unless ``path`` looks like what its name says (reads a few KiB).

    Catches a Git LFS pointer (a clone without git-lfs), an empty file, a ``.gz`` that is not gzip, a
    ``.parquet`` that is not parquet, and a ``.jsonl`` that holds one JSON document (an array or a
    pretty-printed object) instead of one object per line.
    """
    check_suffix(path)
    with open(path, "rb") as handle:
        head = handle.read(_HEAD_BYTES)
    size = path.stat().st_size
    if head.startswith(LFS_POINTER_PREFIX):
        raise DataSourceError(
            path, f"a Git LFS pointer ({size} bytes), not the data: the clone was made without git-lfs",
            "run `git lfs install && git lfs pull` in the clone, or load the data set by its hub id",
        )
    if not head:
        raise DataSourceError(path, "the file is empty", "re-download or regenerate it")
    if path.name.endswith(".parquet"):
        if not head.startswith(b"PAR1"):
            raise DataSourceError(path, f"not a parquet file (it starts with {head[:8]!r})", _MATCH_NAME_FIX)
        return
    text_head = _decompressed_head(path, head)
    if path.name.endswith(JSON_LINES_SUFFIXES):
        _check_json_lines_head(path, text_head)
    elif text_head.lstrip()[:1] not in ("{", "["):
        raise DataSourceError(path, f"not JSON (it starts with {text_head.lstrip()[:20]!r})", _MATCH_NAME_FIX)


_MATCH_NAME_FIX = "give the file the name of what it holds, or re-download it"


def _decompressed_head(path: Path, head: bytes) -> str:
    if path.name.endswith(".gz"):
        if not head.startswith(b"\x1f\x8b"):
            raise DataSourceError(path, f"not gzip-compressed (it starts with {head[:8]!r})",
                                  f"rename it to {path.name[:-3]} if it is plain text, or re-download it")
        try:
            with gzip.open(path, "rb") as handle:
                head = handle.read(_HEAD_BYTES)
        except (OSError, EOFError, zlib.error) as error:
            raise DataSourceError(path, f"a damaged gzip file ({error})", "re-download it") from None
    return head.decode("utf-8", errors="replace")


def _check_json_lines_head(path: Path, text_head: str) -> None:
    stripped = text_head.lstrip()
    if stripped.startswith("["):
        raise _json_document_in_jsonl(path, "a JSON array")
    first_line = stripped.split("\n", 1)[0].strip()
    if first_line == "{":  # a pretty-printed object: one document over many lines
        raise _json_document_in_jsonl(path, "one JSON document spread over several lines")


def _json_document_in_jsonl(path: Path, what: str) -> DataSourceError:
    suffix = ".json.gz" if path.name.endswith(".gz") else ".json"
    return DataSourceError(
        path, f"holds {what}, not JSON lines (one object per line)",
        f"rename it to {path.name.split('.')[0]}{suffix}, or write one JSON object per line",
    )


# --------------------------------------------------------------------------------------------- reading


def _read_text(path: Path) -> str:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as handle:
                return handle.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataSourceError(path, f"not UTF-8 text ({error.reason} at byte {error.start})",
                              "save it as UTF-8") from None
    except (OSError, EOFError, zlib.error) as error:
        raise _unreadable(path, error) from None


def _unreadable(path: Path, error: BaseException) -> DataSourceError:
    what = "a damaged or truncated gzip file" if path.name.endswith(".gz") else "cannot be read"
    return DataSourceError(path, f"{what} ({type(error).__name__}: {error})", "re-download it")


def _read_json_document(path: Path) -> tuple[Any, bool]:
    """``(document, True)`` for one JSON document, ``(list of line records, False)`` for JSON lines."""
    text = _read_text(path)
    if not path.name.endswith(JSON_LINES_SUFFIXES):
        try:
            return json.loads(text), True
        except json.JSONDecodeError as error:
            if "Extra data" not in str(error):
                raise DataSourceError(path, f"not valid JSON ({error})", "fix or re-download the file") from None
    records = [_decode_line(line) for line in text.splitlines()]
    first = next((record for record in records if record is not None), None)
    if isinstance(first, (list, InvalidJson)) and _is_one_document(text):
        raise _json_document_in_jsonl(path, "a JSON array" if text.lstrip().startswith("[") else "one JSON document")
    return records, False


def _is_one_document(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


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
        raise DataSourceError(path, f"expected a list of records, JSON lines or {{'{record_key}': [...]}}; found {keys}",
                              "check that this is the right file")
    for row, record in enumerate(document):
        yield SourceRow(f"{path}: row {row}", record)


def _parquet_rows(path: Path) -> Iterator[SourceRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataSourceError(path, f"an unreadable parquet file ({message})", "re-download it") from None
    for row, record in enumerate(records):
        yield SourceRow(f"{path}: row {row}", record)


def read_records(path: Path) -> Iterator[SourceRow]:
    """The records of one local file, after :func:`inspect_file`."""
    inspect_file(path)
    yield from _parquet_rows(path) if path.name.endswith(".parquet") else _json_rows(path)


def _hub_rows(hub_id: str, data_dir: str | None, split: str) -> Iterator[SourceRow]:
    from datasets import load_dataset

    check_hub_source(hub_id)
    try:
        dataset = load_dataset(hub_id, data_dir=data_dir, split=split)
    except ConnectionError as error:  # the check passed, the download failed: still one line
        raise DataSourceError(hub_id, f"cannot be loaded from the hub ({str(error).splitlines()[0]})",
                              "check the network, or use a local path", hub=True) from None
    label = f"{hub_id}" + (f" (data_dir={data_dir})" if data_dir else "") + f" split {split}"
    for row, record in enumerate(dataset):
        yield SourceRow(f"{label}: row {row}", record)


def check_hub_source(hub_id: str) -> None:
    """:func:`trl_multiadapter.hub.check_hub_reachable` for a data set, as a :class:`DataSourceError`."""
    from ..hub import HubUnreachableError, check_hub_reachable

    try:
        check_hub_reachable(hub_id, "dataset")
    except HubUnreachableError as error:
        raise DataSourceError(f"hub dataset {hub_id!r}", error.problem, error.fix, hub=True) from None


def source_rows(path_or_hub_id, data_dir: str | None, split: str, loader: str) -> Iterator[SourceRow]:
    """Every record of ``split`` of the source (see :func:`find_split`), with its location."""
    found = local_split_files(path_or_hub_id, data_dir, split, loader)
    if found.hub_id is not None:
        return _hub_rows(found.hub_id, data_dir, split)
    return (row for path in found.files for row in read_records(path))


def first_records(path_or_hub_id, data_dir: str | None, split: str, loader: str,
                  count: int = 3) -> list[SourceRow]:
    """The first ``count`` records of each local file of ``split`` (what a quick check reads)."""
    found = local_split_files(path_or_hub_id, data_dir, split, loader)
    rows: list[SourceRow] = []
    for path in found.files:
        inspect_file(path)
        rows.extend(_first_rows(path, count))
    return rows


def _first_rows(path: Path, count: int) -> list[SourceRow]:
    if path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = next(pq.ParquetFile(path).iter_batches(batch_size=count), None)
        except (pa.ArrowException, OSError) as error:
            raise DataSourceError(path, f"an unreadable parquet file ({str(error).splitlines()[0]})",
                                  "re-download it") from None
        return [SourceRow(f"{path}: row {row}", record) for row, record in
                enumerate(table.to_pylist() if table is not None else [])]
    if path.name.endswith(JSON_LINES_SUFFIXES):
        return _first_json_lines(path, count)
    rows = []
    for row in _json_rows(path):
        rows.append(row)
        if len(rows) == count:
            break
    return rows


def _first_json_lines(path: Path, count: int) -> list[SourceRow]:
    rows: list[SourceRow] = []
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                record = _decode_line(line)
                if record is not None:
                    rows.append(SourceRow(f"{path}: row {len(rows)} (line {line_number})", record))
                if len(rows) == count:
                    break
    except UnicodeDecodeError as error:
        raise DataSourceError(path, f"not UTF-8 text ({error.reason})", "save it as UTF-8") from None
    except (OSError, EOFError, zlib.error) as error:
        raise _unreadable(path, error) from None
    return rows
