"""SQuAD (v1.1 / v2.0) questions as prompts: the original nested JSON or the flat hub form, with their
reference ``answers`` kept for evaluation."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from ..registry import register_data_source
from .report import DUPLICATE_ID, DataReport, log_report
from .rows import messages_feature
from .sources import InvalidJson, SourceRow, source_label, source_rows

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
def load_squad_prompts(
    path_or_hub_id: str | os.PathLike = SQUAD_HUB_ID,
    split: str = "train",
    system_prompt: str | None = DEFAULT_SQUAD_SYSTEM_PROMPT,
    data_dir: str | None = None,
    include_context: bool = True,
    return_report: bool = False,
):
    """Load SQuAD (v1.1 or v2.0) questions as prompts: columns ``id``, ``title``, ``context``, ``question``,
    ``answers`` (``{"text": [...], "answer_start": [...]}``, kept for evaluation), ``is_impossible`` and
    ``prompt`` (an optional system message plus a user message with the context and the question).

    Reads the original nested JSON (``version``, ``data[].paragraphs[].qas[]``) and the flat form
    (``id, title, context, question, answers``) from JSON, JSON lines, parquet or the hub, including flat
    records under a top-level ``"data"`` key (``title`` may be missing there). Both forms of the same
    questions give identical prompts. Unanswerable (v2) questions are kept with ``is_impossible=True``.
    ``include_context=False`` leaves the context out of the user message (the question alone).

    An id seen earlier in the split (e.g. ``dev-v1.1.json`` and ``dev-v2.0.json`` listed together) is
    kept and counted as ``duplicate_id`` in the report. Returns the dataset, or ``(dataset, DataReport)``
    with ``return_report=True``; rows in the report are question indices.
    """
    from datasets import Dataset

    label = source_label(path_or_hub_id, data_dir, split)
    report = DataReport(f"load_squad_prompts({label})")
    records = []
    for source_row in source_rows(path_or_hub_id, data_dir, split, "load_squad_prompts"):
        records.extend(_squad_records(source_row))
    if not records:
        raise ValueError(f"load_squad_prompts: no questions in {label}")
    seen_ids: set[str] = set()
    for row, record in enumerate(records):
        report.total += 1
        report.record_kept(row)
        if record["id"] in seen_ids:
            report.record_flagged(row, DUPLICATE_ID)
        seen_ids.add(record["id"])
        context = record["context"] if include_context else None
        record["prompt"] = squad_prompt_messages(context, record["question"], system_prompt)
    log_report(report)
    dataset = Dataset.from_list(records, features=_squad_features())
    return (dataset, report) if return_report else dataset


def _squad_records(source_row: SourceRow) -> list[dict]:
    record = source_row.record
    if isinstance(record, InvalidJson) or not isinstance(record, dict):
        found = record.error if isinstance(record, InvalidJson) else type(record).__name__
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
