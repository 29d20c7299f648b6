"""Offline test harness shared by users and the test-suite: tiny models, tokenizer and data.

Nothing here downloads anything. See ``build_tiny_tokenizer``, ``build_tiny_model``,
``write_tiny_hh_rlhf`` and ``write_tiny_squad``.
"""

from .models import MODEL_SIZES, build_tiny_model, build_tiny_tokenizer_for, tiny_llama_config
from .synthetic import write_tiny_hh_rlhf, write_tiny_squad
from .tokenizer import (
    BENCHMARK_VOCAB_SIZE,
    BOS_TOKEN,
    DEFAULT_VOCAB_SIZE,
    EOS_TOKEN,
    EOT_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    build_tiny_tokenizer,
)

__all__ = [
    "BENCHMARK_VOCAB_SIZE",
    "BOS_TOKEN",
    "DEFAULT_VOCAB_SIZE",
    "EOS_TOKEN",
    "EOT_TOKEN",
    "MODEL_SIZES",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "build_tiny_tokenizer_for",
    "tiny_llama_config",
    "write_tiny_hh_rlhf",
    "write_tiny_squad",
]
