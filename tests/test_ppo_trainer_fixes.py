"""Regression tests for the trainer fixes of the architecture issue and the training-format scoring.

Each was seen failing on the code before the fix (see the closing note): the loss mask leaking into the
attention mask, an unchecked query count, an unseeded model build, fp16 without a loss scaler, and a
reward scored on a stop token it never saw in training.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from trl_multiadapter import MultiAdapterModel, MultiAdapterPPOConfig, MultiAdapterPPOTrainer, ppo_math
from trl_multiadapter.rollout import stop_token_ids
from trl_multiadapter.scoring import end_of_turn_ids
from trl_multiadapter.testing import build_tiny_model

PAD_ID, EOS_ID, EOT_ID = 5, 1, 4


def config(tmp_path, **overrides) -> MultiAdapterPPOConfig:
    settings = dict(output_dir=str(tmp_path), batch_size=4, mini_batch_size=2, ppo_epochs=1, max_steps=1,
                    max_new_tokens=6, save_strategy="no", seed=0, disable_tqdm=True, report_to="none")
    settings.update(overrides)
    return MultiAdapterPPOConfig(**settings)


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def test_response_masks_select_the_trained_tokens_but_every_token_stays_in_the_sequence(tmp_path, tiny_tokenizer,
                                                                                       monkeypatch):
    torch.manual_seed(0)
    model = MultiAdapterModel.from_pretrained(build_tiny_model("tiny"), policy_config=lora())
    trainer = MultiAdapterPPOTrainer(model=model, args=config(tmp_path), processing_class=tiny_tokenizer)
    queries = [torch.tensor(tiny_tokenizer(f"question {i}")["input_ids"]) for i in range(4)]
    responses = [torch.tensor([200 + i, 201, 202, 203]) for i in range(4)]
    masks = [torch.tensor([1, 0, 1, 0])] * 4
    attention, loss_masks = [], []
    forward, loss = model.policy_forward, ppo_math.policy_loss

    def seen_forward(input_ids, attention_mask, **kwargs):
        attention.append(attention_mask.clone())
        return forward(input_ids, attention_mask, **kwargs)

    def seen_loss(logprobs, old_logprobs, advantages, mask, cliprange):
        loss_masks.append(mask.clone())
        return loss(logprobs, old_logprobs, advantages, mask, cliprange)

    monkeypatch.setattr(model, "policy_forward", seen_forward)
    monkeypatch.setattr(ppo_math, "policy_loss", seen_loss)
    trainer.step(queries, responses, [1.0, 0.0, 1.0, 0.0], response_masks=masks)
    for mask in attention:  # the forward drops only the last response column (it predicts nothing)
        assert mask[:, -3:].tolist() == [[1, 1, 1]] * mask.shape[0]
    assert loss_masks and all(mask.tolist() == [[1, 0, 1, 0]] * mask.shape[0] for mask in loss_masks)


def test_step_refuses_a_query_count_other_than_batch_size(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    model = MultiAdapterModel.from_pretrained(build_tiny_model("tiny"), policy_config=lora())
    trainer = MultiAdapterPPOTrainer(model=model, args=config(tmp_path, batch_size=4, mini_batch_size=2,
                                                                gradient_accumulation_steps=2),
                                     processing_class=tiny_tokenizer)
    queries = [torch.tensor([0, 50 + i]) for i in range(6)]
    with pytest.raises(ValueError, match=r"6 queries but args.batch_size is 4"):
        trainer.step(queries, [torch.tensor([7, 8])] * 6, [0.0] * 6)


def test_the_seed_decides_adapter_and_value_head_init_when_building_from_a_path(tmp_path, tiny_tokenizer,
                                                                               tiny_model_dir):
    def value_head(seed: int) -> torch.Tensor:
        trainer = MultiAdapterPPOTrainer(model=str(tiny_model_dir), args=config(tmp_path / str(seed), seed=seed),
                                         processing_class=tiny_tokenizer, peft_config=lora())
        return torch.cat([parameter.detach().flatten() for parameter in trainer.model.trainable_parameters()])

    torch.manual_seed(999)  # whatever the caller's RNG state, the config's seed decides
    first = value_head(0)
    torch.manual_seed(5)
    assert torch.equal(first, value_head(0))
    assert not torch.equal(first, value_head(123))


def test_fp16_is_refused_with_the_reason_and_bf16_is_accepted(tmp_path):
    with pytest.raises(ValueError, match="fp16.*loss scaler.*bf16"):
        MultiAdapterPPOConfig(output_dir=str(tmp_path), fp16=True)


def test_evaluate_names_its_kl_for_the_estimator(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    model = MultiAdapterModel.from_pretrained(build_tiny_model("tiny"), policy_config=lora())
    trainer = MultiAdapterPPOTrainer(model=model, args=config(tmp_path), processing_class=tiny_tokenizer,
                                     reward_funcs=lambda prompts, completions, **kw: [1.0] * len(prompts),
                                     eval_dataset=Dataset.from_dict({"prompt": ["a", "b", "c"]}))
    metrics = trainer.evaluate()
    assert "eval_kl_k1" in metrics and "eval_kl" not in metrics
    assert abs(metrics["eval_kl_k1"]) < 1e-4  # a fresh LoRA equals the reference


def test_end_of_turn_is_read_from_the_chat_template(tiny_tokenizer):
    assert end_of_turn_ids(tiny_tokenizer) == (EOT_ID,)
    assert end_of_turn_ids(tiny_tokenizer, "<|end_of_text|>") == (EOS_ID,)
    assert end_of_turn_ids(tiny_tokenizer, None) == ()
    with pytest.raises(ValueError, match="not a token"):
        end_of_turn_ids(tiny_tokenizer, "<|no-such-token|>")


def test_every_stop_token_is_scored_as_the_reward_saw_answers_in_training(tmp_path, tiny_tokenizer,
                                                                         tiny_reward_adapter_dir):
    """The trainer's score of (prompt ids, response ids + stop id) for each stop id equals the reward
    adapter's score of the same conversation rendered from text by the chat template."""
    fixture = tiny_reward_adapter_dir
    model = MultiAdapterModel.from_pretrained(fixture.base_model_dir, reward_adapter=fixture.adapter_dir,
                                              policy_config=lora())
    trainer = MultiAdapterPPOTrainer(model=model, args=config(tmp_path, batch_size=2, mini_batch_size=1),
                                     processing_class=tiny_tokenizer)
    stops = stop_token_ids(tiny_tokenizer, model)
    assert set(stops) >= {EOS_ID, EOT_ID}
    question = [{"role": "user", "content": "How do I keep a sourdough starter alive?"}]
    answers = ["Feed it flour and water every day, thank you for asking", "no"]
    prompt = tiny_tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = []
    for answer in answers:
        text = tiny_tokenizer.apply_chat_template(question + [{"role": "assistant", "content": answer}], tokenize=False)
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        expected.append(model.score(torch.tensor([ids])).item())
    for stop in stops:
        responses = [torch.tensor(tiny_tokenizer(answer, add_special_tokens=False)["input_ids"] + [stop])
                     for answer in answers]
        scores = trainer.score_responses([torch.tensor(prompt)] * 2, responses)
        assert scores.tolist() == pytest.approx(expected, abs=1e-5), stop
    # A response that never stopped is scored as it stands.
    unstopped = torch.tensor(tiny_tokenizer(answers[0], add_special_tokens=False)["input_ids"])
    alone = model.score(torch.tensor([list(prompt) + unstopped.tolist()])).item()
    assert trainer.score_responses([torch.tensor(prompt)], [unstopped]).item() == pytest.approx(alone, abs=1e-5)


def test_evaluation_and_trl_style_generation_stay_out_of_the_next_iterations_timings(tmp_path, tiny_tokenizer):
    """Only an iteration's own phases are timed: the phases of step() fit inside its time/iteration even when a
    long evaluation (many prompts, long answers) ran just before it."""
    torch.manual_seed(0)
    model = MultiAdapterModel.from_pretrained(build_tiny_model("tiny"), policy_config=lora())
    trainer = MultiAdapterPPOTrainer(model=model, args=config(tmp_path, max_new_tokens=4, stop_token=None),
                                     processing_class=tiny_tokenizer,
                                     reward_funcs=lambda prompts, completions, **kw: [1.0] * len(prompts),
                                     eval_dataset=Dataset.from_dict({"prompt": [f"question {i}" for i in range(48)]}))
    trainer.evaluate()
    stats = trainer.step([torch.tensor(tiny_tokenizer(f"q {i}")["input_ids"]) for i in range(4)])
    phases = stats["time/rollout/generation"] + stats["time/rollout/score"] + stats["time/optimisation"]
    assert 0 < phases <= stats["time/iteration"]
