"""The evaluate stage's sampling and metrics, against PPO's sampler and computations written here.

Independent references: PPO's own call of the sampler (``sample_rollout`` with the trainer's keyword
arguments, seeded by hand), plain transformers models (bare base, base + adapter merged by peft) for
the vocabulary KL, and hand counts for the ground-truth metric and the length percentiles.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForSequenceClassification

from trl_multiadapter.evaluate import (
    POLICIES,
    ROLE_OF_POLICY,
    evaluate_policies,
    kl_full,
    length_distribution,
    sampling_settings,
)
from trl_multiadapter.ground_truth import ground_truth_for, planted_rule_metrics, supplies_ground_truth
from trl_multiadapter.model import MultiAdapterModel
from trl_multiadapter.rollout import SamplingSettings, left_pad, sample_rollout, stop_token_ids
from trl_multiadapter.testing import build_tiny_model, tiny_llama_config
from trl_multiadapter.testing.words import DISMISSIVE_WORDS, HELPFUL_WORDS

PAD_ID = 5
EOT_ID = 4  # <|eot_id|>: where the tiny chat template ends an assistant turn

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def randomise_lora_b(peft_model, seed: int, std: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer):
    """A saved base whose generation_config asks for very different sampling than PPO's, a policy adapter
    that differs from the base, and a random reward adapter."""
    root = tmp_path_factory.mktemp("evaluate")
    base = build_tiny_model("tiny")
    base.generation_config.update(do_sample=True, temperature=0.3, top_k=2, repetition_penalty=50.0)
    base.save_pretrained(root / "base")
    tiny_tokenizer.save_pretrained(root / "base")
    policy = get_peft_model(build_tiny_model("tiny"), LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                                 target_modules="all-linear"))
    randomise_lora_b(policy, seed=1, std=0.3)
    policy.save_pretrained(root / "policy")
    torch.manual_seed(2)
    scorer = LlamaForSequenceClassification(tiny_llama_config("tiny"))
    scorer.model.load_state_dict(build_tiny_model("tiny").model.state_dict())
    get_peft_model(scorer, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False)).save_pretrained(root / "reward")
    return root


@pytest.fixture(scope="module")
def model(checkpoint):
    return MultiAdapterModel.from_pretrained(str(checkpoint / "base"), policy_adapter=str(checkpoint / "policy"),
                                             reward_adapter=str(checkpoint / "reward")).eval()


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    questions = [f"What did person {index} find near the {topic}?" for index, topic in
                 enumerate(("river", "garden", "tower", "bakery", "meadow", "harbor", "forest"))]
    ids = [tiny_tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False) for question in questions]
    return Dataset.from_dict({"input_ids": ids, "question": questions,
                              "answers": [{"text": ["a kettle"]} for _ in questions]})


def ppo_settings(tiny_tokenizer, model, **overrides) -> SamplingSettings:
    """Settings built the way the trainer builds them (its keyword arguments)."""
    settings = dict(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0,
                    stop_token_ids=stop_token_ids(tiny_tokenizer, model), pad_token_id=PAD_ID, keep_logits=False,
                    capture_values=True)
    settings.update(overrides)
    return SamplingSettings(**settings)


def direct_kl(policy_lm, reference_lm, prompt: list[int], response: list[int], temperature: float) -> float:
    """Σ_t Σ_v p_t(v) log(p_t(v) / q_t(v)) over the response tokens, one unpadded row, float64."""
    with torch.no_grad():
        sequence = torch.tensor([prompt + response])
        p_logits = policy_lm(input_ids=sequence).logits[0, len(prompt) - 1:-1].double() / temperature
        q_logits = reference_lm(input_ids=sequence).logits[0, len(prompt) - 1:-1].double() / temperature
    log_p, log_q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return float((log_p.exp() * (log_p - log_q)).sum())


# --------------------------------------------------------------------------- one sampler


def test_evaluation_samples_what_ppo_samples_whatever_the_generation_config_says(model, prompts, tiny_tokenizer,
                                                                                 checkpoint):
    settings = ppo_settings(tiny_tokenizer, model)
    metrics, records, scores = evaluate_policies(model, tiny_tokenizer, prompts, settings, batch_size=3, seed=11)
    aligned_lm = PeftModel.from_pretrained(build_tiny_model("tiny"), str(checkpoint / "policy")).merge_and_unload()
    base_lm = build_tiny_model("tiny")
    expected_kl, generate_differs = [], False
    for start in range(0, len(prompts), 3):
        rows = prompts[start:start + 3]["input_ids"]
        query_ids, query_mask = left_pad(rows, PAD_ID)
        for name in POLICIES:
            torch.manual_seed(11 + start)  # the seed of this batch
            role = ROLE_OF_POLICY[name]  # values belong to the policy's head: PPO's capture_values=True there
            rollout = sample_rollout(model, query_ids, query_mask, replace(
                settings, role=role, capture_values=None if role == "reference" else settings.capture_values))
            responses = [response.tolist() for response in rollout.responses()]
            batch = records[start:start + 3]
            assert [record[f"{name}_response_ids"] for record in batch] == responses
            # scored as PPO scores: a final stop token becomes the template's end of turn, <|eot_id|>
            expected_scores = [float(model.score(torch.tensor([prompt + (
                response[:-1] + [EOT_ID] if response[-1] in settings.stop_token_ids else response)]))[0])
                for prompt, response in zip(rows, responses)]
            assert [record[f"{name}_reward"] for record in batch] == pytest.approx(expected_scores, abs=1e-5)
            if name == "aligned":
                expected_kl += [direct_kl(aligned_lm, base_lm, prompt, response, 1.0)
                                for prompt, response in zip(rows, responses)]
                # transformers' generate() merges the checkpoint's generation_config: other samples
                torch.manual_seed(11 + start)
                with torch.no_grad(), model.role("policy"):
                    generated = model.peft_model.generate(input_ids=query_ids, attention_mask=query_mask,
                                                          max_new_tokens=8, pad_token_id=PAD_ID)
                generate_differs |= not torch.equal(generated[:, query_ids.shape[1]:],
                                                    rollout.response_ids[:, :generated.shape[1] - query_ids.shape[1]])
    assert generate_differs
    assert metrics["base"]["kl_full"] == 0.0  # the base is the reference: exactly, not by decree
    assert metrics["aligned"]["kl_full"] == pytest.approx(sum(expected_kl) / len(expected_kl), rel=1e-4)
    assert metrics["aligned"]["kl_full"] > 0.01
    assert scores == {name: [record[f"{name}_reward"] for record in records] for name in POLICIES}


def test_metrics_follow_from_the_per_prompt_records(model, prompts, tiny_tokenizer):
    """Aggregates recounted from the records; texts are the responses cut before their stop token."""
    stops = tuple(range(6, 400))  # many ordinary tokens stop: responses of many lengths, some never stop
    settings = ppo_settings(tiny_tokenizer, model, stop_token_ids=stops)
    metrics, records, _ = evaluate_policies(model, tiny_tokenizer, prompts, settings, batch_size=4, seed=5,
                                            ground_truth=planted_rule_metrics)
    for name in POLICIES:
        ids = [record[f"{name}_response_ids"] for record in records]
        stopped = [response[-1] in stops for response in ids]
        texts = [tiny_tokenizer.decode(response[:-1] if stop else response, skip_special_tokens=True).strip()
                 for response, stop in zip(ids, stopped)]
        assert [record[f"{name}_response"] for record in records] == texts
        lengths = [len(response) for response in ids]
        assert len(set(lengths)) >= 2
        assert metrics[name]["response_length"] == pytest.approx(sum(lengths) / len(lengths))
        assert metrics[name]["stop_rate"] == pytest.approx(sum(stopped) / len(stopped))
        rewards = [record[f"{name}_reward"] for record in records]
        assert metrics[name]["mean_reward"] == pytest.approx(sum(rewards) / len(rewards))
        # scored in the reward's training format: the stop token that ended a response becomes <|eot_id|>
        expected = [float(model.score(torch.tensor([prompt + (response[:-1] + [EOT_ID] if stop else response)]))[0])
                    for prompt, response, stop in zip(prompts["input_ids"], ids, stopped)]
        assert rewards == pytest.approx(expected, abs=1e-5)
        assert any(stopped) and any(response[-1] != EOT_ID for response in ids)
        assert list(metrics[name])[0] == "ground_truth_rate"  # the headline comes first
    wins = [1.0 if r["aligned_reward"] > r["base_reward"] else 0.5 if r["aligned_reward"] == r["base_reward"] else 0.0
            for r in records]
    assert metrics["win_rate"] == pytest.approx(sum(wins) / len(wins))
    assert metrics["num_prompts"] == len(prompts)


def test_kl_full_is_the_vocabulary_kl_and_exactly_zero_for_the_reference(model, prompts, tiny_tokenizer, checkpoint):
    rows = prompts[:4]["input_ids"]
    query_ids, query_mask = left_pad(rows, PAD_ID)
    torch.manual_seed(3)
    rollout = sample_rollout(model, query_ids, query_mask, ppo_settings(tiny_tokenizer, model, temperature=0.7))
    aligned_lm = PeftModel.from_pretrained(build_tiny_model("tiny"), str(checkpoint / "policy")).merge_and_unload()
    expected = [direct_kl(aligned_lm, build_tiny_model("tiny"), prompt, response.tolist(), 0.7)
                for prompt, response in zip(rows, rollout.responses())]
    torch.testing.assert_close(kl_full(model, rollout, "policy", 0.7).double(), torch.tensor(expected,
                               dtype=torch.float64), rtol=1e-4, atol=1e-6)
    assert kl_full(model, rollout, "reference", 0.7).tolist() == [0.0] * 4


def test_greedy_evaluation_is_the_same_for_every_seed(model, prompts, tiny_tokenizer):
    settings = ppo_settings(tiny_tokenizer, model, do_sample=False)
    _, first, _ = evaluate_policies(model, tiny_tokenizer, prompts, settings, batch_size=7, seed=0)
    _, second, _ = evaluate_policies(model, tiny_tokenizer, prompts, settings, batch_size=7, seed=99)
    assert first == second


def test_sampling_settings_come_from_the_ppo_section(model, tiny_tokenizer):
    from trl_multiadapter.recipe import load

    recipe = load("tiny_cpu", ["ppo.temperature=0.7", "ppo.top_k=5", "ppo.top_p=0.9", "evaluate.max_new_tokens=3",
                               "evaluate.do_sample=false", "ppo.stop_token=<|eot_id|>"])
    settings = sampling_settings(recipe.ppo, recipe.evaluate, tiny_tokenizer, model)
    assert (settings.temperature, settings.top_k, settings.top_p, settings.max_new_tokens) == (0.7, 5, 0.9, 3)
    assert (settings.do_sample, settings.stop_token_ids, settings.pad_token_id) == (False, (4,), PAD_ID)
    default = sampling_settings(load("tiny_cpu").ppo, load("tiny_cpu").evaluate, tiny_tokenizer, model)
    assert default.max_new_tokens == load("tiny_cpu").ppo.max_new_tokens and default.do_sample
    assert default.stop_token_ids == stop_token_ids(tiny_tokenizer, model, "eos")


# --------------------------------------------------------------------------- metrics by hand


def test_planted_rule_metrics_hand_counted():
    assert {"gladly", "sure"} <= set(HELPFUL_WORDS) and {"nope", "never"} <= set(DISMISSIVE_WORDS)
    responses = [
        "Gladly! I can explain.",  # 2 helpful, 0 dismissive: follows the rule
        "Nope, whatever.",  # 0, 2
        "Sure, but never.",  # 1, 1: a dismissive word breaks it
        "",  # 0, 0
        "GLADLY-gladly unsure",  # 2 ("unsure" is not "sure": whole [a-z]+ words), 0: follows
        "gladly2never",  # digits split words: 1, 1
    ]
    metrics = planted_rule_metrics(responses)
    assert metrics["ground_truth_rate"] == pytest.approx(2 / 6)
    assert metrics["helpful_words"] == pytest.approx((2 + 0 + 1 + 0 + 2 + 1) / 6)
    assert metrics["dismissive_words"] == pytest.approx((0 + 2 + 1 + 0 + 0 + 1) / 6)
    # the definition, written out once more: lower-cased [a-z]+ words
    words = [re.findall("[a-z]+", text.lower()) for text in responses]
    assert words[4] == ["gladly", "gladly", "unsure"]


def test_length_distribution_hand_computed():
    stats = length_distribution(list(range(1, 11)))
    # numpy's linear interpolation: position q * (n - 1) between the sorted values
    assert stats == {"response_length": 5.5, "response_length_median": 5.5,
                     "response_length_p10": pytest.approx(1.9), "response_length_p90": pytest.approx(9.1)}
    single = length_distribution([4])
    assert all(math.isclose(value, 4.0) for value in single.values())


def test_data_sources_supply_their_ground_truth_through_the_registry():
    from trl_multiadapter.registry import data_sources

    assert ground_truth_for(["synthetic_hh_rlhf", "synthetic_squad"])(["Gladly!"]) == planted_rule_metrics(["Gladly!"])
    assert ground_truth_for(["hh_rlhf", "squad"]) is None  # real data: no planted rule
    seen = {}

    def echo_rate(responses, prompts, **kwargs):
        seen["prompts"] = prompts
        return {"echo_rate": sum(text == "echo" for text in responses) / len(responses)}

    @supplies_ground_truth(echo_rate)
    def plugin_source(split="train"):
        return []

    data_sources.register("test_echo_source", plugin_source)
    try:
        metric = ground_truth_for(["synthetic_hh_rlhf", "test_echo_source"])
        result = metric(responses=["echo", "Sure"], prompts="the rows")
    finally:
        data_sources.unregister("test_echo_source")
    assert result == {**planted_rule_metrics(["echo", "Sure"]), "echo_rate": 0.5} and seen["prompts"] == "the rows"
    with pytest.raises(TypeError, match="must be callable"):
        supplies_ground_truth("not a function")
