"""Preference data (Anthropic hh-rlhf) and prompt data (SQuAD): loading, parsing, chat-template encoding.

This module knows nothing about PPO. It turns

* hh-rlhf transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) into TRL's conversational preference
  format: ``prompt`` (the shared turns), ``chosen`` / ``rejected`` (one assistant message each);
* SQuAD questions (original nested JSON or the flat hub form) into ``prompt`` messages that keep their
  reference ``answers`` for evaluation;

and shortens or encodes them for a tokenizer's chat template. Every row that is dropped or shortened is
counted in a :class:`DataReport`; nothing is dropped silently.

Heavy libraries (``datasets``, ``pyarrow``) are imported inside the functions: the plugin registry imports
this module to list the built-in data sources before torch is loaded.
"""

from __future__ import annotations

import bisect
import gzip
import json
import logging
import os
import re
import string
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .registry import register_data_source

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

logger = logging.getLogger(__name__)

HH_RLHF_HUB_ID = "Anthropic/hh-rlhf"
SQUAD_HUB_ID = "rajpurkar/squad"
DEFAULT_SQUAD_SYSTEM_PROMPT = "Answer the question with a short phrase copied from the context."

# Why a row was dropped; the report and the error messages use these names.
MALFORMED_ROW = "malformed_row"  # not a JSON object
NON_STRING_FIELD = "non_string_field"  # "chosen" or "rejected" missing or not a string
TEXT_BEFORE_FIRST_TURN = "text_before_first_turn"
ROLES_OUT_OF_ORDER = "roles_out_of_order"
NO_ASSISTANT_TURN = "no_assistant_turn"  # the transcript does not end with an assistant turn
PROMPTS_DIFFER = "prompts_differ"
IDENTICAL_RESPONSES = "identical_responses"
FINAL_TURN_TOO_LONG = "final_turn_too_long"
PROMPT_TOO_LONG = "prompt_too_long"

BAD_ROW_POLICIES = ("skip", "error")
LONG_PROMPT_POLICIES = ("drop", "cut_context")
_EXAMPLES_PER_REASON = 5
_ENCODE_BATCH_SIZE = 512
_JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
_SUPPORTED_SUFFIXES = (*_JSON_SUFFIXES, ".parquet")
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ----------------------------------------------------------------------------------------------- reports


@dataclass
class DataReport:
    """What a loading or preparation step kept, shortened and dropped (by reason), with example rows.

    ``examples`` maps each reason (and ``"shortened"``) to the first few row indices of the step's input.
    """

    step: str
    total: int = 0
    kept: int = 0
    shortened: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[int]] = field(default_factory=dict)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def record_kept(self, row: int, shortened: bool = False) -> None:
        self.kept += 1
        if shortened:
            self.shortened += 1
            self._add_example("shortened", row)

    def record_dropped(self, row: int, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self._add_example(reason, row)

    def summary(self) -> str:
        """One line, e.g. ``load_hh_rlhf(x.jsonl): 10 rows, kept 8 (1 shortened), dropped 2: ...``."""
        line = f"{self.step}: {self.total} rows, kept {self.kept} ({self.shortened} shortened"
        if self.shortened:
            line += f", e.g. rows {_row_list(self.examples['shortened'])}"
        line += f"), dropped {self.dropped_total}"
        if self.dropped:
            reasons = "; ".join(
                f"{reason} {count} (e.g. rows {_row_list(self.examples[reason])})"
                for reason, count in sorted(self.dropped.items())
            )
            line += f": {reasons}"
        return line

    def _add_example(self, key: str, row: int) -> None:
        rows = self.examples.setdefault(key, [])
        if len(rows) < _EXAMPLES_PER_REASON:
            rows.append(row)


def _row_list(rows: list[int]) -> str:
    return ", ".join(str(row) for row in rows)


def _log_report(report: DataReport) -> None:
    if report.dropped_total or report.shortened:
        logger.warning(report.summary())
    else:
        logger.info(report.summary())


# ------------------------------------------------------------------------------------------- transcripts


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


def hh_pair_to_preference(chosen: Any, rejected: Any) -> dict[str, list[dict[str, str]]]:
    """One hh-rlhf row -> ``{"prompt": shared turns, "chosen": [answer], "rejected": [answer]}``.

    Raises :class:`TranscriptError` with the reason when the row cannot be used.
    """
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            found = "missing" if value is None else f"a {type(value).__name__}"
            raise TranscriptError(NON_STRING_FIELD, f"{name!r} is {found}, expected a transcript string")
    chosen_messages = parse_hh_transcript(chosen)
    rejected_messages = parse_hh_transcript(rejected)
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
    return {"prompt": prompt, "chosen": chosen_messages[-1:], "rejected": rejected_messages[-1:]}


# ----------------------------------------------------------------------------------------------- sources


@dataclass
class _SourceRow:
    location: str  # "<file>: row 3 (line 4)" for messages
    record: Any  # a decoded record, or _InvalidJson


@dataclass
class _InvalidJson:
    error: str


def _is_local(path_or_hub_id: str | os.PathLike) -> bool:
    return Path(path_or_hub_id).expanduser().exists()


def _check_source(path_or_hub_id: str | os.PathLike, loader: str) -> None:
    if _is_local(path_or_hub_id):
        return
    looks_like_file = str(path_or_hub_id).endswith(_SUPPORTED_SUFFIXES)
    if isinstance(path_or_hub_id, str) and _HUB_ID_PATTERN.match(path_or_hub_id) and not looks_like_file:
        return
    raise FileNotFoundError(
        f"{loader}: {str(path_or_hub_id)!r} is neither an existing file or folder nor a hub id like "
        f"'owner/name'; check the path"
    )


def _local_files(path: Path, data_dir: str | None, split: str, loader: str) -> list[Path]:
    """The files of a local source: the file itself, or ``split*`` files in ``path / data_dir``."""
    if path.is_file():
        if data_dir is not None:
            raise ValueError(
                f"{loader}: data_dir={data_dir!r} applies to hub ids and folders, not to the file {path}"
            )
        if not path.name.endswith(_SUPPORTED_SUFFIXES):
            raise ValueError(f"{loader}: cannot read {path}: use one of {', '.join(_SUPPORTED_SUFFIXES)}")
        return [path]
    folder = path / data_dir if data_dir else path
    if not folder.is_dir():
        raise FileNotFoundError(f"{loader}: folder {folder} does not exist; check data_dir={data_dir!r}")
    files = sorted(
        candidate
        for candidate in folder.iterdir()
        if candidate.is_file()
        and candidate.name.endswith(_SUPPORTED_SUFFIXES)
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
        return _InvalidJson(str(error))


def _json_rows(path: Path, record_key: str | None = "data") -> Iterator[_SourceRow]:
    document, whole = _read_json_document(path)
    if not whole:
        row = 0
        for line_number, record in enumerate(document, start=1):
            if record is None:
                continue  # blank line
            yield _SourceRow(f"{path}: row {row} (line {line_number})", record)
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
        yield _SourceRow(f"{path}: row {row}", record)


def _parquet_rows(path: Path) -> Iterator[_SourceRow]:
    import pyarrow.parquet as pq

    for row, record in enumerate(pq.read_table(path).to_pylist()):
        yield _SourceRow(f"{path}: row {row}", record)


def _local_rows(files: list[Path]) -> Iterator[_SourceRow]:
    for path in files:
        yield from _parquet_rows(path) if path.name.endswith(".parquet") else _json_rows(path)


def _hub_rows(hub_id: str, data_dir: str | None, split: str) -> Iterator[_SourceRow]:
    from datasets import load_dataset

    dataset = load_dataset(hub_id, data_dir=data_dir, split=split)
    label = f"{hub_id}" + (f" (data_dir={data_dir})" if data_dir else "") + f" split {split}"
    for row, record in enumerate(dataset):
        yield _SourceRow(f"{label}: row {row}", record)


def _source_rows(path_or_hub_id, data_dir: str | None, split: str, loader: str) -> Iterator[_SourceRow]:
    _check_source(path_or_hub_id, loader)
    if _is_local(path_or_hub_id):
        return _local_rows(_local_files(Path(path_or_hub_id).expanduser(), data_dir, split, loader))
    return _hub_rows(str(path_or_hub_id), data_dir, split)


def _source_label(path_or_hub_id, data_dir: str | None, split: str) -> str:
    if _is_local(path_or_hub_id):
        return str(path_or_hub_id)
    return f"{path_or_hub_id}" + (f", data_dir={data_dir}" if data_dir else "") + f", split={split}"


# ----------------------------------------------------------------------------------------------- hh-rlhf


def _messages_feature():
    from datasets import List, Value

    return List({"role": Value("string"), "content": Value("string")})


def _preference_features():
    from datasets import Features

    return Features(
        {"prompt": _messages_feature(), "chosen": _messages_feature(), "rejected": _messages_feature()}
    )


@register_data_source("hh_rlhf")
def load_hh_rlhf(
    path_or_hub_id: str | os.PathLike = HH_RLHF_HUB_ID,
    data_dir: str | None = None,
    split: str = "train",
    on_bad_row: str = "skip",
    return_report: bool = False,
    system_prompt: str | None = None,
):
    """Load Anthropic hh-rlhf in TRL's conversational preference format: ``prompt``, ``chosen``, ``rejected``.

    ``path_or_hub_id`` is a hub id (read with ``datasets.load_dataset(id, data_dir=, split=)``, e.g.
    ``"Anthropic/hh-rlhf"`` with ``data_dir="helpful-base"``), a local ``.jsonl``, ``.jsonl.gz``,
    ``.json`` or ``.parquet`` file (the whole file is the split), or a local folder holding
    ``[data_dir/]<split>.jsonl.gz``-like files (a clone of the hub repository).

    Rows that cannot be used (see the reason constants: missing or non-string fields, text before the
    first turn, roles out of order, no final assistant turn, prompts that differ between chosen and
    rejected, identical answers) are counted and logged in one summary line with
    ``on_bad_row="skip"``; ``on_bad_row="error"`` raises ``ValueError`` naming the file, row and reason.
    ``system_prompt`` (optional) becomes a system message opening every prompt. Returns the dataset,
    or ``(dataset, DataReport)`` with ``return_report=True``.
    """
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row={on_bad_row!r}: choose one of {', '.join(BAD_ROW_POLICIES)}")
    from datasets import Dataset

    report = DataReport(f"load_hh_rlhf({_source_label(path_or_hub_id, data_dir, split)})")
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    columns: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for row, source_row in enumerate(_source_rows(path_or_hub_id, data_dir, split, "load_hh_rlhf")):
        report.total += 1
        try:
            pair = _preference_from_record(source_row.record)
        except TranscriptError as error:
            if on_bad_row == "error":
                raise ValueError(
                    f"{source_row.location}: {error}. Fix the row, or pass on_bad_row='skip' to count "
                    f"and skip bad rows"
                ) from error
            report.record_dropped(row, error.reason)
            continue
        report.record_kept(row)
        pair["prompt"] = system + pair["prompt"]
        for name, messages in pair.items():
            columns[name].append(messages)
    _log_report(report)
    if report.kept == 0:
        raise ValueError(f"no usable preference pairs: {report.summary()}")
    dataset = Dataset.from_dict(columns, features=_preference_features())
    return (dataset, report) if return_report else dataset


def _preference_from_record(record: Any) -> dict[str, list[dict[str, str]]]:
    if isinstance(record, _InvalidJson):
        raise TranscriptError(MALFORMED_ROW, f"invalid JSON: {record.error}")
    if not isinstance(record, dict):
        raise TranscriptError(
            MALFORMED_ROW, f"expected an object with 'chosen' and 'rejected', got {type(record).__name__}"
        )
    return hh_pair_to_preference(record.get("chosen"), record.get("rejected"))


# ----------------------------------------------------------------------------------------- chat template


def encode_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template, with at most one leading BOS."""
    return _encode_chats(tokenizer, [messages], add_generation_prompt)[0]


def _encode_chats(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool) -> list[list[int]]:
    if not conversations:
        return []
    encoded = tokenizer.apply_chat_template(
        conversations, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    return [_without_double_bos(ids, tokenizer.bos_token_id) for ids in encoded]


def _without_double_bos(ids: list[int], bos_token_id: int | None) -> list[int]:
    # A template that writes BOS itself, encoded by a tokenizer that adds one too, would start with two.
    if bos_token_id is not None and len(ids) >= 2 and ids[0] == bos_token_id and ids[1] == bos_token_id:
        return list(ids[1:])
    return list(ids)


def _dataset_from_rows(rows: list[dict], features) -> Dataset:
    from datasets import Dataset

    # Column-wise with explicit features: also right for zero rows, where from_list cannot infer a schema.
    return Dataset.from_dict({name: [row[name] for row in rows] for name in features}, features=features)


def _batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _check_columns(dataset, required: tuple[str, ...], step: str) -> None:
    missing = [name for name in required if name not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{step}: the dataset has no {', '.join(repr(name) for name in missing)} column; "
            f"it has {', '.join(dataset.column_names)}"
        )


def _check_length(value: Any, name: str, step: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{step}: {name}={value!r} must be a positive number of tokens")


# -------------------------------------------------------------------------------------- preference pairs


def preference_pair_length(tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> int:
    """Tokens of the longer of ``prompt + chosen`` and ``prompt + rejected`` under the chat template: the
    length ``trl.RewardTrainer`` compares with ``max_length``."""
    return max(len(ids) for ids in _encode_chats(tokenizer, [prompt + chosen, prompt + rejected], False))


def prepare_preference_pairs(dataset: Dataset, tokenizer, max_length: int) -> tuple[Dataset, DataReport]:
    """Fit every preference pair into ``max_length`` tokens (chat template applied), counting what changed.

    ``trl.RewardTrainer`` silently filters out pairs longer than its ``max_length``. Here an over-long pair
    loses its earliest prompt turns, whole user/assistant exchanges at a time (a leading system message
    stays), until it fits; the final user turn and the differing answers are always kept. Only a pair
    whose final exchange alone is too long is dropped (reason ``final_turn_too_long``).
    """
    step = "prepare_preference_pairs"
    _check_columns(dataset, ("prompt", "chosen", "rejected"), step)
    _check_length(max_length, "max_length", step)
    rows = dataset.to_list()
    report = DataReport(f"{step}(max_length={max_length})", total=len(rows))
    lengths = _pair_lengths(tokenizer, rows)
    kept_rows = []
    for index, (row, length) in enumerate(zip(rows, lengths)):
        if length <= max_length:
            report.record_kept(index)
            kept_rows.append(row)
            continue
        prompt = _shortest_fitting_prompt(tokenizer, row, max_length)
        if prompt is None:
            report.record_dropped(index, FINAL_TURN_TOO_LONG)
            continue
        report.record_kept(index, shortened=True)
        kept_rows.append({**row, "prompt": prompt})
    _log_report(report)
    return _dataset_from_rows(kept_rows, dataset.features), report


def _pair_lengths(tokenizer, rows: list[dict]) -> list[int]:
    lengths = []
    for batch in _batched(rows, _ENCODE_BATCH_SIZE):
        chosen = _encode_chats(tokenizer, [row["prompt"] + row["chosen"] for row in batch], False)
        rejected = _encode_chats(tokenizer, [row["prompt"] + row["rejected"] for row in batch], False)
        lengths.extend(max(len(a), len(b)) for a, b in zip(chosen, rejected))
    return lengths


def _shortest_fitting_prompt(tokenizer, row: dict, max_length: int) -> list[dict] | None:
    """The prompt with the fewest earliest exchanges removed that fits, or None if none does."""
    prompt = row["prompt"]
    system = [message for message in prompt[:1] if message["role"] == "system"]
    turns = prompt[len(system) :]
    # Cut only in front of a user turn, so that whole exchanges go and the prompt still opens with the user.
    cut_points = [index for index, message in enumerate(turns) if index > 0 and message["role"] == "user"]
    for cut in cut_points:
        candidate = system + turns[cut:]
        if preference_pair_length(tokenizer, candidate, row["chosen"], row["rejected"]) <= max_length:
            return candidate
    return None


# ------------------------------------------------------------------------------------------------- SQuAD


def format_squad_question(context: str | None, question: str) -> str:
    """The user message of a SQuAD prompt (without a context: the question alone)."""
    if context is None:
        return question.strip()
    return f"Context: {context.strip()}\n\nQuestion: {question.strip()}"


def squad_prompt_messages(
    context: str | None, question: str, system_prompt: str | None
) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*messages, {"role": "user", "content": format_squad_question(context, question)}]


def _squad_features():
    from datasets import Features, List, Value

    return Features(
        {
            "id": Value("string"),
            "title": Value("string"),
            "context": Value("string"),
            "question": Value("string"),
            "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
            "is_impossible": Value("bool"),
            "prompt": _messages_feature(),
        }
    )


@register_data_source("squad")
def load_squad_prompts(
    path_or_hub_id: str | os.PathLike = SQUAD_HUB_ID,
    split: str = "train",
    system_prompt: str | None = DEFAULT_SQUAD_SYSTEM_PROMPT,
    data_dir: str | None = None,
    include_context: bool = True,
):
    """Load SQuAD (v1.1 or v2.0) questions as prompts: columns ``id``, ``title``, ``context``, ``question``,
    ``answers`` (``{"text": [...], "answer_start": [...]}``, kept for evaluation), ``is_impossible`` and
    ``prompt`` (an optional system message plus a user message with the context and the question).

    Reads the original nested JSON (``version``, ``data[].paragraphs[].qas[]``) and the flat form
    (``id, title, context, question, answers``) from JSON, JSON lines, parquet or the hub, including flat
    records under a top-level ``"data"`` key (``title`` may be missing there). Both forms of the same
    questions give identical prompts. Unanswerable (v2) questions are kept with ``is_impossible=True``.
    ``include_context=False`` leaves the context out of the user message (the question alone).
    """
    from datasets import Dataset

    records = []
    for source_row in _source_rows(path_or_hub_id, data_dir, split, "load_squad_prompts"):
        records.extend(_squad_records(source_row))
    if not records:
        raise ValueError(
            f"load_squad_prompts: no questions in {_source_label(path_or_hub_id, data_dir, split)}"
        )
    for record in records:
        context = record["context"] if include_context else None
        record["prompt"] = squad_prompt_messages(context, record["question"], system_prompt)
    return Dataset.from_list(records, features=_squad_features())


def _squad_records(source_row: _SourceRow) -> list[dict]:
    record = source_row.record
    if isinstance(record, _InvalidJson) or not isinstance(record, dict):
        found = record.error if isinstance(record, _InvalidJson) else type(record).__name__
        raise ValueError(f"{source_row.location}: not a SQuAD record ({found})")
    if "paragraphs" in record:
        return list(_nested_squad_records(record, source_row.location))
    return [_flat_squad_record(record, source_row.location)]


def _nested_squad_records(article: dict, location: str) -> Iterator[dict]:
    title = article.get("title") or ""
    for p_index, paragraph in enumerate(_required(article, "paragraphs", location, list)):
        paragraph_location = f"{location}.paragraphs[{p_index}]"
        context = _required(paragraph, "context", paragraph_location, str)
        for q_index, qa in enumerate(_required(paragraph, "qas", paragraph_location, list)):
            qa_location = f"{paragraph_location}.qas[{q_index}]"
            answers = _answers_from_list(qa.get("answers") or [], qa_location)
            yield _squad_record(
                id=_required(qa, "id", qa_location, str),
                title=title,
                context=context,
                question=_required(qa, "question", qa_location, str),
                answers=answers,
                is_impossible=bool(qa.get("is_impossible", False)),
            )


def _flat_squad_record(record: dict, location: str) -> dict:
    raw_answers = record.get("answers")
    if isinstance(raw_answers, list):
        answers = _answers_from_list(raw_answers, location)
    else:
        answers = _answers_from_columns(raw_answers or {}, location)
    return _squad_record(
        id=str(_required(record, "id", location, (str, int))),
        title=record.get("title") or "",
        context=_required(record, "context", location, str),
        question=_required(record, "question", location, str),
        answers=answers,
        is_impossible=bool(record.get("is_impossible", False)),
    )


def _squad_record(*, id, title, context, question, answers, is_impossible) -> dict:
    return {
        "id": id,
        "title": title,
        "context": context,
        "question": question,
        "answers": answers,
        # v1.1 has no flag: a question without reference answers cannot be scored either way.
        "is_impossible": is_impossible or not answers["text"],
    }


def _required(record: Any, key: str, location: str, kind) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise ValueError(
            f"{location}: missing {key!r}; SQuAD records need it (nested: data[].paragraphs[].qas[])"
        )
    value = record[key]
    if not isinstance(value, kind):
        raise ValueError(f"{location}: {key!r} is a {type(value).__name__}, expected {_kind_name(kind)}")
    return value


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(item.__name__ for item in kinds)


def _answers_from_list(answers: list, location: str) -> dict[str, list]:
    texts, starts = [], []
    for index, answer in enumerate(answers):
        texts.append(_required(answer, "text", f"{location}.answers[{index}]", str))
        starts.append(int(_required(answer, "answer_start", f"{location}.answers[{index}]", int)))
    return {"text": texts, "answer_start": starts}


def _answers_from_columns(answers: dict, location: str) -> dict[str, list]:
    texts = list(answers.get("text") or [])
    starts = [int(start) for start in answers.get("answer_start") or []]
    if len(texts) != len(starts):
        raise ValueError(
            f"{location}: answers has {len(texts)} texts but {len(starts)} answer_start values; "
            f"they must pair up"
        )
    return {"text": texts, "answer_start": starts}


# ----------------------------------------------------------------------------------------------- prompts


def prepare_prompts(
    dataset: Dataset, tokenizer, max_prompt_length: int, long_prompts: str = "drop"
) -> tuple[Dataset, DataReport]:
    """Encode each ``prompt`` with the chat template and the assistant header (generation starts the
    answer) into an ``input_ids`` column with one BOS. Nothing is truncated at random.

    Prompts longer than ``max_prompt_length`` are dropped and counted (``long_prompts="drop"``), or, with
    ``long_prompts="cut_context"`` on SQuAD prompts, the context is cut at sentence boundaries around the
    sentence holding the first reference answer until it fits (counted as shortened; ``context`` and
    ``answer_start`` follow the cut); a prompt that cannot fit even so is dropped.
    """
    step = "prepare_prompts"
    _check_columns(dataset, ("prompt",), step)
    _check_length(max_prompt_length, "max_prompt_length", step)
    if long_prompts not in LONG_PROMPT_POLICIES:
        raise ValueError(
            f"{step}: long_prompts={long_prompts!r}: choose one of {', '.join(LONG_PROMPT_POLICIES)}"
        )
    if long_prompts == "cut_context":
        _check_columns(dataset, ("context", "question"), f"{step}(long_prompts='cut_context')")
    from datasets import List, Value

    rows = dataset.to_list()
    report = DataReport(f"{step}(max_prompt_length={max_prompt_length})", total=len(rows))
    encoded = []
    for batch in _batched(rows, _ENCODE_BATCH_SIZE):
        encoded.extend(_encode_chats(tokenizer, [row["prompt"] for row in batch], True))
    kept_rows = []
    for index, (row, input_ids) in enumerate(zip(rows, encoded)):
        if len(input_ids) <= max_prompt_length:
            report.record_kept(index)
            kept_rows.append({**row, "input_ids": input_ids})
            continue
        shortened = _cut_context(tokenizer, row, max_prompt_length) if long_prompts == "cut_context" else None
        if shortened is None:
            report.record_dropped(index, PROMPT_TOO_LONG)
            continue
        report.record_kept(index, shortened=True)
        kept_rows.append(shortened)
    _log_report(report)
    features = dataset.features.copy()
    features["input_ids"] = List(Value("int32"))
    return _dataset_from_rows(kept_rows, features), report


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _sentence_spans(text: str) -> list[tuple[int, int]]:
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        spans.append((start, match.start()))
        start = match.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _cut_context(tokenizer, row: dict, max_prompt_length: int) -> dict | None:
    """The row with the widest window of whole sentences that fits, grown around the answer sentence."""
    context = row["context"]
    spans = _sentence_spans(context)
    if not spans or row["prompt"][-1]["content"] != format_squad_question(context, row["question"]):
        return None  # the user message does not hold this context: cutting it cannot shorten the prompt
    starts = row.get("answers", {}).get("answer_start") or []
    anchor = max(0, bisect.bisect_right([span[0] for span in spans], starts[0]) - 1) if starts else 0

    def encode(first: int, last: int) -> dict:
        window_start, window_end = spans[first][0], spans[last][1]
        return _row_with_context(tokenizer, row, window_start, window_end)

    best = encode(anchor, anchor)
    if len(best["input_ids"]) > max_prompt_length:
        return None
    first = last = anchor
    grown = True
    while grown:
        grown = False
        for candidate in ((first - 1, last), (first, last + 1)):  # prefer keeping earlier text
            if 0 <= candidate[0] and candidate[1] < len(spans):
                attempt = encode(*candidate)
                if len(attempt["input_ids"]) <= max_prompt_length:
                    first, last, best, grown = candidate[0], candidate[1], attempt, True
                    break
    return best


def _row_with_context(tokenizer, row: dict, window_start: int, window_end: int) -> dict:
    context = row["context"][window_start:window_end]
    answers = row.get("answers")
    if answers is not None:  # keep the answers inside the window, their offsets moved with it
        inside = [
            (text, start - window_start)
            for text, start in zip(answers["text"], answers["answer_start"])
            if window_start <= start and start + len(text) <= window_end
        ]
        answers = {"text": [text for text, _ in inside], "answer_start": [start for _, start in inside]}
    prompt = [
        *row["prompt"][:-1],
        {"role": "user", "content": format_squad_question(context, row["question"])},
    ]
    shortened = {
        **row,
        "context": context,
        "prompt": prompt,
        "input_ids": encode_chat(tokenizer, prompt, True),
    }
    if answers is not None:
        shortened["answers"] = answers
    return shortened


# ----------------------------------------------------------------------------------------- SQuAD metrics


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_squad_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    without_punctuation = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", without_punctuation).split())


def _references(ground_truths: str | Iterable[str]) -> list[str]:
    references = [ground_truths] if isinstance(ground_truths, str) else list(ground_truths)
    # SQuAD v2's convention: a question without answers is answered correctly by an empty answer.
    return references or [""]


def squad_exact_match(prediction: str, ground_truths: str | Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference answer, else 0.0."""
    predicted = normalize_squad_answer(prediction)
    return float(
        any(predicted == normalize_squad_answer(reference) for reference in _references(ground_truths))
    )


def squad_f1(prediction: str, ground_truths: str | Iterable[str]) -> float:
    """The best token-overlap F1 between the normalised prediction and any reference answer (0 to 1)."""
    predicted = normalize_squad_answer(prediction).split()
    return max(
        _token_f1(predicted, normalize_squad_answer(reference).split())
        for reference in _references(ground_truths)
    )


def _token_f1(predicted: list[str], reference: list[str]) -> float:
    if not predicted or not reference:
        return float(predicted == reference)
    overlap = sum((Counter(predicted) & Counter(reference)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(reference)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and F1 over answerable questions; unanswerable ones (no answers) are skipped."""
    if len(predictions) != len(answers):
        raise ValueError(f"squad_scores: {len(predictions)} predictions for {len(answers)} answer lists")
    scored = [(prediction, refs) for prediction, refs in zip(predictions, answers) if len(refs) > 0]
    count = len(scored)
    return {
        "exact_match": sum(squad_exact_match(p, refs) for p, refs in scored) / count
        if count
        else float("nan"),
        "f1": sum(squad_f1(p, refs) for p, refs in scored) / count if count else float("nan"),
        "scored": count,
        "skipped_unanswerable": len(predictions) - count,
    }
