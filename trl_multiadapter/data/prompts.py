"""SQuAD prompts encoded for generation (chat template + assistant header); over-long ones dropped or
their context cut to whole sentences around the answer."""

from __future__ import annotations

import bisect
import re
from typing import TYPE_CHECKING

from .chat import encode_chat, encode_chats
from .report import PROMPT_TOO_LONG, DataReport, log_report
from .rows import ENCODE_BATCH_SIZE, batched, check_columns, check_length, dataset_from_rows
from .squad import format_squad_question

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset

LONG_PROMPT_POLICIES = ("drop", "cut_context")


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
    check_columns(dataset, ("prompt",), step)
    check_length(max_prompt_length, "max_prompt_length", step)
    if long_prompts not in LONG_PROMPT_POLICIES:
        raise ValueError(
            f"{step}: long_prompts={long_prompts!r}: choose one of {', '.join(LONG_PROMPT_POLICIES)}"
        )
    if long_prompts == "cut_context":
        check_columns(dataset, ("context", "question"), f"{step}(long_prompts='cut_context')")
    from datasets import List, Value

    rows = dataset.to_list()
    report = DataReport(f"{step}(max_prompt_length={max_prompt_length})", total=len(rows))
    encoded = []
    for batch in batched(rows, ENCODE_BATCH_SIZE):
        encoded.extend(encode_chats(tokenizer, [row["prompt"] for row in batch], True))
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
    log_report(report)
    features = dataset.features.copy()
    features["input_ids"] = List(Value("int32"))
    return dataset_from_rows(kept_rows, features), report


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
