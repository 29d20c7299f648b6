"""A quick look at a data source before any work (seconds, a few KiB per file): does it exist, is every
file what its name says, does each split resolve to its files, do the first rows have the fields the
loader needs, is a hub id reachable. A bad source is one :class:`.DataSourceError` line (the file, what
it is, the fix); the loaders raise the same errors later, but only after earlier work has run.

The built-in loaders carry their check as ``loader.check_split`` (see :func:`attach_check`), so a caller
holding only the registered data source finds it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .sources import (
    DataSourceError,
    InvalidJson,
    SourceRow,
    check_hub_source,
    find_split,
    first_records,
    local_split_files,
)

FIRST_ROWS = 5

RecordProblem = Callable[[Sequence[SourceRow]], str | None]


def check_split(path_or_hub_id: Any, data_dir: str | None, split: str, *, loader: str,
                record_problem: RecordProblem, fix: str, required: bool = True,
                check_hub: bool = True) -> str | None:
    """Check where ``split`` of a source comes from; raise :class:`.DataSourceError`, or return a note
    (``None`` when there is nothing to say).

    ``required=False`` (an eval split) makes a folder without the split a note: the data stage carves one.
    ``check_hub=False`` leaves hub ids unchecked (noted). ``record_problem`` says what is wrong with the
    first rows of a file (None when at least one has the loader's fields); ``fix`` goes with it.
    """
    found = find_split(path_or_hub_id, data_dir, split, loader)
    if found is None:
        if required:
            local_split_files(path_or_hub_id, data_dir, split, loader)  # raises, listing what is there
        return f"{Path(path_or_hub_id) / (data_dir or '')} has no '{split}' split: the data stage holds out train rows"
    if found.hub_id is not None:
        if not check_hub:
            return f"hub dataset {found.hub_id!r} not checked"
        check_hub_source(found.hub_id)
        return None
    for path in found.files:
        rows = first_records([path], None, split, loader, count=FIRST_ROWS)
        problem = record_problem(rows)
        if problem is not None:
            raise DataSourceError(path, problem, fix)
    if found.whole_file and not required:
        return f"{', '.join(str(path) for path in found.files)} is one split: the data stage holds out train rows"
    return None


def attach_check(loader, record_problem: RecordProblem, fix: str):
    """Give a loader its ``check_split`` (:func:`check_split` with the loader's record rules)."""
    loader.check_split = functools.partial(check_split, loader=loader.__name__, record_problem=record_problem,
                                           fix=fix)
    return loader


def first_rows_problem(rows: Sequence[SourceRow], accepts: Callable[[dict], bool], wanted: str) -> str | None:
    """None when one of the first ``rows`` is an object that ``accepts``; else what they hold instead."""
    if not rows:
        return "no rows"
    if any(isinstance(row.record, dict) and accepts(row.record) for row in rows):
        return None
    first = rows[0].record
    if isinstance(first, InvalidJson):
        found = f"invalid JSON ({first.error})"
    elif isinstance(first, dict):
        found = "keys " + ", ".join(sorted(map(str, first))[:8])
    else:
        found = f"a {type(first).__name__}"
    return f"its first {len(rows)} rows have no {wanted}; the first has {found}"
