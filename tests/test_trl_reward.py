"""trl_reward: our reward adapter as a reward function of TRL's GRPOTrainer / RLOOTrainer, on the trained model.

Scores are checked against a standalone LlamaForSequenceClassification with the adapter merged, on the
prompt ids TRL itself generated from (captured from the trainer) and the completions TRL sampled.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaForSequenceClassification
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from trl_multiadapter.model_io import score_key_kind
from trl_multiadapter.testing import build_tiny_model, tiny_llama_config
from trl_multiadapter.testing.tokenizer import EOS_TOKEN_ID, EOT_TOKEN_ID
from trl_multiadapter.trl_reward import RewardAdapterFunction, adapter_active

TOPICS = ("garden", "river", "kettle", "bicycle", "lantern", "harbor", "violin", "meadow")


# --------------------------------------------------------------------------- builders


def chat_prompts(count: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": [
        [{"role": "user", "content": f"Tell me about the {TOPICS[i % 8]} number {i}."}] for i in range(count)
    ]})


def merged_reward_model(adapter_dir) -> torch.nn.Module:
    """The reward as TRL would otherwise hold it: a separate seq-cls model, the adapter merged into its base."""
    model = LlamaForSequenceClassification(tiny_llama_config("tiny", num_labels=1))
    model.model.load_state_dict(build_tiny_model("tiny").model.state_dict())
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().eval()


def merged_score(model, ids: list[int]) -> float:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


def as_trained(completion: list[int]) -> list[int]:
    """The training format written out: the tiny template ends an assistant turn with <|eot_id|>."""
    return completion[:-1] + [EOT_TOKEN_ID] if completion and completion[-1] in (EOS_TOKEN_ID, EOT_TOKEN_ID) else completion


def policy_lora() -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])


def grpo_config(tmp_path, **overrides) -> GRPOConfig:
    settings = dict(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=6, max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no",
        report_to="none", seed=0, disable_tqdm=True, gradient_checkpointing=False, dataloader_num_workers=0,
        # every completion that does not stop by itself ends on <|end_of_text|>: a stop token the reward never
        # saw in training, which the scorer must replace by <|eot_id|>
        generation_kwargs={"forced_eos_token_id": EOS_TOKEN_ID},
    )
    settings.update(overrides)
    return GRPOConfig(**settings)


def digest(tensors) -> str:
    sha = hashlib.sha256()
    for tensor in tensors:
        sha.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return sha.hexdigest()


def named(model, marker: str) -> dict[str, torch.Tensor]:
    return {name: parameter for name, parameter in model.named_parameters() if marker in name}


def base_parameters(model) -> dict[str, torch.Tensor]:
    return {name: parameter for name, parameter in model.named_parameters() if "lora_" not in name}


def record_generation_and_rewards(trainer) -> list[dict]:
    """Wrap two TRL methods to capture what TRL sampled and what our reward function returned to it."""
    records, generate, rewards = [], trainer._generate, trainer._calculate_rewards

    def recording_generate(prompts):
        output = generate(prompts)
        records.append({"prompt_ids": [list(ids) for ids in output[0]], "completion_ids": [list(ids) for ids in output[1]]})
        return output

    def recording_rewards(inputs, prompts, completions, completion_ids_list):
        result = rewards(inputs, prompts, completions, completion_ids_list)
        records[-1]["rewards"] = result[:, 0].tolist()
        return result

    trainer._generate, trainer._calculate_rewards = recording_generate, recording_rewards
    return records


# --------------------------------------------------------------------------- GRPO end to end


@pytest.mark.parametrize("wrapping", ["peft_config", "peft_model", "peft_model_attached_after"])
def test_grpo_trains_with_the_reward_adapter_on_its_own_model(tmp_path, tiny_tokenizer, tiny_reward_adapter_dir, wrapping):
    adapter_dir = tiny_reward_adapter_dir.adapter_dir
    base = build_tiny_model("tiny", seed=0)
    base_before = {name: parameter.detach().clone() for name, parameter in base.named_parameters()}
    if wrapping == "peft_config":
        reward = RewardAdapterFunction(adapter_dir)
        trainer = GRPOTrainer(model=base, reward_funcs=[reward], args=grpo_config(tmp_path), train_dataset=chat_prompts(),
                              processing_class=tiny_tokenizer, peft_config=policy_lora())
        reward.attach(trainer)
    else:  # an existing PeftModel; with beta > 0 TRL adds its own frozen "ref" adapter beside ours
        torch.manual_seed(0)
        policy = get_peft_model(base, policy_lora())
        up_front = wrapping == "peft_model"
        reward = (RewardAdapterFunction(adapter_dir, model=policy, processing_class=tiny_tokenizer) if up_front
                  else RewardAdapterFunction(adapter_dir))
        args = grpo_config(tmp_path, beta=0.04, gradient_checkpointing=True)  # TRL's default checkpointing
        trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=args,
                              train_dataset=chat_prompts(), processing_class=tiny_tokenizer)
        assert reward.attach(trainer) is reward  # loads now, or (up front) only reads the trainer's settings
        assert "ref" in trainer.model.peft_config and reward.stop_ids == set(trainer.eos_token_ids)
    model = trainer.model
    assert reward.peft_model is model and {"default", "reward"} <= set(model.peft_config)
    reward_before = {name: parameter.detach().clone() for name, parameter in named(model, ".reward.").items()}
    policy_before = digest(named(model, ".default.").values())
    records = record_generation_and_rewards(trainer)

    trainer.train()

    # TRL got our scores, and they are the merged seq-cls model's on TRL's own prompt ids + sampled completions
    merged = merged_reward_model(adapter_dir)
    assert len(records) == 2
    completions = [ids for record in records for ids in record["completion_ids"]]
    assert all(ids[-1] in (EOS_TOKEN_ID, EOT_TOKEN_ID) for ids in completions)
    assert any(ids[-1] == EOS_TOKEN_ID for ids in completions)  # the replacement was exercised
    for record in records:
        expected = [merged_score(merged, prompt + as_trained(completion))
                    for prompt, completion in zip(record["prompt_ids"], record["completion_ids"])]
        assert record["rewards"] == pytest.approx(expected, abs=1e-5)
        assert len(set(record["rewards"])) > 1

    # the base and the reward adapter are bit-identical; the reward adapter equals its file; the policy trained
    for name, parameter in base_parameters(model).items():
        original = name.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert torch.equal(parameter, base_before[original]), name
    for name, parameter in named(model, ".reward.").items():
        assert torch.equal(parameter, reward_before[name]), name
    saved = {key: value for key, value in load_file(str(adapter_dir / "adapter_model.safetensors")).items()
             if not score_key_kind(key)}
    loaded = named(model, ".reward.")
    assert len(saved) == len(loaded) > 0
    for key, value in saved.items():
        assert torch.equal(loaded[key.replace(".weight", ".reward.weight")], value), key
    assert digest(named(model, ".default.").values()) != policy_before

    # the reward adapter is frozen and never among the optimizer's parameters
    optimised = {id(parameter) for group in trainer.optimizer.param_groups for parameter in group["params"]}
    assert optimised and not optimised & {id(parameter) for parameter in named(model, ".reward.").values()}
    assert not any(parameter.requires_grad for parameter in named(model, ".reward.").values())
    assert all(parameter.requires_grad for parameter in named(model, ".default.").values())
    assert model.active_adapter == "default"


def test_rloo_trains_with_the_reward_adapter(tmp_path, tiny_tokenizer, tiny_reward_adapter_dir):
    reward = RewardAdapterFunction(tiny_reward_adapter_dir.adapter_dir)
    args = RLOOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=6, max_steps=1, learning_rate=1e-2, save_strategy="no", report_to="none", seed=0,
        disable_tqdm=True, gradient_checkpointing=False, logging_steps=1,
        generation_kwargs={"forced_eos_token_id": EOS_TOKEN_ID},
    )
    trainer = RLOOTrainer(model=build_tiny_model("tiny", seed=0), reward_funcs=[reward], args=args,
                          train_dataset=chat_prompts(), processing_class=tiny_tokenizer, peft_config=policy_lora())
    reward.attach(trainer)
    records = record_generation_and_rewards(trainer)
    trainer.train()

    merged = merged_reward_model(tiny_reward_adapter_dir.adapter_dir)
    record = records[0]
    assert any(ids[-1] == EOS_TOKEN_ID for ids in record["completion_ids"])
    expected = [merged_score(merged, prompt + as_trained(completion))
                for prompt, completion in zip(record["prompt_ids"], record["completion_ids"])]
    assert record["rewards"] == pytest.approx(expected, abs=1e-5)
    assert "rewards/reward_adapter/mean" in trainer.state.log_history[0]


# --------------------------------------------------------------------------- direct calls


@pytest.fixture
def attached(tiny_tokenizer, tiny_reward_adapter_dir):
    torch.manual_seed(0)
    policy = get_peft_model(build_tiny_model("tiny", seed=0), policy_lora())
    return RewardAdapterFunction(tiny_reward_adapter_dir.adapter_dir, model=policy, processing_class=tiny_tokenizer,
                                 batch_size=2)


def test_a_final_stop_token_is_scored_as_the_end_of_turn_and_a_cut_completion_as_it_stands(attached, tiny_tokenizer,
                                                                                             tiny_reward_adapter_dir):
    prompt = [{"role": "user", "content": "Tell me about the river."}]
    answer = tiny_tokenizer("It flows to the sea", add_special_tokens=False)["input_ids"]
    completions = [answer + [EOS_TOKEN_ID], answer + [EOT_TOKEN_ID], answer, answer[:2]]
    scores = attached(prompts=[prompt] * 4, completions=None, completion_ids=completions, trainer_state=None)

    merged = merged_reward_model(tiny_reward_adapter_dir.adapter_dir)
    prompt_ids = tiny_tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert prompt_ids.count(tiny_tokenizer.bos_token_id) == 1
    expected = [merged_score(merged, list(prompt_ids) + answer + [EOT_TOKEN_ID]),
                merged_score(merged, list(prompt_ids) + answer + [EOT_TOKEN_ID]),
                merged_score(merged, list(prompt_ids) + answer),
                merged_score(merged, list(prompt_ids) + answer[:2])]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert scores[0] == pytest.approx(scores[1], abs=1e-6) and abs(scores[2] - scores[0]) > 1e-3


def test_plain_text_prompts_are_encoded_with_the_tokenizer_as_trl_does(attached, tiny_tokenizer, tiny_reward_adapter_dir):
    prompts = ["Tell me about the kettle.", "And the lantern?"]
    completions = [[100, 200, EOT_TOKEN_ID], [300, 301, 302, 303]]
    scores = attached(prompts=prompts, completion_ids=completions)
    merged = merged_reward_model(tiny_reward_adapter_dir.adapter_dir)
    expected = [merged_score(merged, tiny_tokenizer(text)["input_ids"] + as_trained(ids))
                for text, ids in zip(prompts, completions)]
    assert scores == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_scoring_restores_the_active_adapter_modes_and_requires_grad(attached, training):
    model = attached.peft_model
    model.train(training)
    modes = [module.training for module in model.modules()]
    grads = [parameter.requires_grad for parameter in model.parameters()]
    prompt = [{"role": "user", "content": "Hello?"}]
    attached(prompts=[prompt], completion_ids=[[100, 101, EOT_TOKEN_ID]])
    assert [module.training for module in model.modules()] == modes
    assert [parameter.requires_grad for parameter in model.parameters()] == grads
    assert model.active_adapter == "default"
    assert all(layer.active_adapters == ["default"] and not layer.disable_adapters
               for layer in model.modules() if hasattr(layer, "lora_A"))


def test_the_switch_is_restored_when_the_scoring_pass_raises(attached):
    model = attached.peft_model
    model.train()
    seen = {}

    def fail(module, args):
        seen["active"] = module.active_adapters
        seen["training"] = module.training
        raise RuntimeError("boom")

    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    handle = layer.register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            attached(prompts=["Hi"], completion_ids=[[100, 101]])
    finally:
        handle.remove()
    assert seen == {"active": ["reward"], "training": False}  # inside: reward adapter, dropout off
    assert layer.active_adapters == ["default"] and layer.training and model.training
    with pytest.raises(RuntimeError, match="boom"), adapter_active(model, "reward"):
        raise RuntimeError("boom")
    assert layer.active_adapters == ["default"] and layer.training


def test_scores_do_not_depend_on_the_policy_adapter(attached):
    """The scoring pass runs the reward adapter alone: moving the policy LoRA does not move the scores."""
    prompts, completions = ["A", "B", "C"], [[100, 101, EOT_TOKEN_ID], [102], [103, 104, 105, EOS_TOKEN_ID]]
    before = attached(prompts=prompts, completion_ids=completions)
    with torch.no_grad():
        for parameter in named(attached.peft_model, ".default.").values():
            parameter.add_(0.5)
    assert attached(prompts=prompts, completion_ids=completions) == before


def test_usage_errors_are_reported_in_one_line(tmp_path, tiny_tokenizer, tiny_reward_adapter_dir, attached):
    adapter_dir = tiny_reward_adapter_dir.adapter_dir
    unattached = RewardAdapterFunction(adapter_dir, processing_class=tiny_tokenizer)
    with pytest.raises(RuntimeError, match=r"call reward.attach\(trainer\)"):
        unattached(prompts=["Hi"], completion_ids=[[100]])
    with pytest.raises(TypeError, match="takes a TRL GRPOTrainer/RLOOTrainer or a peft PeftModel"):
        unattached.attach(build_tiny_model("tiny"))
    with pytest.raises(ValueError, match="already has an adapter named 'reward'"):
        unattached.attach(attached.peft_model)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        RewardAdapterFunction(tmp_path)
    with pytest.raises(ValueError, match="completion_ids="):
        attached(prompts=["Hi"], completions=["there"])
    assert attached.attach(attached.peft_model) is attached  # attaching the same model again is a no-op
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="already attached to another model"):
        attached.attach(get_peft_model(build_tiny_model("tiny"), policy_lora()))
