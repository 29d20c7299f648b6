"""Conversations to token ids under a tokenizer's chat template, with exactly one leading BOS."""

from __future__ import annotations


def encode_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` under the tokenizer's chat template, with at most one leading BOS."""
    return encode_chats(tokenizer, [messages], add_generation_prompt)[0]


def encode_chats(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool) -> list[list[int]]:
    """:func:`encode_chat` for a batch of conversations (one template call)."""
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
