"""The one sampler (rollout.sample_rollout) in every role, sampled and greedy, and the stop-id resolver.

Independent references: plain transformers models without peft or KV cache (the bare base, and the
base with an adapter merged by peft), decoded by loops written here with full forwards at every step.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from trl_multiadapter import ppo_math
from trl_multiadapter.model import MultiAdapterModel
from trl_multiadapter.rollout import SamplingSettings, left_pad, sample_rollout, stop_token_ids
from trl_multiadapter.testing import build_tiny_model

PAD_ID = 5
EOT_ID, EOS_ID = 4, 1  # <|eot_id|>, <|end_of_text|> of the tiny tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, write_random_policy_adapter):
    return write_random_policy_adapter(tmp_path_factory.mktemp("policy") / "adapter", seed=3)


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    texts = ("A short one.", "A much longer prompt than the other one here.", "Middle sized prompt.")
    return [tiny_tokenizer(text)["input_ids"] for text in texts]


def merged(adapter_dir):
    return PeftModel.from_pretrained(build_tiny_model("tiny"), str(adapter_dir)).merge_and_unload().eval()


def plain_greedy(causal_lm, prompt: list[int], steps: int) -> list[int]:
    """Argmax decoding with a full forward over the whole unpadded sequence at every step (no cache)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(causal_lm(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def plain_sampling(causal_lm, prompts: list[list[int]], steps: int, temperature: float, seed: int):
    """Batched multinomial sampling from softmax(logits / T), full forward per step over the left-padded
    batch with positions cumsum(mask) - 1: (tokens (B, steps), logprobs (B, steps) float64)."""
    ids, mask = left_pad(prompts, PAD_ID)
    torch.manual_seed(seed)
    tokens, logprobs = [], []
    with torch.no_grad():
        for _ in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = causal_lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
            token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), num_samples=1).squeeze(1)
            logprobs.append(torch.log_softmax(logits.double() / temperature, -1).gather(-1, token[:, None])[:, 0])
            tokens.append(token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(token[:, None])], dim=1)
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)


# --------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.5, 3, 0.8)])
def test_greedy_equals_argmax_of_a_plain_forward_loop(policy_dir, prompts, temperature, top_k, top_p):
    """do_sample=False is the argmax of the raw logits whatever temperature/top-k/top-p say; logprobs
    are those of softmax(logits / T) at the chosen tokens."""
    model = MultiAdapterModel.from_pretrained(build_tiny_model("tiny"), policy_adapter=str(policy_dir))
    query_ids, query_mask = left_pad(prompts, PAD_ID)
    settings = SamplingSettings(max_new_tokens=6, temperature=temperature, top_k=top_k, top_p=top_p,
                                pad_token_id=PAD_ID, do_sample=False)
    rollout = sample_rollout(model, query_ids, query_mask, settings)
    reference = merged(policy_dir)
    for row, prompt in enumerate(prompts):
        expected = plain_greedy(reference, prompt, 6)
        assert rollout.response_ids[row].tolist() == expected
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([prompt + expected])).logits[0, len(prompt) - 1:-1]
        expected_logprobs = torch.log_softmax(logits.double() / temperature, -1).gather(
            -1, torch.tensor(expected)[:, None])[:, 0]
        torch.testing.assert_close(rollout.logprobs[row].double(), expected_logprobs, atol=1e-5, rtol=0)


def test_greedy_stops_at_the_first_stop_token(policy_dir, prompts):
    """With the greedy tokens' own ids as stop ids, each row ends at the first of them (mask and padding)."""
    model = MultiAdapterModel.from_pretrained(build_tiny_model("tiny"), policy_adapter=str(policy_dir))
    reference = merged(policy_dir)
    free = [plain_greedy(reference, prompt, 6) for prompt in prompts]
    stops = (free[0][2], free[1][4])  # row 0 stops by step 3 at the latest, row 1 by step 5
    query_ids, query_mask = left_pad(prompts, PAD_ID)
    rollout = sample_rollout(model, query_ids, query_mask, SamplingSettings(
        max_new_tokens=6, stop_token_ids=stops, pad_token_id=PAD_ID, do_sample=False))
    for row, tokens in enumerate(free):
        first = next((index for index, token in enumerate(tokens) if token in stops), None)
        length = len(tokens) if first is None else first + 1
        width = rollout.response_ids.shape[1]
        assert rollout.response_ids[row].tolist() == tokens[:length] + [PAD_ID] * (width - length)
        assert rollout.response_mask[row].tolist() == [1] * length + [0] * (width - length)
        assert bool(rollout.stopped[row]) == (first is not None)
        assert rollout.responses()[row].tolist() == tokens[:length]
    # the one stop-mask implementation gives the same mask from the ids
    assert torch.equal(rollout.response_mask, ppo_math.response_mask_from_stop_tokens(
        rollout.response_ids, stops, pad_token_id=None))


# --------------------------------------------------------------------------- roles


def test_reference_role_samples_exactly_like_the_bare_base_model(policy_dir, prompts):
    """Sampled with adapters disabled = sampled from the plain base (no peft, no cache), same seed."""
    model = MultiAdapterModel.from_pretrained(build_tiny_model("tiny"), policy_adapter=str(policy_dir))
    query_ids, query_mask = left_pad(prompts, PAD_ID)
    settings = SamplingSettings(max_new_tokens=8, temperature=0.8, pad_token_id=PAD_ID, role="reference")
    torch.manual_seed(21)
    rollout = sample_rollout(model, query_ids, query_mask, settings)
    tokens, logprobs = plain_sampling(build_tiny_model("tiny"), prompts, 8, 0.8, seed=21)
    assert torch.equal(rollout.response_ids, tokens)
    torch.testing.assert_close(rollout.logprobs.double(), logprobs, atol=1e-5, rtol=0)
    assert rollout.values is None  # values belong to the policy's value head
    # the policy role, same seed, samples from the adapter: the merged model, not the base
    torch.manual_seed(21)
    policy_rollout = sample_rollout(model, query_ids, query_mask, SamplingSettings(
        max_new_tokens=8, temperature=0.8, pad_token_id=PAD_ID))
    policy_tokens, _ = plain_sampling(merged(policy_dir), prompts, 8, 0.8, seed=21)
    assert torch.equal(policy_rollout.response_ids, policy_tokens)
    assert not torch.equal(policy_rollout.response_ids, rollout.response_ids)
    assert model.active_role == "policy"


def test_policy_init_reference_samples_the_starting_adapter_after_training(policy_dir, prompts):
    """reference='policy_init': the reference role decodes like base + the starting adapter merged, even
    after the policy adapter moved."""
    model = MultiAdapterModel.from_pretrained(build_tiny_model("tiny"), policy_adapter=str(policy_dir),
                                              reference="policy_init")
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    query_ids, query_mask = left_pad(prompts, PAD_ID)
    settings = SamplingSettings(max_new_tokens=5, pad_token_id=PAD_ID, do_sample=False, role="reference")
    reference_rollout = sample_rollout(model, query_ids, query_mask, settings)
    starting = merged(policy_dir)
    assert reference_rollout.response_ids.tolist() == [plain_greedy(starting, prompt, 5) for prompt in prompts]


# --------------------------------------------------------------------------- settings


def test_values_are_captured_only_for_the_policy_with_a_value_head(policy_dir, prompts):
    model = MultiAdapterModel.from_pretrained(build_tiny_model("tiny"), policy_adapter=str(policy_dir))
    query_ids, query_mask = left_pad(prompts, PAD_ID)
    base_settings = dict(max_new_tokens=3, pad_token_id=PAD_ID)
    assert sample_rollout(model, query_ids, query_mask, SamplingSettings(**base_settings)).values is not None
    assert sample_rollout(model, query_ids, query_mask, SamplingSettings(
        **base_settings, capture_values=False)).values is None
    with pytest.raises(ValueError, match="capture_values=True .* role='policy'"):
        sample_rollout(model, query_ids, query_mask, SamplingSettings(
            **base_settings, role="reference", capture_values=True))


@pytest.mark.parametrize("kwargs, message", [
    (dict(role="reward"), "not a sampling role"),
    (dict(temperature=0.0), "do_sample=False for greedy"),
    (dict(max_new_tokens=0), "at least 1 token"),
])
def test_bad_settings_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**{"max_new_tokens": 4, **kwargs})


def test_trainer_keyword_arguments_keep_working():
    """The trainer builds settings with these keywords and copies them with vars(); both stay valid."""
    settings = SamplingSettings(max_new_tokens=8, temperature=0.7, top_k=5, top_p=0.9, stop_token_ids=(4,),
                                pad_token_id=5, keep_logits=True, capture_values=True)
    copied = SamplingSettings(**{**vars(settings), "keep_logits": False, "capture_values": False})
    assert (copied.do_sample, copied.role, copied.keep_logits) == (True, "policy", False)


# --------------------------------------------------------------------------- stop ids


def test_stop_token_ids_follow_the_tokenizer_and_the_generation_config(tiny_tokenizer):
    model = MultiAdapterModel.from_pretrained(build_tiny_model("tiny"))
    assert tiny_tokenizer.convert_ids_to_tokens([EOT_ID, EOS_ID]) == ["<|eot_id|>", "<|end_of_text|>"]
    # the tiny tokenizer's EOS is <|eot_id|>; the model's generation_config adds <|end_of_text|>
    assert stop_token_ids(tiny_tokenizer, model) == (EOS_ID, EOT_ID)
    plain = build_tiny_model("tiny")
    plain.generation_config.eos_token_id = 7
    assert stop_token_ids(tiny_tokenizer, plain, "eos") == (EOT_ID, 7)
    assert stop_token_ids(tiny_tokenizer, model, "<|end_of_text|>") == (EOS_ID,)
    assert stop_token_ids(tiny_tokenizer, model, None) == ()
    with pytest.raises(ValueError, match="not a token of the tokenizer"):
        stop_token_ids(tiny_tokenizer, model, "<|no_such_token|>")
