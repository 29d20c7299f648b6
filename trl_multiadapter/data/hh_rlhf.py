"""Anthropic hh-rlhf: transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) to TRL's conversational
preference format: ``prompt`` (the shared turns), ``chosen`` / ``rejected`` (one assistant message each)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from ..registry import register_data_source
from .report import (
    BAD_ROW_POLICIES,
    IDENTICAL_RESPONSES,
    MALFORMED_ROW,
    MERGED_TURNS,
    NO_ASSISTANT_TURN,
    NON_STRING_FIELD,
    PROMPTS_DIFFER,
    ROLES_OUT_OF_ORDER,
    TEXT_BEFORE_FIRST_TURN,
    DataReport,
    log_report,
)
from .rows import messages_feature
from .source_check import attach_check, first_rows_problem
from .sources import InvalidJson, reads_split_files, source_label, source_rows

HH_RLHF_HUB_ID = "Anthropic/hh-rlhf"


class TranscriptError(ValueError):
    """A transcript or preference row that cannot be used; ``reason`` is one of the reason constants."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_TURN_MARKER = re.compile(r"\n\n(Human|Assistant):")
_MARKER_AT_START = re.compile(r"\s*(?=(?:Human|Assistant):)")
_ROLE_OF_SPEAKER = {"Human": "user", "Assistant": "assistant"}


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
    """Split an hh-rlhf transcript into ``[{"role": "user" | "assistant", "content": str}, ...]``.

    A turn starts only at ``"\\n\\nHuman:"`` or ``"\\n\\nAssistant:"`` (also at ``"Human:"`` /
    ``"Assistant:"`` opening the text). A turn keeps its inner paragraphs; "Human:" anywhere else is
    content. Each turn's content is stripped of leading and trailing whitespace and may be empty. Role
    order is not checked here (see :func:`check_hh_roles`). Text before the first turn raises
    :class:`TranscriptError`; an empty text gives ``[]``.
    """
    if not isinstance(text, str):
        raise TranscriptError(NON_STRING_FIELD, f"expected a transcript string, got {type(text).__name__}")
    start = _MARKER_AT_START.match(text)
    if start is not None:  # a transcript opening with "Human:" has no blank line in front of it
        text = "\n\n" + text[start.end() :]
    pieces = _TURN_MARKER.split(text)
    if pieces[0].strip():
        raise TranscriptError(
            TEXT_BEFORE_FIRST_TURN, f"text before the first 'Human:'/'Assistant:' turn: {pieces[0][:60]!r}"
        )
    speakers, contents = pieces[1::2], pieces[2::2]
    return [
        {"role": _ROLE_OF_SPEAKER[speaker], "content": content.strip()}
        for speaker, content in zip(speakers, contents)
    ]


def check_hh_roles(messages: Sequence[dict[str, str]]) -> None:
    """Raise :class:`TranscriptError` unless turns alternate user/assistant, starting with the user and
    ending with the assistant."""
    for index, message in enumerate(messages):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            roles = "/".join(message["role"] for message in messages)
            raise TranscriptError(
                ROLES_OUT_OF_ORDER,
                f"turn {index} is {message['role']!r}, expected {expected!r} (roles: {roles})",
            )
    if not messages or messages[-1]["role"] != "assistant":
        raise TranscriptError(NO_ASSISTANT_TURN, "the transcript does not end with an assistant turn")


def merge_consecutive_turns(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """Consecutive turns of one role as one turn, their non-empty contents joined by a blank line.

    Real hh-rlhf has them (about 0.4% of harmless-base test: two Assistant turns in a row, sometimes at the
    end of the chosen text); one speaker's consecutive paragraphs are one turn for a chat template.
    """
    merged: list[dict[str, str]] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            parts = [part for part in (merged[-1]["content"], message["content"]) if part]
            merged[-1] = {"role": message["role"], "content": "\n\n".join(parts)}
        else:
            merged.append(dict(message))
    return merged


def hh_pair_to_preference(
    chosen: Any, rejected: Any, merge_turns: bool = True
) -> dict[str, list[dict[str, str]]]:
    """One hh-rlhf row -> ``{"prompt": shared turns, "chosen": [answer], "rejected": [answer]}``.

    ``merge_turns``: consecutive turns of one role are merged (:func:`merge_consecutive_turns`); with
    ``False`` they are an error (``roles_out_of_order``). Raises :class:`TranscriptError` with the reason
    when the row cannot be used.
    """
    return _preference_pair(chosen, rejected, merge_turns)[0]


def _preference_pair(chosen: Any, rejected: Any, merge_turns: bool) -> tuple[dict[str, list[dict[str, str]]], bool]:
    """The preference row and whether consecutive turns were merged to make it."""
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            found = "missing" if value is None else f"a {type(value).__name__}"
            raise TranscriptError(NON_STRING_FIELD, f"{name!r} is {found}, expected a transcript string")
    chosen_messages = parse_hh_transcript(chosen)
    rejected_messages = parse_hh_transcript(rejected)
    merged = False
    if merge_turns:
        parsed = len(chosen_messages) + len(rejected_messages)
        chosen_messages = merge_consecutive_turns(chosen_messages)
        rejected_messages = merge_consecutive_turns(rejected_messages)
        merged = len(chosen_messages) + len(rejected_messages) < parsed
    check_hh_roles(chosen_messages)
    check_hh_roles(rejected_messages)
    prompt = chosen_messages[:-1]
    if rejected_messages[:-1] != prompt:
        raise TranscriptError(
            PROMPTS_DIFFER,
            f"chosen has {len(prompt)} prompt turns and rejected {len(rejected_messages) - 1}, "
            f"and they differ",
        )
    if chosen_messages[-1] == rejected_messages[-1]:
        raise TranscriptError(IDENTICAL_RESPONSES, "chosen and rejected final answers are identical")
    return {"prompt": prompt, "chosen": chosen_messages[-1:], "rejected": rejected_messages[-1:]}, merged


def _preference_features():
    from datasets import Features

    return Features(
        {"prompt": messages_feature(), "chosen": messages_feature(), "rejected": messages_feature()}
    )


@register_data_source("hh_rlhf")
@reads_split_files
def load_hh_rlhf(
    path_or_hub_id: str | os.PathLike = HH_RLHF_HUB_ID,
    data_dir: str | None = None,
    split: str = "train",
    on_bad_row: str = "skip",
    return_report: bool = False,
    system_prompt: str | None = None,
    merge_turns: bool = True,
):
    """Load Anthropic hh-rlhf in TRL's conversational preference format: ``prompt``, ``chosen``, ``rejected``.

    ``path_or_hub_id`` is a hub id (read with ``datasets.load_dataset(id, data_dir=, split=)``, e.g.
    ``"Anthropic/hh-rlhf"`` with ``data_dir="helpful-base"``), a local ``.jsonl``, ``.jsonl.gz``,
    ``.json`` or ``.parquet`` file (the whole file is the split), a local folder holding
    ``[data_dir/]<split>.jsonl.gz``-like files (a clone of the hub repository; split names as in
    :func:`.sources.find_split`), or a list of files (one split). A file that is not what its name says
    (a Git LFS pointer, a JSON array saved as ``.jsonl``, ...) is a one-line ``DataSourceError``.

    Rows that cannot be used (see the reason constants: missing or non-string fields, text before the
    first turn, roles out of order, no final assistant turn, prompts that differ between chosen and
    rejected, identical answers) are counted and logged in one summary line with
    ``on_bad_row="skip"``; ``on_bad_row="error"`` raises ``ValueError`` naming the file, row and reason.
    Consecutive turns of one role are merged (joined by a blank line) and the row is kept and counted as
    ``merged_turns``; ``merge_turns=False`` drops such rows as ``roles_out_of_order`` instead.
    ``system_prompt`` (optional) becomes a system message opening every prompt. Returns the dataset,
    or ``(dataset, DataReport)`` with ``return_report=True``.
    """
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row={on_bad_row!r}: choose one of {', '.join(BAD_ROW_POLICIES)}")
    from datasets import Dataset

    report = DataReport(f"load_hh_rlhf({source_label(path_or_hub_id, data_dir, split)})")
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    columns: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for row, source_row in enumerate(source_rows(path_or_hub_id, data_dir, split, "load_hh_rlhf")):
        report.total += 1
        try:
            pair, merged = _preference_from_record(source_row.record, merge_turns)
        except TranscriptError as error:
            if on_bad_row == "error":
                raise ValueError(
                    f"{source_row.location}: {error}. Fix the row, or count and skip bad rows: "
                    "data.preference.on_malformed: skip in a recipe (on_bad_row='skip' in Python)"
                ) from error
            report.record_dropped(row, error.reason)
            continue
        report.record_kept(row)
        if merged:
            report.record_flagged(row, MERGED_TURNS)
        pair["prompt"] = system + pair["prompt"]
        for name, messages in pair.items():
            columns[name].append(messages)
    log_report(report)
    if report.kept == 0:
        raise ValueError(f"no usable preference pairs: {report.summary()}")
    dataset = Dataset.from_dict(columns, features=_preference_features())
    return (dataset, report) if return_report else dataset


def _preference_from_record(record: Any, merge_turns: bool) -> tuple[dict[str, list[dict[str, str]]], bool]:
    if isinstance(record, InvalidJson):
        raise TranscriptError(MALFORMED_ROW, f"invalid JSON: {record.error}")
    if not isinstance(record, dict):
        raise TranscriptError(
            MALFORMED_ROW, f"expected an object with 'chosen' and 'rejected', got {type(record).__name__}"
        )
    return _preference_pair(record.get("chosen"), record.get("rejected"), merge_turns)



def _first_rows_problem(rows) -> str | None:
    return first_rows_problem(
        rows, lambda record: isinstance(record.get("chosen"), str) and isinstance(record.get("rejected"), str),
        "'chosen' / 'rejected' transcripts",
    )


attach_check(load_hh_rlhf, _first_rows_problem,
             "point the path at hh-rlhf data: one {'chosen': '...', 'rejected': '...'} object per row")
