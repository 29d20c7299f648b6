"""SQuAD (v1.1 / v2.0) questions as prompts: the original nested JSON or the flat hub form, with their
reference ``answers`` kept for evaluation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from ..registry import register_data_source
from .report import (
    BAD_ANSWER,
    BAD_ROW_POLICIES,
    DUPLICATE_ID,
    MALFORMED_ROW,
    MISSING_FIELD,
    DataReport,
    log_report,
)
from .rows import messages_feature
from .source_check import attach_check, first_rows_problem
from .sources import InvalidJson, SourceRow, reads_split_files, source_label, source_rows

SQUAD_HUB_ID = "rajpurkar/squad"
DEFAULT_SQUAD_SYSTEM_PROMPT = "Answer the question with a short phrase copied from the context."


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
            "prompt": messages_feature(),
        }
    )


@register_data_source("squad")
@reads_split_files
def load_squad_prompts(
    path_or_hub_id: str | os.PathLike = SQUAD_HUB_ID,
    split: str = "train",
    system_prompt: str | None = DEFAULT_SQUAD_SYSTEM_PROMPT,
    data_dir: str | None = None,
    include_context: bool = True,
    return_report: bool = False,
    on_bad_row: str = "skip",
):
    """Load SQuAD (v1.1 or v2.0) questions as prompts: columns ``id``, ``title``, ``context``, ``question``,
    ``answers`` (``{"text": [...], "answer_start": [...]}``, kept for evaluation), ``is_impossible`` and
    ``prompt`` (an optional system message plus a user message with the context and the question).

    Reads the original nested JSON (``version``, ``data[].paragraphs[].qas[]``) and the flat form
    (``id, title, context, question, answers``) from JSON, JSON lines, parquet or the hub, including flat
    records under a top-level ``"data"`` key (``title`` may be missing there). Both forms of the same
    questions give identical prompts. Unanswerable (v2) questions are kept with ``is_impossible=True``.
    ``include_context=False`` leaves the context out of the user message (the question alone).

    A question that cannot be used (``malformed_row``: not an object; ``missing_field``: no ``id``,
    ``question`` or paragraph ``context``, or one of the wrong type; ``bad_answer``: an answer without
    ``text`` or with an ``answer_start`` that is not a number, e.g. null) is counted and skipped with
    ``on_bad_row="skip"``; ``on_bad_row="error"`` raises ``ValueError`` naming the record path
    (``dev.json: row 3.paragraphs[0].qas[2]``). An id seen earlier in the split (e.g. ``dev-v1.1.json`` and
    ``dev-v2.0.json`` listed together) is kept and flagged ``duplicate_id``. Returns the dataset, or
    ``(dataset, DataReport)`` with ``return_report=True``; the report's examples are record paths.
    """
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row={on_bad_row!r}: choose one of {', '.join(BAD_ROW_POLICIES)}")
    from datasets import Dataset

    label = source_label(path_or_hub_id, data_dir, split)
    report = DataReport(f"load_squad_prompts({label})")
    records, seen_ids = [], set()
    for source_row in source_rows(path_or_hub_id, data_dir, split, "load_squad_prompts"):
        for location, outcome in _squad_questions(source_row):
            report.total += 1
            example = _short_location(location)
            if isinstance(outcome, BadRecord):
                if on_bad_row == "error":
                    raise ValueError(
                        f"{location}: {outcome.reason}: {outcome.detail}. Fix the record, or count and skip bad "
                        "records: data.prompts.on_malformed: skip in a recipe (on_bad_row='skip' in Python)"
                    )
                report.record_dropped(example, outcome.reason)
                continue
            report.record_kept(example)
            if outcome["id"] in seen_ids:
                report.record_flagged(example, DUPLICATE_ID)
            seen_ids.add(outcome["id"])
            context = outcome["context"] if include_context else None
            outcome["prompt"] = squad_prompt_messages(context, outcome["question"], system_prompt)
            records.append(outcome)
    log_report(report)
    if not records:
        raise ValueError(f"load_squad_prompts: no usable questions in {label}: {report.summary()}")
    dataset = Dataset.from_list(records, features=_squad_features())
    return (dataset, report) if return_report else dataset


class BadRecord(Exception):
    """Why one SQuAD question cannot be used: ``reason`` is a reason name, ``detail`` says what is wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _short_location(location: str) -> str:
    """``dev.json: row 3.paragraphs[0].qas[2]`` of ``/data/dev.json: row 3.paragraphs[0].qas[2]``."""
    return os.path.basename(location)


def _squad_questions(source_row: SourceRow) -> Iterator[tuple[str, dict | BadRecord]]:
    """``(record path, question record or BadRecord)`` for every question of one source record."""
    record, location = source_row.record, source_row.location
    if isinstance(record, InvalidJson) or not isinstance(record, dict):
        found = f"invalid JSON: {record.error}" if isinstance(record, InvalidJson) else type(record).__name__
        yield location, BadRecord(MALFORMED_ROW, f"not a SQuAD record ({found})")
    elif "paragraphs" in record:
        yield from _nested_questions(record, location)
    else:
        yield location, _parsed(lambda: _flat_squad_record(record))


def _parsed(build) -> dict | BadRecord:
    try:
        return build()
    except BadRecord as bad:
        return bad


def _nested_questions(article: dict, location: str) -> Iterator[tuple[str, dict | BadRecord]]:
    title = article.get("title") or ""
    paragraphs = article["paragraphs"]
    if not isinstance(paragraphs, list):
        yield location, BadRecord(MISSING_FIELD, f"'paragraphs' is a {type(paragraphs).__name__}, expected list")
        return
    for p_index, paragraph in enumerate(paragraphs):
        paragraph_location = f"{location}.paragraphs[{p_index}]"
        qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
        if not isinstance(qas, list):
            yield paragraph_location, BadRecord(MISSING_FIELD, "a paragraph needs a 'qas' list and a 'context'")
            continue
        context = _parsed(lambda paragraph=paragraph: _required(paragraph, "context", str))
        for q_index, qa in enumerate(qas):
            qa_location = f"{paragraph_location}.qas[{q_index}]"
            if isinstance(context, BadRecord):
                yield qa_location, BadRecord(context.reason, f"its paragraph: {context.detail}")
                continue
            yield qa_location, _parsed(lambda qa=qa, context=context: _nested_squad_record(qa, title, context))


def _nested_squad_record(qa: Any, title: str, context: str) -> dict:
    if not isinstance(qa, dict):
        raise BadRecord(MALFORMED_ROW, f"a question is an object, got {type(qa).__name__}")
    raw_answers = qa.get("answers") or []
    if not isinstance(raw_answers, list):
        raise BadRecord(BAD_ANSWER, f"'answers' is a {type(raw_answers).__name__}, expected list")
    return _squad_record(
        id=_required(qa, "id", str),
        title=title,
        context=context,
        question=_required(qa, "question", str),
        answers=_answers_from_list(raw_answers),
        is_impossible=bool(qa.get("is_impossible", False)),
    )


def _flat_squad_record(record: dict) -> dict:
    raw_answers = record.get("answers")
    if isinstance(raw_answers, list):
        answers = _answers_from_list(raw_answers)
    elif raw_answers is None or isinstance(raw_answers, dict):
        answers = _answers_from_columns(raw_answers or {})
    else:
        raise BadRecord(BAD_ANSWER, f"'answers' is a {type(raw_answers).__name__}, expected list or dict")
    return _squad_record(
        id=str(_required(record, "id", (str, int))),
        title=record.get("title") or "",
        context=_required(record, "context", str),
        question=_required(record, "question", str),
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


def _required(record: dict, key: str, kind, reason: str = MISSING_FIELD) -> Any:
    if key not in record or record[key] is None:
        raise BadRecord(reason, f"missing {key!r}; SQuAD records need it (nested: data[].paragraphs[].qas[])")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRecord(reason, f"{key!r} is a {type(value).__name__}, expected {_kind_name(kind)}")
    return value


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(item.__name__ for item in kinds)


def _answers_from_list(answers: list) -> dict[str, list]:
    texts, starts = [], []
    for index, answer in enumerate(answers):
        if not isinstance(answer, dict):
            raise BadRecord(BAD_ANSWER, f"answers[{index}] is a {type(answer).__name__}, expected an object")
        texts.append(_answer_field(answer, "text", str, index))
        starts.append(_answer_field(answer, "answer_start", int, index))
    return {"text": texts, "answer_start": starts}


def _answer_field(answer: dict, key: str, kind, index: int):
    try:
        return _required(answer, key, kind, BAD_ANSWER)
    except BadRecord as bad:
        raise BadRecord(BAD_ANSWER, f"answers[{index}]: {bad.detail}") from None


def _answers_from_columns(answers: dict) -> dict[str, list]:
    texts = list(answers.get("text") or [])
    starts = list(answers.get("answer_start") or [])
    for index, (text, start) in enumerate(zip(texts, starts)):
        _answer_field({"text": text, "answer_start": start}, "text", str, index)
        _answer_field({"text": text, "answer_start": start}, "answer_start", int, index)
    if len(texts) != len(starts):
        raise BadRecord(BAD_ANSWER, f"answers has {len(texts)} texts but {len(starts)} answer_start values; "
                                    f"they must pair up")
    return {"text": texts, "answer_start": [int(start) for start in starts]}


def _first_rows_problem(rows) -> str | None:
    return first_rows_problem(
        rows, lambda record: "paragraphs" in record or ("question" in record and "context" in record),
        "SQuAD records (nested data[].paragraphs[].qas[], or flat id / context / question / answers)",
    )


attach_check(load_squad_prompts, _first_rows_problem,
             "point the path at SQuAD data: the original nested JSON or flat records with context and question")
