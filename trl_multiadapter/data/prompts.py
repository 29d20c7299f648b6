"""SQuAD prompts encoded for generation (chat template + assistant header); over-long ones dropped or
their context cut to whole sentences around every reference answer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .chat import encode_chat, encode_chats
from .context_window import answer_sentences, sentence_spans
from .report import ANSWER_CUT, PROMPT_TOO_LONG, DataReport, log_report
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
    ``long_prompts="cut_context"`` on SQuAD prompts, the context is cut to the widest run of whole
    sentences that holds every reference answer (by ``answer_start``) and fits, growing earlier text
    first (counted as shortened; ``context`` and ``answer_start`` follow the cut, every answer is kept).
    A prompt whose answers cannot all be kept is dropped as ``answer_cut``, one that cannot fit at all as
    ``prompt_too_long``. Every other column (``id``, ``answers``, ...) is kept.
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
        if long_prompts != "cut_context":
            report.record_dropped(index, PROMPT_TOO_LONG)
            continue
        shortened, reason = _cut_context(tokenizer, row, max_prompt_length)
        if shortened is None:
            report.record_dropped(index, reason)
            continue
        report.record_kept(index, shortened=True)
        kept_rows.append(shortened)
    log_report(report)
    features = dataset.features.copy()
    features["input_ids"] = List(Value("int32"))
    return dataset_from_rows(kept_rows, features), report


def _cut_context(tokenizer, row: dict, max_prompt_length: int) -> tuple[dict | None, str]:
    """``(row with the widest window of whole sentences that holds every answer and fits, "")``, or
    ``(None, reason)``."""
    context = row["context"]
    spans = sentence_spans(context)
    if not spans or row["prompt"][-1]["content"] != format_squad_question(context, row["question"]):
        return None, PROMPT_TOO_LONG  # the user message does not hold this context: cutting cannot help
    answers = row.get("answers") or {"text": [], "answer_start": []}
    needed = answer_sentences(spans, answers["text"], answers["answer_start"]) or (0, 0)

    def encode(first: int, last: int) -> dict:
        return _row_with_context(tokenizer, row, spans[first][0], spans[last][1])

    best = encode(*needed)
    if len(best["input_ids"]) > max_prompt_length:
        # Answers in sentences too far apart to fit together; a window without some of them would fit.
        one_sentence = needed[0] != needed[1] and len(encode(needed[0], needed[0])["input_ids"]) <= max_prompt_length
        return None, ANSWER_CUT if one_sentence else PROMPT_TOO_LONG
    first, last = needed
    grown = True
    while grown:
        grown = False
        for candidate in ((first - 1, last), (first, last + 1)):  # prefer keeping earlier text
            if 0 <= candidate[0] and candidate[1] < len(spans):
                attempt = encode(*candidate)
                if len(attempt["input_ids"]) <= max_prompt_length:
                    first, last, best, grown = candidate[0], candidate[1], attempt, True
                    break
    return best, ""


def _row_with_context(tokenizer, row: dict, window_start: int, window_end: int) -> dict:
    context = row["context"][window_start:window_end]
    prompt = [
        *row["prompt"][:-1],
        {"role": "user", "content": format_squad_question(context, row["question"])},
    ]
    shortened = {**row, "context": context, "prompt": prompt, "input_ids": encode_chat(tokenizer, prompt, True)}
    answers = row.get("answers")
    if answers is not None:  # the window holds every answer: only the offsets move
        shortened["answers"] = {
            "text": list(answers["text"]),
            "answer_start": [start - window_start for start in answers["answer_start"]],
        }
    return shortened
