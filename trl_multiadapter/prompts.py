"""Prompt datasets for the PPO trainer: column checks, row selection and encoding to token ids.

A dataset has a ``prompt`` column (plain text, or a list of chat messages that the chat template
renders with the assistant header, so generation starts an answer) or an ``input_ids`` column
(already encoded). Other columns travel along to reward functions.
"""

from __future__ import annotations

from collections.abc import Sequence


def check_prompt_columns(dataset, name: str) -> None:
    if dataset is None:
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None and len(dataset) > 0 and isinstance(dataset[0], dict):
        columns = list(dataset[0])
    if columns is not None and "prompt" not in columns and "input_ids" not in columns:
        raise ValueError(
            f"{name} has columns {list(columns)}; it needs a `prompt` column (a string or a list of chat messages) "
            "or an `input_ids` column (encoded prompts)"
        )


def select_columns(dataset, rows: Sequence[int]) -> dict[str, list]:
    """Rows of a dataset (or a list of dicts) as a dict of columns."""
    records = [dataset[int(row)] for row in rows]
    return {key: [record[key] for record in records] for key in records[0]}


def encode_prompts(tokenizer, columns: dict[str, list]) -> list[list[int]]:
    if "input_ids" in columns:
        return [list(map(int, ids)) for ids in columns["input_ids"]]
    return [encode_prompt(tokenizer, prompt, row) for row, prompt in enumerate(columns["prompt"])]


def encode_prompt(tokenizer, prompt, row: int = 0) -> list[int]:
    if isinstance(prompt, str):
        # A plain-text prompt gets the tokenizer's special tokens (BOS) unless it already starts with them.
        has_bos = tokenizer.bos_token is not None and prompt.startswith(tokenizer.bos_token)
        return tokenizer(prompt, add_special_tokens=not has_bos)["input_ids"]
    if is_conversational(prompt):
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))
    raise TypeError(
        f"prompt of row {row} is a {type(prompt).__name__}; use a string or a list of chat messages "
        "({'role': ..., 'content': ...})"
    )


def pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id  # only a filler: masks, not pad ids, decide what is padding
    raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")


def is_conversational(prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(message, dict) and "role" in message for message in prompt)
