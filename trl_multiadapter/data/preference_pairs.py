"""Preference pairs fitted into ``trl.RewardTrainer``'s ``max_length``: earliest exchanges go first."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .chat import encode_chats
from .report import FINAL_TURN_TOO_LONG, DataReport, log_report
from .rows import ENCODE_BATCH_SIZE, batched, check_columns, check_length, dataset_from_rows

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset


def preference_pair_length(tokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> int:
    """Tokens of the longer of ``prompt + chosen`` and ``prompt + rejected`` under the chat template: the
    length ``trl.RewardTrainer`` compares with ``max_length``."""
    return max(len(ids) for ids in encode_chats(tokenizer, [prompt + chosen, prompt + rejected], False))


def prepare_preference_pairs(dataset: Dataset, tokenizer, max_length: int) -> tuple[Dataset, DataReport]:
    """Fit every preference pair into ``max_length`` tokens (chat template applied), counting what changed.

    ``trl.RewardTrainer`` silently filters out pairs longer than its ``max_length``. Here an over-long pair
    loses its earliest prompt turns, whole user/assistant exchanges at a time (a leading system message
    stays), until it fits; the final user turn and the differing answers are always kept. Only a pair
    whose final exchange alone is too long is dropped (reason ``final_turn_too_long``).
    """
    step = "prepare_preference_pairs"
    check_columns(dataset, ("prompt", "chosen", "rejected"), step)
    check_length(max_length, "max_length", step)
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
    log_report(report)
    return dataset_from_rows(kept_rows, dataset.features), report


def _pair_lengths(tokenizer, rows: list[dict]) -> list[int]:
    lengths = []
    for batch in batched(rows, ENCODE_BATCH_SIZE):
        chosen = encode_chats(tokenizer, [row["prompt"] + row["chosen"] for row in batch], False)
        rejected = encode_chats(tokenizer, [row["prompt"] + row["rejected"] for row in batch], False)
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
