"""Preference data (Anthropic hh-rlhf) and prompt data (SQuAD): loading, parsing, chat-template encoding.

This package knows nothing about PPO. It turns

* hh-rlhf transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) into TRL's conversational preference
  format: ``prompt`` (the shared turns), ``chosen`` / ``rejected`` (one assistant message each);
* SQuAD questions (original nested JSON or the flat hub form) into ``prompt`` messages that keep their
  reference ``answers`` for evaluation;

and shortens or encodes them for a tokenizer's chat template. Every row that is dropped or shortened is
counted in a :class:`DataReport`; nothing is dropped silently.

Modules (one job each): ``sources`` (hub ids, local files, folders of split files, file lists; what a
file really is), ``source_check`` (the quick look before any work), ``hh_rlhf``, ``squad``, ``chat``
(chat-template encoding), ``preference_pairs`` and ``prompts`` (fitting into a token budget),
``context_window`` (SQuAD sentences and the window that holds every answer), ``splits`` (the seeded
held-out carve, no eval row that train has), ``squad_metrics`` (EM / F1 as the official v1.1 and v2.0
scripts), ``report`` (``DataReport``, reason names, the drop limit), ``rows`` (dataset helpers).
See docs/data.md.

Heavy libraries (``datasets``, ``pyarrow``) are imported inside the functions: the plugin registry imports
this package to list the built-in data sources before torch is loaded.
"""

from .chat import encode_chat
from .context_window import answer_sentences, sentence_spans
from .hh_rlhf import (
    HH_RLHF_HUB_ID,
    TranscriptError,
    check_hh_roles,
    hh_pair_to_preference,
    load_hh_rlhf,
    merge_consecutive_turns,
    parse_hh_transcript,
)
from .preference_pairs import preference_pair_length, prepare_preference_pairs
from .prompts import LONG_PROMPT_POLICIES, prepare_prompts
from .report import (
    ANSWER_CUT,
    BAD_ANSWER,
    BAD_ROW_POLICIES,
    DUPLICATE_ID,
    FINAL_TURN_TOO_LONG,
    IDENTICAL_RESPONSES,
    MALFORMED_ROW,
    MERGED_TURNS,
    MISSING_FIELD,
    NO_ASSISTANT_TURN,
    NON_STRING_FIELD,
    PROMPT_TOO_LONG,
    PROMPTS_DIFFER,
    ROLES_OUT_OF_ORDER,
    TEXT_BEFORE_FIRST_TURN,
    DataReport,
    TooManyDroppedError,
    check_drop_fraction,
)
from .source_check import check_split
from .sources import (
    SPLIT_ALIASES,
    DataSourceError,
    DataSourceNotFoundError,
    SplitSource,
    find_split,
    inspect_file,
)
from .splits import (
    CARVED,
    EVAL_SPLIT,
    NO_HELD_OUT,
    HeldOutReport,
    carve_held_out,
    carve_reason,
    content_keys,
    drop_train_overlap,
)
from .squad import (
    DEFAULT_SQUAD_SYSTEM_PROMPT,
    SQUAD_HUB_ID,
    format_squad_question,
    load_squad_prompts,
    squad_prompt_messages,
)
from .squad_metrics import (
    SQUAD_VERSIONS,
    normalize_squad_answer,
    squad_coverage,
    squad_exact_match,
    squad_f1,
    squad_scores,
)

__all__ = [
    "ANSWER_CUT",
    "BAD_ANSWER",
    "BAD_ROW_POLICIES",
    "CARVED",
    "DEFAULT_SQUAD_SYSTEM_PROMPT",
    "DUPLICATE_ID",
    "EVAL_SPLIT",
    "FINAL_TURN_TOO_LONG",
    "HH_RLHF_HUB_ID",
    "IDENTICAL_RESPONSES",
    "LONG_PROMPT_POLICIES",
    "MALFORMED_ROW",
    "MERGED_TURNS",
    "MISSING_FIELD",
    "NO_HELD_OUT",
    "NON_STRING_FIELD",
    "NO_ASSISTANT_TURN",
    "PROMPTS_DIFFER",
    "PROMPT_TOO_LONG",
    "ROLES_OUT_OF_ORDER",
    "SPLIT_ALIASES",
    "SQUAD_HUB_ID",
    "SQUAD_VERSIONS",
    "TEXT_BEFORE_FIRST_TURN",
    "DataReport",
    "DataSourceError",
    "DataSourceNotFoundError",
    "HeldOutReport",
    "SplitSource",
    "TooManyDroppedError",
    "TranscriptError",
    "answer_sentences",
    "carve_held_out",
    "carve_reason",
    "check_drop_fraction",
    "check_hh_roles",
    "check_split",
    "content_keys",
    "drop_train_overlap",
    "encode_chat",
    "find_split",
    "format_squad_question",
    "hh_pair_to_preference",
    "inspect_file",
    "load_hh_rlhf",
    "load_squad_prompts",
    "merge_consecutive_turns",
    "normalize_squad_answer",
    "parse_hh_transcript",
    "preference_pair_length",
    "prepare_preference_pairs",
    "prepare_prompts",
    "sentence_spans",
    "squad_coverage",
    "squad_exact_match",
    "squad_f1",
    "squad_prompt_messages",
    "squad_scores",
]
