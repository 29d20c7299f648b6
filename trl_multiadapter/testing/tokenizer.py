"""A tiny byte-level BPE tokenizer with Llama-3 special tokens and chat template, built offline."""

from __future__ import annotations

import random
from functools import lru_cache

from . import words

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
PAD_TOKEN = "<|finetune_right_pad_id|>"  # Llama-3.1's own pad token: distinct from every stop token

# Order fixes the ids (0..5) for every vocabulary size, so model configs can name them without a tokenizer.
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN, PAD_TOKEN)
SPECIAL_TOKEN_IDS = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
BOS_TOKEN_ID = SPECIAL_TOKEN_IDS[BOS_TOKEN]
EOS_TOKEN_ID = SPECIAL_TOKEN_IDS[EOS_TOKEN]
EOT_TOKEN_ID = SPECIAL_TOKEN_IDS[EOT_TOKEN]
PAD_TOKEN_ID = SPECIAL_TOKEN_IDS[PAD_TOKEN]

# Llama-3's pre-tokenizer split: newlines form their own pieces ("\n\n" before a word stays one piece),
# so a generation prompt ending in "<|end_header_id|>\n\n" plus answer tokens equals the tokenization of
# the whole rendered conversation, as with the real Llama-3 tokenizer (GPT-2's split would cut "\n\n"
# differently in the two and put the reward's training sequences out of step with PPO's).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

DEFAULT_VOCAB_SIZE = 1024
BENCHMARK_VOCAB_SIZE = 8000
_CORPUS_SEED = 1234


def _training_corpus(vocab_size: int) -> list[str]:
    """Deterministic lines of project-written text; more made-up words for larger vocabularies."""
    rng = random.Random(_CORPUS_SEED)
    known = (
        words.HELPFUL_WORDS + words.DISMISSIVE_WORDS + words.TOPICS + words.VERBS + words.ADJECTIVES
        + words.NAMES + words.FILLER
    )
    invented = words.made_up_words(rng, max(200, vocab_size))
    lines = [
        "Human: Assistant: system user assistant Context: Question: Answer: Cutting Knowledge Date: "
        "December 2023 Today Date: 26 Jul 2024 0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' \" ( ) - \n\n"
    ]
    for _ in range(2000 + 3 * vocab_size // 4):
        pool = known if rng.random() < 0.6 else invented
        sentence = " ".join(rng.choice(pool) for _ in range(rng.randint(4, 12)))
        lines.append(sentence.capitalize() + rng.choice((".", "?", "!", ".\n\n")))
    return lines


@lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(vocab_size), trainer=trainer)
    # Like Llama-3: BOS is prepended by the post-processor; the chat template writes its own BOS
    # and apply_chat_template encodes without special tokens, so chat prompts carry exactly one.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, BOS_TOKEN_ID)],
    )
    return tokenizer.to_str()


def build_tiny_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Return a fresh ``PreTrainedTokenizerFast`` trained in-process on project-written text.

    Byte-level BPE with Llama-3 special tokens (ids 0-5 for every ``vocab_size``), pad token
    ``<|finetune_right_pad_id|>`` (not a stop token), EOS ``<|eot_id|>`` as in Llama-3.1-Instruct,
    and TRL's copy of the real Llama-3.1 chat template. Deterministic: the same ``vocab_size`` always
    gives the same vocabulary.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    from trl.chat_template_utils import llama3_1_chat_template

    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least 300 (256 bytes + specials).")
    backend = Tokenizer.from_str(_tokenizer_json(vocab_size))
    if backend.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer trainer reached {backend.get_vocab_size()} tokens, expected {vocab_size}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOT_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[EOS_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN],
        padding_side="left",
        model_max_length=4096,
    )
    tokenizer.chat_template = llama3_1_chat_template
    return tokenizer
