"""MultiAdapterPPOTrainer: rollout, scoring, optimisation, metrics, checkpoints, TRL 0.11 step() API.

Numbers are checked against independent computations: plain peft/transformers models run row by row
without padding, stop positions found by a Python loop, gradient norms measured at the optimizer, and
parameter hashes. The learning tests use a handwritten reward (+1 per token from a fixed id set) that
a LoRA on the LM head can learn in a few dozen iterations of the tiny model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForSequenceClassification, TrainerCallback

from trl_multiadapter import MultiAdapterModel, MultiAdapterPPOConfig, MultiAdapterPPOTrainer, ppo_math
from trl_multiadapter.checkpointing import ResumeState, complete_checkpoints
from trl_multiadapter.ppo_trainer import NonFiniteValueError
from trl_multiadapter.rollout import SamplingSettings, left_pad, sample_rollout
from trl_multiadapter.testing import build_tiny_model, tiny_llama_config

TARGET_IDS = frozenset(range(100, 164))  # 1/16 of the tiny vocabulary
PAD_ID, EOT_ID, EOS_ID = 5, 4, 1
REQUIRED_METRICS = (
    "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/scores", "objective/rlhf_reward",
    "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio",
    "val/num_eos_tokens", "eps", "lr",
)


# --------------------------------------------------------------------------- builders


def target_token_reward(prompts, completions, completion_ids, **kwargs):
    """+1 for every completion token from TARGET_IDS (TRL reward-function form)."""
    return [float(sum(token in TARGET_IDS for token in ids)) for ids in completion_ids]


def policy_lora(random_init: bool = False) -> LoraConfig:
    # The LM head carries a LoRA too: the tiny random base's final norm fixes the hidden-state scale, so
    # only the head can move the next-token distribution far enough to learn within seconds.
    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "lm_head"],
        init_lora_weights=not random_init,
    )


def policy_model(random_init: bool = False, **kwargs) -> MultiAdapterModel:
    torch.manual_seed(0)
    return MultiAdapterModel.from_pretrained(build_tiny_model("tiny"), policy_config=policy_lora(random_init), **kwargs)


def prompt_dataset(count: int = 32) -> Dataset:
    topics = ("garden", "river", "kettle", "bicycle", "lantern", "harbor", "violin", "meadow")
    return Dataset.from_dict({"prompt": [f"Tell me about the {topics[i % 8]} number {i}." for i in range(count)]})


def make_config(tmp_path, **overrides) -> MultiAdapterPPOConfig:
    settings = dict(
        output_dir=str(tmp_path), batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=3e-3, max_steps=2,
        max_new_tokens=8, init_kl_coef=0.05, save_strategy="no", seed=0, disable_tqdm=True, report_to="none",
    )
    settings.update(overrides)
    return MultiAdapterPPOConfig(**settings)


def make_trainer(tmp_path, tokenizer, model=None, reward_funcs=(target_token_reward,), dataset=None, **overrides):
    return MultiAdapterPPOTrainer(
        model=model if model is not None else policy_model(),
        args=make_config(tmp_path, **overrides),
        processing_class=tokenizer,
        train_dataset=dataset if dataset is not None else prompt_dataset(),
        reward_funcs=list(reward_funcs) if reward_funcs else None,
    )


def write_reward_adapter(path, base_dir, num_labels: int = 1, seed: int = 7):
    """A PEFT SEQ_CLS LoRA with a random score head over the tiny base, saved as RewardTrainer does."""
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(tiny_llama_config("tiny", num_labels=num_labels))
    model.model.load_state_dict(build_tiny_model("tiny").model.state_dict())
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(path)
    return path


def merged_reward_model(adapter_dir, num_labels: int = 1):
    torch.manual_seed(123)
    model = LlamaForSequenceClassification(tiny_llama_config("tiny", num_labels=num_labels))
    model.model.load_state_dict(build_tiny_model("tiny").model.state_dict())
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().eval()


def trainable_snapshot(model: MultiAdapterModel) -> list[torch.Tensor]:
    return [parameter.detach().clone() for parameter in model.trainable_parameters()]


def digest(tensors) -> str:
    sha = hashlib.sha256()
    for tensor in tensors:
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def metric(trainer, name: str) -> list[float]:
    return [entry[name] for entry in trainer.state.log_history if name in entry]


class StopAt(TrainerCallback):
    """Ends training after ``step`` iterations, like a job killed right after a checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


# --------------------------------------------------------------------------- rollout


def test_sampling_logprobs_and_values_equal_an_unpadded_training_forward(tiny_tokenizer):
    """Captured during KV-cache sampling at temperature 0.7 (with top-k), checked against the peft model run
    row by row without padding, full softmax at the same temperature."""
    model = policy_model(random_init=True)
    prompts = [tiny_tokenizer(text)["input_ids"] for text in ("A short one.", "A much longer prompt than the other.")]
    query_ids, query_mask = left_pad(prompts, PAD_ID)
    settings = SamplingSettings(max_new_tokens=10, temperature=0.7, top_k=50, stop_token_ids=(EOT_ID,), pad_token_id=PAD_ID)
    torch.manual_seed(1)
    rollout = sample_rollout(model, query_ids, query_mask, settings)
    for row, prompt in enumerate(prompts):
        length = int(rollout.response_mask[row].sum())
        response = rollout.response_ids[row, :length].tolist()
        with torch.no_grad():
            outputs = model.peft_model(input_ids=torch.tensor([prompt + response]), output_hidden_states=True)
        logits = outputs.logits[0, len(prompt) - 1 : -1] / 0.7
        expected_logprobs = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(response)[:, None])[:, 0]
        hidden = outputs.hidden_states[-1][0, len(prompt) - 1 : -1]
        expected_values = (hidden @ model.value_head.weight[0] + model.value_head.bias[0]).double()
        assert torch.allclose(rollout.logprobs[row, :length].double(), expected_logprobs, atol=1e-5, rtol=0)
        assert torch.allclose(rollout.values[row, :length].double(), expected_values, atol=1e-5, rtol=0)
        assert not rollout.logprobs[row, length:].any() and not rollout.values[row, length:].any()


def test_responses_end_after_the_first_stop_token(tiny_tokenizer):
    model = policy_model()
    stops = tuple(range(6, 260))  # a quarter of the vocabulary: responses of many lengths
    prompts = [tiny_tokenizer(f"Prompt number {i}")["input_ids"] for i in range(12)]
    query_ids, query_mask = left_pad(prompts, PAD_ID)
    torch.manual_seed(2)
    rollout = sample_rollout(model, query_ids, query_mask, SamplingSettings(12, stop_token_ids=stops, pad_token_id=PAD_ID))
    lengths = set()
    for row in range(len(prompts)):
        tokens = rollout.response_ids[row].tolist()
        first_stop = next((index for index, token in enumerate(tokens) if token in stops), None)
        length = len(tokens) if first_stop is None else first_stop + 1
        lengths.add(length)
        assert rollout.response_mask[row].tolist() == [1] * length + [0] * (len(tokens) - length)
        assert tokens[length:] == [PAD_ID] * (len(tokens) - length)
        assert bool(rollout.stopped[row]) == (first_stop is not None)
    assert len(lengths) >= 3


def test_scores_are_read_at_the_stop_token(tmp_path, tiny_tokenizer, tiny_model_dir):
    """End to end: sampled responses of different lengths, scored by the reward adapter inside the trainer,
    equal a merged seq-cls model on prompt + response up to and including the stop token, unpadded."""
    adapter = write_reward_adapter(tmp_path / "reward", tiny_model_dir)
    model = policy_model(reward_adapter=adapter)
    # end_of_turn_token=None: score the responses exactly as sampled (the training-format rewrite has its own test)
    trainer = make_trainer(tmp_path / "run", tiny_tokenizer, model=model, reward_funcs=None, max_steps=1, batch_size=8,
                           end_of_turn_token=None)
    trainer.stop_token_ids = tuple(range(6, 300))
    captured = {}
    score = trainer.reward_source

    def capture(rollout, columns):
        captured["rollout"], captured["scores"] = rollout, score(rollout, columns)
        return captured["scores"]

    trainer.reward_source = capture
    trainer.train()
    rollout, reference = captured["rollout"], merged_reward_model(adapter)
    lengths = rollout.response_mask.sum(1).tolist()
    assert len(set(lengths)) >= 3
    for row, length in enumerate(lengths):
        prompt = rollout.query_ids[row][rollout.query_mask[row].bool()].tolist()
        response = rollout.response_ids[row].tolist()
        stop = next((index for index, token in enumerate(response) if token in trainer.stop_token_ids), len(response) - 1)
        with torch.no_grad():
            expected = reference(input_ids=torch.tensor([prompt + response[: stop + 1]])).logits[0, 0]
        assert length == stop + 1
        assert torch.allclose(captured["scores"][row], expected, atol=1e-5)


# --------------------------------------------------------------------------- the PPO update


@pytest.mark.parametrize("rollout_logprobs", ["generation", "forward"])
def test_ratio_is_one_on_the_first_minibatch(tmp_path, tiny_tokenizer, monkeypatch, rollout_logprobs):
    calls = []
    original = ppo_math.policy_loss

    def record(logprobs, old_logprobs, advantages, mask, cliprange):
        calls.append((logprobs.detach().clone(), old_logprobs.clone(), mask.bool()))
        return original(logprobs, old_logprobs, advantages, mask, cliprange)

    monkeypatch.setattr(ppo_math, "policy_loss", record)
    trainer = make_trainer(tmp_path, tiny_tokenizer, model=policy_model(random_init=True), max_steps=1,
                           temperature=0.7, rollout_logprobs=rollout_logprobs)
    trainer.train()
    logprobs, old_logprobs, mask = calls[0]
    ratio = torch.exp(logprobs - old_logprobs)[mask]
    if rollout_logprobs == "forward":
        assert torch.equal(ratio, torch.ones_like(ratio))  # the same forward on the same mini-batch
    else:
        assert (ratio - 1).abs().max() <= 1e-5  # KV-cache vs full forward: float32 rounding only
    assert len(calls) == 2 * 4 // 2
    assert not torch.allclose(calls[-1][0], calls[-1][1], atol=1e-4)  # later mini-batches see an updated policy


def test_gradient_clipping_applies_on_every_optimizer_step(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_tokenizer, max_steps=2, batch_size=4, mini_batch_size=1,
                           gradient_accumulation_steps=2, ppo_epochs=2, max_grad_norm=1e-3)
    trainer.create_optimizer_and_scheduler(2)
    norms = []
    step = trainer.optimizer.step

    def measured_step(*args, **kwargs):
        grads = [parameter.grad for parameter in trainer.model.trainable_parameters() if parameter.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return step(*args, **kwargs)

    trainer.optimizer.step = measured_step
    trainer.train()
    assert len(norms) == 2 * 2 * (4 // (1 * 2))  # iterations x epochs x accumulation groups
    assert all(norm <= 1e-3 * (1 + 1e-4) for norm in norms)
    assert min(metric(trainer, "policy/grad_norm")) > 1e-3  # so the clip was active on every step
    assert metric(trainer, "policy/optimizer_steps") == [4.0, 4.0]


def test_a_ratio_blow_up_skips_the_step_and_leaves_the_weights(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_tokenizer, max_steps=1, ratio_threshold=10.0, gradient_accumulation_steps=2,
                           mini_batch_size=1)
    def stale_rollout(*args):
        rollout = sample_rollout(*args)
        rollout.logprobs = torch.where(rollout.response_mask.bool(), rollout.logprobs - 5.0, 0.0)  # ratio e^5
        return rollout

    trainer.sampler = stale_rollout
    trainer.create_optimizer_and_scheduler(1)
    steps = []
    trainer.optimizer.step = lambda *args, **kwargs: steps.append(1)
    before = trainable_snapshot(trainer.model)
    trainer.train()
    assert steps == []
    assert all(torch.equal(a, b) for a, b in zip(before, trainable_snapshot(trainer.model)))
    assert metric(trainer, "policy/skipped_minibatches") == [2 * 4]
    assert metric(trainer, "policy/optimizer_steps") == [0.0]
    assert metric(trainer, "val/ratio")[0] > 10.0


@pytest.mark.parametrize("where", ["scores", "logprobs"])
def test_non_finite_values_stop_with_a_diagnostic_and_no_update(tmp_path, tiny_tokenizer, where):
    def reward(prompts, completions, completion_ids, **kwargs):
        return [math_nan if index == 2 and where == "scores" else 1.0 for index in range(len(prompts))]

    math_nan = float("nan")
    trainer = make_trainer(tmp_path, tiny_tokenizer, reward_funcs=[reward], max_steps=1)
    if where == "logprobs":
        def corrupt(*args):
            rollout = sample_rollout(*args)
            rollout.logprobs[1, 0] = float("inf")
            return rollout

        trainer.sampler = corrupt
    before = trainable_snapshot(trainer.model)
    with pytest.raises(NonFiniteValueError) as error:
        trainer.train()
    assert f"`{where}`" in str(error.value) and "step 0" in str(error.value)
    assert error.value.rows == ([2] if where == "scores" else [1])
    assert all(torch.equal(a, b) for a, b in zip(before, trainable_snapshot(trainer.model)))


def test_only_policy_and_value_head_change_base_and_reward_stay_bit_identical(tmp_path, tiny_tokenizer, tiny_model_dir):
    adapter = write_reward_adapter(tmp_path / "reward", tiny_model_dir)
    model = policy_model(reward_adapter=adapter)
    trainable_ids = {id(parameter) for parameter in model.trainable_parameters()}
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if id(p) not in trainable_ids}
    frozen_hash = digest(frozen.values())
    reward_names = [name for name in frozen if ".reward." in name]
    assert reward_names  # the reward adapter is among the parameters that must not move
    before = trainable_snapshot(model)
    trainer = make_trainer(tmp_path / "run", tiny_tokenizer, model=model, reward_funcs=None, max_steps=3)
    trainer.train()
    after = {name: p for name, p in model.named_parameters() if id(p) not in trainable_ids}
    assert digest(after[name] for name in frozen) == frozen_hash
    moved = [not torch.equal(a, b) for a, b in zip(before, trainable_snapshot(model))]
    assert all(moved), "every policy LoRA matrix and the value head should have been updated"


def test_kl_is_exactly_zero_while_the_policy_equals_the_reference(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_tokenizer, max_steps=1, kl_estimator="k3", batch_size=4, mini_batch_size=1)
    prompts = ["first prompt", "2nd", "a third, longer prompt here", "4"]
    stats = trainer.step(
        [torch.tensor(tiny_tokenizer(text)["input_ids"]) for text in prompts],
        [torch.tensor([300, 301, EOT_ID]), torch.tensor([7]), torch.tensor([9, 10, 11, 12, 13]), torch.tensor([EOS_ID])],
        [torch.tensor(1.0), torch.tensor(-0.5), torch.tensor(2.0), torch.tensor(0.5)],
    )
    assert stats["objective/kl"] == 0.0 and stats["objective/non_score_reward"] == 0.0
    assert stats["objective/scores"] == pytest.approx(0.75)
    assert stats["val/num_eos_tokens"] == 2  # the first and the last response hold a stop token


def test_metrics_follow_trl_names_and_match_the_rewards(tmp_path, tiny_tokenizer):
    seen = []

    def recording_reward(prompts, completions, completion_ids, **kwargs):
        values = target_token_reward(prompts, completions, completion_ids)
        seen.append((values, completion_ids, completions, prompts))
        return values

    trainer = make_trainer(tmp_path, tiny_tokenizer, reward_funcs=[recording_reward], max_steps=2, logging_steps=1,
                           missing_eos_penalty=2.0)
    trainer.stop_token_ids = (EOT_ID, EOS_ID, *range(6, 200))  # some responses stop, some do not
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "objective/scores" in entry]
    assert [entry["step"] for entry in history] == [1, 2]
    for entry, (values, ids, completions, prompts) in zip(history, seen):
        stopped = [bool(set(row) & set(trainer.stop_token_ids)) for row in ids]
        penalised = [value - (0.0 if stop else 2.0) for value, stop in zip(values, stopped)]
        assert set(REQUIRED_METRICS) <= set(entry)
        assert entry["objective/scores"] == pytest.approx(sum(penalised) / len(penalised))
        assert entry["val/num_eos_tokens"] == sum(stopped)
        assert entry["val/response_length"] == pytest.approx(sum(map(len, ids)) / len(ids))
        assert completions == tiny_tokenizer.batch_decode(ids, skip_special_tokens=True)
        assert all(prompt in prompt_dataset()["prompt"] for prompt in prompts)
        assert entry["lr"] == 3e-3
        assert entry["objective/rlhf_reward"] == pytest.approx(entry["objective/scores"] + entry["objective/non_score_reward"])


def test_score_scaling_normalisation_and_clipping_use_running_moments(tmp_path, tiny_tokenizer, monkeypatch):
    raw, shaped = [], []
    original = ppo_math.per_token_rewards

    def capture(scores, kl, kl_coef, response_mask):
        shaped.append(scores.clone())
        return original(scores, kl, kl_coef, response_mask)

    def reward(prompts, completions, completion_ids, **kwargs):
        raw.append([3.0 * len(ids) + sum(ids) % 7 for ids in completion_ids])
        return raw[-1]

    monkeypatch.setattr(ppo_math, "per_token_rewards", capture)
    trainer = make_trainer(tmp_path, tiny_tokenizer, reward_funcs=[reward], max_steps=3, use_score_scaling=True,
                           use_score_norm=True, score_clip=1.5)
    trainer.stop_token_ids = tuple(range(6, 300))
    trainer.train()
    for step, scores in enumerate(shaped):
        history = torch.tensor([value for batch in raw[: step + 1] for value in batch], dtype=torch.float64)
        expected = (torch.tensor(raw[step], dtype=torch.float64) - history.mean()) / (history.std() + 1.1920929e-07)
        assert torch.allclose(scores.double(), expected.clamp(-1.5, 1.5), atol=1e-5)


@pytest.mark.parametrize("rollout_logprobs", ["generation", "forward"])
def test_full_kl_is_the_vocabulary_kl_between_policy_and_base(tmp_path, tiny_tokenizer, rollout_logprobs):
    model = policy_model(random_init=True)
    base = build_tiny_model("tiny").eval()
    trainer = make_trainer(tmp_path, tiny_tokenizer, model=model, max_steps=1, kl_estimator="full", temperature=0.8,
                           rollout_logprobs=rollout_logprobs)
    expected = []

    def with_independent_kl(*args):
        rollout = sample_rollout(*args)
        for row in range(rollout.batch_size):
            prompt = rollout.query_ids[row][rollout.query_mask[row].bool()].tolist()
            response = rollout.response_ids[row][rollout.response_mask[row].bool()].tolist()
            ids = torch.tensor([prompt + response])
            with torch.no_grad():
                policy = torch.log_softmax(model.peft_model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / 0.8, -1)
                reference = torch.log_softmax(base(input_ids=ids).logits[0, len(prompt) - 1 : -1] / 0.8, -1)
            expected.append((policy.exp() * (policy - reference)).sum().item())
        return rollout

    trainer.sampler = with_independent_kl
    trainer.train()
    assert metric(trainer, "objective/kl")[0] == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    assert sum(expected) > 0


def test_conversational_prompts_use_the_chat_template(tmp_path, tiny_tokenizer):
    messages = [[{"role": "user", "content": f"Question {i}?"}] for i in range(8)]
    seen = []

    def reward(prompts, completions, completion_ids, **kwargs):
        seen.append((prompts, completions, kwargs["topic"]))
        return [0.0] * len(prompts)

    dataset = Dataset.from_dict({"prompt": messages, "topic": [f"t{i}" for i in range(8)]})
    trainer = make_trainer(tmp_path, tiny_tokenizer, reward_funcs=[reward], dataset=dataset, max_steps=1)
    queries = []

    def record(model, query_ids, query_mask, settings):
        queries.append([row[mask.bool()].tolist() for row, mask in zip(query_ids, query_mask)])
        return sample_rollout(model, query_ids, query_mask, settings)

    trainer.sampler = record
    trainer.train()
    prompts, completions, topics = seen[0]
    for prompt, query, topic in zip(prompts, queries[0], topics):
        expected = tiny_tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert query == list(expected) and query.count(0) == 1  # one BOS
        assert topic == f"t{messages.index(prompt)}"
    assert all(isinstance(c, list) and c[0]["role"] == "assistant" for c in completions)


# --------------------------------------------------------------------------- learning and variants


def test_learning_raises_the_handwritten_reward(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_tokenizer, max_steps=30, batch_size=8, mini_batch_size=2, ppo_epochs=4,
                           max_new_tokens=12, init_kl_coef=0.01)
    trainer.train()
    scores = metric(trainer, "objective/scores")
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    # Out of 12 tokens, a uniform policy hits the target set 0.75 times; a learned one many more.
    assert last > first + 3.0, scores


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["critic", "policy_init"])
def test_variants_learn_the_handwritten_reward(tmp_path, tiny_tokenizer, tiny_model_dir, variant):
    if variant == "critic":
        model = policy_model(value_model="critic")
    else:
        start = tmp_path / "sft"
        get_peft_model(build_tiny_model("tiny"), policy_lora()).save_pretrained(start)
        model = MultiAdapterModel.from_pretrained(build_tiny_model("tiny"), policy_adapter=start, reference="policy_init")
    # 'forward' logprobs for policy_init: the policy and its reference then run the same passes, KL exactly 0.
    trainer = make_trainer(tmp_path / "run", tiny_tokenizer, model=model, max_steps=20, batch_size=8, max_new_tokens=12,
                           init_kl_coef=0.01, learning_rate=5e-3,
                           rollout_logprobs="forward" if variant == "policy_init" else "generation")
    trainer.train()
    scores = metric(trainer, "objective/scores")
    assert sum(scores[-5:]) / 5 > sum(scores[:5]) / 5 + 1.5, scores
    if variant == "policy_init":
        assert metric(trainer, "objective/kl")[0] == 0.0  # the policy starts as its reference


@pytest.mark.slow
def test_legacy_two_label_reward_head(tmp_path, tiny_tokenizer, tiny_reward_adapter_dir):
    """A 2-label head whose column 1 is the trained 1-label head: scores equal, and PPO raises them."""
    from safetensors.torch import load_file, save_file

    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_reward_adapter_dir.adapter_dir, legacy)
    state = load_file(str(legacy / "adapter_model.safetensors"))
    for key in [key for key in state if key.endswith("score.weight") or key.endswith("score.bias")]:
        state[key] = torch.cat([-state[key], state[key]])
    save_file(state, str(legacy / "adapter_model.safetensors"))
    base = tiny_reward_adapter_dir.base_model_dir
    one_label = MultiAdapterModel.from_pretrained(base, reward_adapter=tiny_reward_adapter_dir.adapter_dir)
    two_label = MultiAdapterModel.from_pretrained(base, reward_adapter=legacy, reward_label_index=1,
                                                  policy_config=policy_lora())
    trainer = make_trainer(tmp_path / "run", tiny_tokenizer, model=two_label, reward_funcs=None, max_steps=15,
                           batch_size=8, max_new_tokens=12, init_kl_coef=0.01, learning_rate=5e-3,
                           end_of_turn_token=None)
    captured = []
    score = trainer.reward_source
    trainer.reward_source = lambda rollout, columns: captured.append((rollout, score(rollout, columns))) or captured[-1][1]
    trainer.train()
    rollout, scores = captured[0]
    assert torch.allclose(scores, one_label.score(rollout.input_ids, rollout.attention_mask), atol=1e-5)
    history = metric(trainer, "objective/scores")
    assert sum(history[-5:]) / 5 > sum(history[:5]) / 5, history


# --------------------------------------------------------------------------- checkpoints


def test_resume_continues_bitwise_like_an_uninterrupted_run(tmp_path, tiny_tokenizer):
    def run(output_dir, resume=None, stop_at=None):
        trainer = make_trainer(output_dir, tiny_tokenizer, max_steps=4, save_strategy="steps", save_steps=2,
                               use_score_scaling=True, use_score_norm=True, lr_scheduler_type="linear")
        if stop_at:
            trainer.add_callback(StopAt(stop_at))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    uninterrupted = run(tmp_path / "full")
    interrupted = run(tmp_path / "killed", stop_at=2)
    assert interrupted.state.global_step == 2
    assert [path.name for path in complete_checkpoints(tmp_path / "killed")] == ["checkpoint-2"]
    resumed = run(tmp_path / "killed", resume=True)
    assert resumed.state.global_step == 4
    for a, b in zip(trainable_snapshot(uninterrupted.model), trainable_snapshot(resumed.model)):
        assert torch.equal(a, b)
    assert metric(resumed, "objective/scores") == metric(uninterrupted, "objective/scores")
    assert resumed.kl_ctl.value == uninterrupted.kl_ctl.value
    assert not list((tmp_path / "killed").glob(".tmp-*"))


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_tokenizer, monkeypatch):
    trainer = make_trainer(tmp_path, tiny_tokenizer, max_steps=2, save_strategy="steps", save_steps=1)
    write = ResumeState.save

    def crash_on_second(state, folder, *args):
        if trainer.state.global_step == 2:
            (folder / "partial.bin").write_bytes(b"x")
            raise OSError("disk full")
        write(state, folder, *args)

    monkeypatch.setattr(ResumeState, "save", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert [path.name for path in complete_checkpoints(tmp_path)] == ["checkpoint-1"]
    resumed = make_trainer(tmp_path, tiny_tokenizer, max_steps=2)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 2


def test_save_model_round_trips_through_from_saved(tmp_path, tiny_tokenizer):
    trainer = make_trainer(tmp_path, tiny_tokenizer, max_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    restored = MultiAdapterModel.from_pretrained(build_tiny_model("tiny"), from_saved=tmp_path / "final")
    ids = torch.tensor([tiny_tokenizer("check the round trip")["input_ids"]])
    with torch.no_grad():
        expected = trainer.model.policy_forward(ids)
        actual = restored.policy_forward(ids)
    assert torch.equal(expected[0], actual[0]) and torch.equal(expected[1], actual[1])
    assert (tmp_path / "final" / "tokenizer.json").is_file()


# --------------------------------------------------------------------------- evaluate and the step() API


def test_evaluate_reports_score_kl_and_length_without_touching_training_randomness(tmp_path, tiny_tokenizer):
    seen = []

    def reward(prompts, completions, completion_ids, **kwargs):
        seen.append((target_token_reward(prompts, completions, completion_ids), completion_ids))
        return seen[-1][0]

    trainer = MultiAdapterPPOTrainer(model=policy_model(), args=make_config(tmp_path, per_device_eval_batch_size=3),
                                     processing_class=tiny_tokenizer, eval_dataset=prompt_dataset(7),
                                     reward_funcs=[reward])
    rng = torch.random.get_rng_state()
    metrics = trainer.evaluate()
    assert torch.equal(rng, torch.random.get_rng_state())
    values = [value for batch, _ in seen for value in batch]
    lengths = [len(ids) for _, batch in seen for ids in batch]
    assert len(values) == 7
    assert metrics["eval_score"] == pytest.approx(sum(values) / 7)
    assert metrics["eval_response_length"] == pytest.approx(sum(lengths) / 7)
    # A fresh LoRA equals the reference; sampling-time logprobs (KV cache) differ from the reference's full
    # forward by float32 rounding only.
    assert abs(metrics["eval_kl_k1"]) <= 1e-5
    assert trainer.state.log_history[-1]["eval_score"] == metrics["eval_score"]


def test_step_with_prompts_only_samples_scores_and_updates(tmp_path, tiny_tokenizer):
    seen = []

    def reward(prompts, completions, completion_ids, **kwargs):
        seen.extend(target_token_reward(prompts, completions, completion_ids))
        return seen[-len(prompts):]

    trainer = MultiAdapterPPOTrainer(model=policy_model(), args=make_config(tmp_path, temperature=0.9),
                                     processing_class=tiny_tokenizer, reward_funcs=[reward])
    queries = [torch.tensor(tiny_tokenizer(f"prompt {i}")["input_ids"]) for i in range(4)]
    before = trainable_snapshot(trainer.model)
    stats = trainer.step(queries)
    assert stats["objective/scores"] == pytest.approx(sum(seen) / 4)
    assert abs(stats["policy/first_ratio"] - 1.0) <= 1e-5
    assert stats["time/rollout/generation"] > 0 and stats["policy/optimizer_steps"] == 2 * 4 / 2
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable_snapshot(trainer.model)))


def test_model_id_loading_with_bf16_autocast_and_gradient_checkpointing(tmp_path, tiny_tokenizer, tiny_model_dir):
    """`model` as a path: the config's model fields reach MultiAdapterModel.from_pretrained; bf16 mixed precision
    (accelerate autocast) keeps sampling and training logprobs close."""
    args = make_config(tmp_path, max_steps=1, bf16=True, use_cpu=True, gradient_checkpointing=True,
                       value_model="critic")
    trainer = MultiAdapterPPOTrainer(model=str(tiny_model_dir), args=args, processing_class=tiny_tokenizer,
                                     train_dataset=prompt_dataset(), reward_funcs=[target_token_reward],
                                     peft_config=policy_lora())
    assert trainer.model.value_model == "critic" and trainer.model.gradient_checkpointing
    trainer.train()
    assert abs(metric(trainer, "policy/first_ratio")[0] - 1.0) < 2e-2


def test_constructor_errors_name_the_fix(tmp_path, tiny_tokenizer):
    model = policy_model()
    with pytest.raises(ValueError, match="prompt"):
        make_trainer(tmp_path, tiny_tokenizer, model=model, dataset=Dataset.from_dict({"text": ["a"]}))
    with pytest.raises(ValueError, match="peft_config"):
        MultiAdapterPPOTrainer(model=model, args=make_config(tmp_path), processing_class=tiny_tokenizer,
                               peft_config=policy_lora())
    with pytest.raises(ValueError, match="value_model"):
        MultiAdapterPPOTrainer(model=model, args=make_config(tmp_path, value_model="critic"),
                               processing_class=tiny_tokenizer)
    with pytest.raises(ValueError, match="reward_weights"):
        make_trainer(tmp_path, tiny_tokenizer, model=model, reward_weights=[1.0, 2.0])
    trainer = make_trainer(tmp_path, tiny_tokenizer, model=model, reward_funcs=None)
    with pytest.raises(ValueError, match="reward source"):
        trainer.train()


# --------------------------------------------------------------------------- data parallel

DDP_WORKER = """\
import hashlib, json, os, sys
import torch
import torch.distributed as dist
from datasets import Dataset
from peft import LoraConfig
from trl_multiadapter import MultiAdapterModel, MultiAdapterPPOConfig, MultiAdapterPPOTrainer
from trl_multiadapter.testing import build_tiny_model, build_tiny_tokenizer

seen = []
def reward(prompts, completions, completion_ids, **kwargs):
    seen.extend(prompts)
    return [float(sum(100 <= t < 164 for t in ids)) for ids in completion_ids]

torch.manual_seed(int(os.environ.get("RANK", 0)))  # different init per rank: the trainer must broadcast
model = MultiAdapterModel.from_pretrained(build_tiny_model("tiny"), policy_config=LoraConfig(
    r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False))
args = MultiAdapterPPOConfig(output_dir=sys.argv[1], use_cpu=True, batch_size=4, mini_batch_size=2, ppo_epochs=2,
                             max_steps=2, max_new_tokens=6, learning_rate=3e-3, save_strategy="no", seed=0,
                             disable_tqdm=True, report_to="none")
dataset = Dataset.from_dict({"prompt": [f"prompt number {i}" for i in range(16)]})
trainer = MultiAdapterPPOTrainer(model=model, args=args, processing_class=build_tiny_tokenizer(),
                                 train_dataset=dataset, reward_funcs=[reward])
trainer.train()
sha = hashlib.sha256()
for p in model.trainable_parameters():
    sha.update(p.detach().contiguous().numpy().tobytes())
result = {"rank": dist.get_rank(), "world": dist.get_world_size(), "num_processes": trainer.num_processes,
          "digest": sha.hexdigest(), "prompts": seen, "backend": dist.get_backend()}
results = [None, None]
dist.all_gather_object(results, result)
if dist.get_rank() == 0:
    with open(os.path.join(sys.argv[1], "ddp.json"), "w") as f:
        json.dump(results, f)
dist.barrier()
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_gloo_run_keeps_adapters_identical_and_prompts_disjoint(tmp_path):
    """torchrun --nproc_per_node 2 on CPU (gloo). Ranks start from different LoRA weights on purpose: the
    trainer broadcasts rank 0's, averages gradients over both ranks, and every rank ends bit-identical."""
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(script), str(tmp_path / "out")]
    # A clean launch environment: nothing of this process's accelerate/torch.distributed state leaks in.
    leaked = ("ACCELERATE_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(leaked)}
    env["OMP_NUM_THREADS"] = "1"
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads((tmp_path / "out" / "ddp.json").read_text())
    assert [(r["rank"], r["world"], r["num_processes"], r["backend"]) for r in results] == [
        (0, 2, 2, "gloo"), (1, 2, 2, "gloo")
    ]
    assert results[0]["digest"] == results[1]["digest"]
    assert len(results[0]["prompts"]) == len(results[1]["prompts"]) == 2 * 4  # 2 iterations x batch_size 4
    assert not set(results[0]["prompts"]) & set(results[1]["prompts"])
