"""The offline harness: tiny tokenizer (Llama-3 tokens and chat template) and tiny Llama models."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_multiadapter.testing import build_tiny_model, build_tiny_tokenizer, tiny_llama_config
from trl_multiadapter.testing import tokenizer as tokenizer_module

# The Llama-3 special tokens and the ids the harness promises (written out here, not imported).
EXPECTED_SPECIAL_IDS = {
    "<|begin_of_text|>": 0,
    "<|end_of_text|>": 1,
    "<|start_header_id|>": 2,
    "<|end_header_id|>": 3,
    "<|eot_id|>": 4,
    "<|finetune_right_pad_id|>": 5,
}
CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "Where is the old lantern?"},
    {"role": "assistant", "content": "It is in the quiet harbor."},
]
# Llama-3.1's layout, written by hand: BOS, a system header whose body starts with the knowledge
# cutoff and the template's default date, then one header + body + <|eot_id|> per message.
EXPECTED_RENDERED = (
    "<|begin_of_text|>"
    "<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n"
    "You answer in one short sentence.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n"
    "Where is the old lantern?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
    "It is in the quiet harbor.<|eot_id|>"
)
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("vocab_size", [1024, 8000])
def test_special_tokens_have_the_promised_ids(vocab_size, tiny_tokenizer):
    tokenizer = tiny_tokenizer if vocab_size == 1024 else build_tiny_tokenizer(vocab_size)
    assert len(tokenizer) == vocab_size
    for token, token_id in EXPECTED_SPECIAL_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 4, 5)
    assert tokenizer.padding_side == "left"


def test_chat_template_renders_llama31_layout(tiny_tokenizer):
    assert tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED_RENDERED


def test_generation_prompt_ends_with_the_assistant_header(tiny_tokenizer):
    prompt = tiny_tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    expected = EXPECTED_RENDERED[: EXPECTED_RENDERED.index(ASSISTANT_HEADER)] + ASSISTANT_HEADER
    assert prompt == expected
    assert prompt.endswith(ASSISTANT_HEADER)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_tokenized_chat_has_exactly_one_bos_at_position_0(tiny_tokenizer, add_generation_prompt):
    messages = CONVERSATION[:2] if add_generation_prompt else CONVERSATION
    ids = tiny_tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    assert ids[0] == EXPECTED_SPECIAL_IDS["<|begin_of_text|>"]
    assert ids.count(EXPECTED_SPECIAL_IDS["<|begin_of_text|>"]) == 1
    # Byte-level BPE is lossless: decoding the ids gives back the rendered text exactly.
    rendered = tiny_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert tiny_tokenizer.decode(ids) == rendered
    # The headers are single special tokens, not spelled out in pieces.
    n_messages = len(messages) + int(add_generation_prompt)
    assert ids.count(EXPECTED_SPECIAL_IDS["<|start_header_id|>"]) == n_messages
    assert ids.count(EXPECTED_SPECIAL_IDS["<|eot_id|>"]) == len(messages)


def test_plain_encoding_prepends_one_bos(tiny_tokenizer):
    ids = tiny_tokenizer("Human: hello\n\nAssistant: hi").input_ids
    assert ids[0] == 0 and ids.count(0) == 1
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "Human: hello\n\nAssistant: hi"


def test_pad_token_is_not_a_stop_token(tiny_tokenizer):
    model = build_tiny_model("tiny")
    stop_ids = {
        tiny_tokenizer.eos_token_id,
        tiny_tokenizer.convert_tokens_to_ids("<|eot_id|>"),
        tiny_tokenizer.convert_tokens_to_ids("<|end_of_text|>"),
        *model.generation_config.eos_token_id,
        *model.config.eos_token_id,
    }
    assert stop_ids == {EXPECTED_SPECIAL_IDS["<|eot_id|>"], EXPECTED_SPECIAL_IDS["<|end_of_text|>"]}
    for pad_id in (tiny_tokenizer.pad_token_id, model.config.pad_token_id, model.generation_config.pad_token_id):
        assert pad_id == EXPECTED_SPECIAL_IDS["<|finetune_right_pad_id|>"]
        assert pad_id not in stop_ids


def _vocab_fingerprint(tokenizer_json: str) -> str:
    model = json.loads(tokenizer_json)["model"]
    payload = json.dumps([sorted(model["vocab"].items()), model["merges"]])
    return hashlib.sha256(payload.encode()).hexdigest()


def test_tokenizer_build_is_deterministic_and_fast(record_property):
    train = tokenizer_module._tokenizer_json.__wrapped__  # bypass the in-process cache
    timings = {}
    fingerprints = {}
    for vocab_size in (1024, 8000):
        start = time.perf_counter()
        first = train(vocab_size)
        timings[vocab_size] = time.perf_counter() - start
        fingerprints[vocab_size] = _vocab_fingerprint(first)
        assert _vocab_fingerprint(train(vocab_size)) == fingerprints[vocab_size]
    record_property("tokenizer_train_seconds", timings)
    print(f"tokenizer training: vocab 1024 {timings[1024]:.2f}s, vocab 8000 {timings[8000]:.2f}s")

    # Another process with another hash seed must train the very same vocabulary and merges.
    code = (
        "from trl_multiadapter.testing import tokenizer as t\n"
        "import json, hashlib\n"
        "m = json.loads(t._tokenizer_json(1024))['model']\n"
        "p = json.dumps([sorted(m['vocab'].items()), m['merges']])\n"
        "print(hashlib.sha256(p.encode()).hexdigest())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == fingerprints[1024]


def test_tokenizer_save_load_round_trip(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["Where is the bright meadow?", "Gladly! 3 kettles; 12 bicycles.\n\nThanks", "zzqx  spaced  out"]
    for text in texts:
        assert loaded(text).input_ids == tiny_tokenizer(text).input_ids
    chat_kwargs = {"tokenize": True, "return_dict": False, "add_generation_prompt": True}
    assert loaded.apply_chat_template(CONVERSATION[:2], **chat_kwargs) == tiny_tokenizer.apply_chat_template(
        CONVERSATION[:2], **chat_kwargs
    )
    assert loaded.get_vocab() == tiny_tokenizer.get_vocab()
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 4, 5)
    assert loaded.padding_side == "left"
    assert loaded.chat_template == tiny_tokenizer.chat_template


# ---------------------------------------------------------------- models


def _llama_parameter_count(config, task: str) -> int:
    """Parameters of a Llama decoder from its architecture (no biases, untied embeddings)."""
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    attention = hidden * hidden + 2 * hidden * kv + hidden * hidden  # q, k, v, o projections
    mlp = 3 * hidden * inter  # gate, up, down
    norms = 2 * hidden  # input and post-attention RMSNorm weights
    decoder = vocab * hidden + config.num_hidden_layers * (attention + mlp + norms) + hidden  # + final norm
    head = vocab * hidden if task == "causal" else hidden * config.num_labels
    return decoder + head


@pytest.mark.parametrize(
    ("size", "low", "high"),
    [("tiny", 1, 1_000_000), ("small", 22_000_000, 26_000_000), ("medium", 50_000_000, 56_000_000)],
)
@pytest.mark.parametrize("task", ["causal", "seq_cls"])
def test_model_sizes_match_the_architecture_formula(size, low, high, task):
    context = torch.device("meta") if size != "tiny" else torch.device("cpu")  # meta: count without init
    with context:
        model = build_tiny_model(size, task=task)
    count = sum(p.numel() for p in model.parameters())
    assert count == _llama_parameter_count(model.config, task)
    if task == "causal":
        assert low <= count <= high, f"{size}: {count / 1e6:.2f}M parameters"


def test_same_seed_same_weights_other_seed_other_weights():
    first, again, other = (build_tiny_model("tiny", seed=s) for s in (0, 0, 1))
    first_state, again_state, other_state = (m.state_dict() for m in (first, again, other))
    for name, tensor in first_state.items():
        assert torch.equal(tensor, again_state[name]), name
        if "norm" not in name:  # RMSNorm weights start at 1 whatever the seed
            assert not torch.equal(tensor, other_state[name]), name


def test_builder_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model("tiny", seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("task", ["causal", "seq_cls"])
def test_model_save_load_round_trip_is_bitwise(tmp_path, tiny_tokenizer, task):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model = build_tiny_model("tiny", task=task, seed=3)
    model.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM if task == "causal" else AutoModelForSequenceClassification
    loaded = auto.from_pretrained(tmp_path).eval()
    batch = tiny_tokenizer(["Where is the river?", "Hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    for (name, tensor), (loaded_name, loaded_tensor) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert name == loaded_name and torch.equal(tensor, loaded_tensor), name
    if task == "causal":
        assert loaded.generation_config.eos_token_id == [4, 1]
        assert loaded.generation_config.pad_token_id == 5


def test_config_carries_the_tokenizer_special_ids():
    config = tiny_llama_config("tiny")
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, [4, 1], 5)
    assert config.vocab_size == len(build_tiny_tokenizer())
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        tiny_llama_config("huge")
    with pytest.raises(ValueError, match="unknown task 'lm'"):
        build_tiny_model("tiny", task="lm")


# ---------------------------------------------------------------- sequence classification head


@pytest.fixture(scope="module")
def seq_cls_model():
    return build_tiny_model("tiny", task="seq_cls", seed=5)


def _pad(sequences: list[list[int]], side: str, pad_id: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad by hand so the test does not depend on the tokenizer's padding logic."""
    width = max(len(s) for s in sequences)
    ids, mask = [], []
    for s in sequences:
        fill = [pad_id] * (width - len(s))
        ids.append(fill + s if side == "left" else s + fill)
        mask.append([0] * len(fill) + [1] * len(s) if side == "left" else [1] * len(s) + [0] * len(fill))
    return torch.tensor(ids), torch.tensor(mask)


def _last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last 1 in the mask, for either padding side."""
    positions = torch.arange(attention_mask.shape[1]).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values


def _per_position_scores(model, input_ids, attention_mask) -> torch.Tensor:
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return model.score(hidden)  # (B, T, num_labels)


def _sequences(tokenizer, texts):
    return [tokenizer(text).input_ids for text in texts]


TEXTS = ["Gladly, the kettle is in the bakery.", "Nope.", "Where is the quiet harbor near the old tower?"]


def test_seq_cls_model_has_one_label(seq_cls_model):
    assert seq_cls_model.num_labels == 1 and seq_cls_model.config.num_labels == 1
    assert seq_cls_model.score.weight.shape == (1, seq_cls_model.config.hidden_size)
    assert seq_cls_model.score.bias is None


@pytest.mark.parametrize("side", ["left", "right"])
def test_seq_cls_pools_the_last_non_pad_token(seq_cls_model, tiny_tokenizer, side):
    input_ids, attention_mask = _pad(_sequences(tiny_tokenizer, TEXTS), side)
    with torch.no_grad():
        pooled = seq_cls_model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, 1)
        per_position = _per_position_scores(seq_cls_model, input_ids, attention_mask)
    last = _last_real_index(attention_mask)
    expected_last = (
        torch.full((len(TEXTS),), input_ids.shape[1] - 1) if side == "left" else attention_mask.sum(1) - 1
    )
    assert torch.equal(last, expected_last)
    assert torch.equal(pooled, per_position[torch.arange(len(TEXTS)), last])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_scores_equal_unpadded_scores(seq_cls_model, tiny_tokenizer, side):
    # RoPE depends only on relative positions, so left padding without position ids from the mask
    # shifts every position equally and changes nothing beyond rounding.
    sequences = _sequences(tiny_tokenizer, TEXTS)
    input_ids, attention_mask = _pad(sequences, side)
    with torch.no_grad():
        pooled = seq_cls_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        alone = torch.stack([seq_cls_model(input_ids=torch.tensor([s])).logits[0, 0] for s in sequences])
    torch.testing.assert_close(pooled, alone, rtol=0, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=4),
    side=st.sampled_from(["left", "right"]),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_pooled_index_property(seq_cls_model, lengths, side, seed):
    generator = torch.Generator().manual_seed(seed)
    # Real tokens avoid the pad id (5); transformers finds the last real token by comparing to it.
    sequences = [(torch.randint(6, 1024, (n,), generator=generator)).tolist() for n in lengths]
    input_ids, attention_mask = _pad(sequences, side)
    with torch.no_grad():
        pooled = seq_cls_model(input_ids=input_ids, attention_mask=attention_mask).logits
        per_position = _per_position_scores(seq_cls_model, input_ids, attention_mask)
    assert torch.equal(pooled, per_position[torch.arange(len(lengths)), _last_real_index(attention_mask)])


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_equal_to_eos_makes_transformers_read_the_wrong_token(tiny_tokenizer, side):
    """Why the harness keeps pad != eos: transformers locates the last token by ``input_ids != pad``.

    With pad == <|eot_id|> (a common setup), a response that ends in <|eot_id|> is scored at the
    token before it, on either padding side. MultiAdapterModel reads the index from the attention
    mask instead (the ``_last_real_index`` rule above).
    """
    eot = EXPECTED_SPECIAL_IDS["<|eot_id|>"]
    model = build_tiny_model("tiny", task="seq_cls", seed=5)
    model.config.pad_token_id = eot
    sequences = [s + [eot] for s in _sequences(tiny_tokenizer, TEXTS)]
    input_ids, attention_mask = _pad(sequences, side, pad_id=eot)
    with torch.no_grad():
        pooled = model(input_ids=input_ids, attention_mask=attention_mask).logits
        per_position = _per_position_scores(model, input_ids, attention_mask)
    rows = torch.arange(len(TEXTS))
    last = _last_real_index(attention_mask)
    assert torch.equal(pooled, per_position[rows, last - 1])  # the token before <|eot_id|>
    assert not torch.equal(pooled, per_position[rows, last])


@pytest.mark.parametrize("size", ["tiny", "small", "medium"])
def test_tokenizer_for_a_size_covers_exactly_that_models_vocabulary(size):
    from trl_multiadapter.testing import build_tiny_tokenizer_for, tiny_llama_config

    tokenizer = build_tiny_tokenizer_for(size)
    vocab_size = tiny_llama_config(size).vocab_size
    assert len(tokenizer) == vocab_size
    assert max(tokenizer.get_vocab().values()) == vocab_size - 1
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        build_tiny_tokenizer_for("huge")


@pytest.mark.parametrize("answer", ["Feed it flour, thank you.", "no", "Line one.\n\nLine two", " leading space"])
def test_generation_prompt_plus_answer_tokens_equal_the_rendered_conversation(answer):
    """As with the real Llama-3 tokenizer: PPO's prompt ids + response ids are exactly the ids the reward
    adapter was trained on (the conversation rendered by the template and tokenized whole)."""
    tokenizer = build_tiny_tokenizer()
    question = [{"role": "user", "content": "What should I do?"}]
    prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=True, return_dict=False)
    text = tokenizer.apply_chat_template(question + [{"role": "assistant", "content": answer}], tokenize=False)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    content = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]  # the template strips content
    assert whole == list(prompt) + content + [tokenizer.convert_tokens_to_ids("<|eot_id|>")]
