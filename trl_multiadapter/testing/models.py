"""Tiny Llama-architecture models built from a config, matched to ``build_tiny_tokenizer``."""

from __future__ import annotations

from dataclasses import dataclass

from .tokenizer import (
    BENCHMARK_VOCAB_SIZE,
    BOS_TOKEN_ID,
    DEFAULT_VOCAB_SIZE,
    EOS_TOKEN_ID,
    EOT_TOKEN_ID,
    PAD_TOKEN_ID,
)


@dataclass(frozen=True)
class TinyModelSize:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int


MODEL_SIZES = {
    "tiny": TinyModelSize(64, 2, 4, 128, DEFAULT_VOCAB_SIZE),  # ~0.2M parameters, unit tests
    "small": TinyModelSize(384, 10, 6, 1024, BENCHMARK_VOCAB_SIZE),  # ~24M
    "medium": TinyModelSize(512, 14, 8, 1408, BENCHMARK_VOCAB_SIZE),  # ~53M, the benchmark model
}
TASKS = ("causal", "seq_cls")


def tiny_llama_config(size: str = "tiny", vocab_size: int | None = None, num_labels: int = 1):
    """The ``LlamaConfig`` of a named size, with the tiny tokenizer's special token ids."""
    from transformers import LlamaConfig

    if size not in MODEL_SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    spec = MODEL_SIZES[size]
    return LlamaConfig(
        vocab_size=vocab_size or spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=[EOT_TOKEN_ID, EOS_TOKEN_ID],
        pad_token_id=PAD_TOKEN_ID,
        num_labels=num_labels,
        attention_dropout=0.0,
    )


def build_tiny_model(size: str = "tiny", task: str = "causal", seed: int = 0, vocab_size: int | None = None, num_labels: int = 1):
    """A randomly initialised Llama model (float32) of ``size`` for ``task`` ("causal" or "seq_cls").

    The same ``seed`` gives bitwise-identical weights. ``vocab_size`` defaults to the size's
    tokenizer vocabulary (1024 for ``tiny``, 8000 for ``small``/``medium``).
    """
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    config = tiny_llama_config(size, vocab_size=vocab_size, num_labels=num_labels)
    model_class = LlamaForCausalLM if task == "causal" else LlamaForSequenceClassification
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    if task == "causal":  # transformers 5 sequence-classification models have no generation_config
        model.generation_config.pad_token_id = PAD_TOKEN_ID
        model.generation_config.eos_token_id = [EOT_TOKEN_ID, EOS_TOKEN_ID]
        model.generation_config.bos_token_id = BOS_TOKEN_ID
    return model.eval()


def build_tiny_tokenizer_for(size: str = "tiny"):
    """The tiny tokenizer whose vocabulary matches ``build_tiny_model(size)`` (1024 tiny, 8000 small/medium)."""
    from .tokenizer import build_tiny_tokenizer

    if size not in MODEL_SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(MODEL_SIZES)}")
    return build_tiny_tokenizer(MODEL_SIZES[size].vocab_size)
