"""trl_multiadapter.trl011: TRL 0.11 scripts run with only their imports changed.

What TRL 0.11.4's PPO scripts, notebook and tests rely on, checked against things this package did not
compute: plain peft / transformers models run row by row without padding (logprobs, reference logprobs,
reward scores, greedy generations, LM loss), a merged sequence-classification model for the reward head,
parameter updates measured at an SGD optimizer, and TRL 0.11's documented defaults and stat names.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import HfArgumentParser, LlamaForSequenceClassification

from trl_multiadapter import MultiAdapterPPOConfig
from trl_multiadapter.rollout import SamplingSettings
from trl_multiadapter.testing import (
    build_tiny_model,
    tiny_llama_config,
    write_tiny_hh_rlhf,
)
from trl_multiadapter.trl011 import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, core

PAD_ID, EOT_ID, EOS_ID = 5, 4, 1
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# The 31 keys TRL 0.11.4's tests/test_ppo_trainer.py expects from step().
TRL_0_11_STATS = (
    "objective/kl", "objective/kl_dist", "objective/logprobs", "objective/ref_logprobs", "objective/kl_coef",
    "objective/entropy", "ppo/mean_non_score_reward", "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total",
    "ppo/policy/entropy", "ppo/policy/approxkl", "ppo/policy/policykl", "ppo/policy/clipfrac",
    "ppo/policy/advantages", "ppo/policy/advantages_mean", "ppo/policy/ratio", "ppo/returns/mean",
    "ppo/returns/var", "ppo/val/vpred", "ppo/val/error", "ppo/val/clipfrac", "ppo/val/mean", "ppo/val/var",
    "ppo/val/var_explained", "time/ppo/forward_pass", "time/ppo/compute_rewards", "time/ppo/optimize_step",
    "time/ppo/calc_stats", "time/ppo/total", "ppo/learning_rate",
)
NATIVE_STATS = ("objective/scores", "loss/policy_avg", "loss/value_avg", "val/ratio", "lr", "policy/optimizer_steps")


def sampler_has(field_name: str) -> bool:
    return field_name in {f.name for f in dataclasses.fields(SamplingSettings)}


needs_greedy_and_roles = pytest.mark.skipif(
    not (sampler_has("do_sample") and sampler_has("role")),
    reason="needs rollout.SamplingSettings(do_sample=, role=) (greedy decoding and the reference role)",
)


# --------------------------------------------------------------------------- builders


def lora(random_init: bool = True) -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "lm_head"],
                      init_lora_weights=not random_init, task_type="CAUSAL_LM")


def value_head_model(seed: int = 0, **kwargs) -> AutoModelForCausalLMWithValueHead:
    """A tiny policy whose LoRA is random (so the policy differs from its reference)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLMWithValueHead.from_pretrained(build_tiny_model("tiny"), peft_config=lora(), **kwargs)


def plain_policy(model) -> PeftModel:
    """A plain peft model on a fresh copy of the base holding the same policy LoRA weights."""
    twin = get_peft_model(build_tiny_model("tiny"), lora())
    set_peft_model_state_dict(twin, get_peft_model_state_dict(model.peft_model, adapter_name="policy"))
    return twin.eval()


def response_logprobs(causal_lm, query: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """log p(response | query) per token from one unpadded forward. (R,)."""
    with torch.no_grad():
        logits = causal_lm(input_ids=torch.cat([query, response])[None]).logits[0, len(query) - 1 : -1]
    return torch.log_softmax(logits.double(), -1).gather(-1, response[:, None])[:, 0]


def merged_reward_model(adapter_dir, num_labels: int = 1):
    model = LlamaForSequenceClassification(tiny_llama_config("tiny", num_labels=num_labels))
    model.model.load_state_dict(build_tiny_model("tiny").model.state_dict())
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload().eval()


def two_label_copy(adapter_dir, destination) -> Path:
    """A TRL-0.11-era 2-label head: column 1 is the trained 1-label head ("chosen"), column 0 its negation."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter_dir, destination)
    state = load_file(str(Path(destination) / "adapter_model.safetensors"))
    for key in [key for key in state if key.endswith("score.weight") or key.endswith("score.bias")]:
        state[key] = torch.cat([-state[key], state[key]])
    save_file(state, str(Path(destination) / "adapter_model.safetensors"))
    return Path(destination)


def trl_config(tmp_path, **overrides) -> PPOConfig:
    settings = dict(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3, output_dir=str(tmp_path))
    settings.update(overrides)
    return PPOConfig(**settings)


def queries(tokenizer, count: int = 4) -> list[torch.Tensor]:
    texts = ("a kettle", "the long river of the north", "lanterns", "a violin in a small meadow")
    return [torch.tensor(tokenizer(texts[i % 4] + f" {i}")["input_ids"]) for i in range(count)]


def fixed_responses(count: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(10, 1000, (3 + i,), generator=generator) for i in range(count)]


def trainer_for(tmp_path, tokenizer, model=None, dataset=None, **config) -> PPOTrainer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "No dataset is provided"
        return PPOTrainer(trl_config(tmp_path, **config), model if model is not None else value_head_model(),
                          tokenizer=tokenizer, dataset=dataset)


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- 4. PPOConfig


def test_ppo_config_is_a_dataclass_with_trl_0_11_defaults_mapped_onto_the_native_config(tmp_path):
    config = PPOConfig()
    assert dataclasses.is_dataclass(config)
    # TRL 0.11.4's documented defaults
    expected = dict(seed=0, batch_size=128, mini_batch_size=128, gradient_accumulation_steps=1, ppo_epochs=4,
                    learning_rate=1.41e-5, max_grad_norm=None, init_kl_coef=0.2, kl_penalty="kl", adap_kl_ctrl=True,
                    target=6.0, horizon=10000.0, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
                    ratio_threshold=10.0, whiten_rewards=False, use_score_scaling=False, use_score_norm=False,
                    score_clip=None, model_name="gpt2", query_dataset="stanfordnlp/imdb", steps=20000,
                    remove_unused_columns=True, tracker_project_name="trl", early_stopping=False, target_kl=1.0)
    assert {name: getattr(config, name) for name in expected} == expected
    assert config.backward_batch_size == 128 and config.total_ppo_epochs == 157  # ceil(20000 / 128)
    native = trl_config(tmp_path, kl_penalty="mse").to_multiadapter()
    assert isinstance(native, MultiAdapterPPOConfig)
    assert (native.kl_estimator, native.max_grad_norm, native.batch_size, native.mini_batch_size) == ("mse", 0.0, 4, 2)
    assert native.output_dir == str(tmp_path) and native.report_to in ([], "none", ["none"])
    # the native names of renamed fields, and native-only settings
    assert trl_config(tmp_path, kl_estimator="k3").to_multiadapter().kl_estimator == "k3"
    assert trl_config(tmp_path, multiadapter_kwargs={"stop_token": None}).to_multiadapter().stop_token is None
    assert MultiAdapterPPOConfig(output_dir=str(tmp_path)).max_grad_norm == 1.0  # the native default is unchanged
    assert PPOConfig(forward_batch_size=4, batch_size=8).mini_batch_size == 4
    assert config.to_dict()["batch_size"] == 128
    assert trl_config(tmp_path, accelerator_kwargs={"mixed_precision": "bf16"}).to_multiadapter().bf16
    with pytest.warns(UserWarning, match="early_stopping"):
        trl_config(tmp_path, early_stopping=True).to_multiadapter()
    with pytest.warns(UserWarning, match="use_score_norm"):
        assert not trl_config(tmp_path, use_score_norm=True).to_multiadapter().use_score_norm


def test_ppo_config_raises_for_impossible_batch_arithmetic_and_unknown_kl():
    with pytest.raises(ValueError, match="multiple of"):
        PPOConfig(batch_size=2, mini_batch_size=2, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="kl_penalty"):
        PPOConfig(kl_penalty="kl2")
    with pytest.raises(ValueError, match="JSON"):
        PPOConfig(tracker_kwargs="{not json")


def test_ppo_config_parses_with_hf_argument_parser_next_to_script_arguments():
    @dataclasses.dataclass
    class ScriptArguments:  # as TRL 0.11's examples/scripts/ppo.py
        use_peft: bool = False
        lora_r: int = 16

    parser = HfArgumentParser((ScriptArguments, PPOConfig))
    script, config = parser.parse_args_into_dataclasses(
        ["--use_peft", "--batch_size", "8", "--mini_batch_size", "2", "--gradient_accumulation_steps", "2",
         "--log_with", "tensorboard", "--accelerator_kwargs", '{"mixed_precision": "no"}', "--max_grad_norm", "0.5"])
    assert script.use_peft and config.batch_size == 8 and config.backward_batch_size == 4
    assert config.log_with == "tensorboard" and config.accelerator_kwargs == {"mixed_precision": "no"}
    assert config.max_grad_norm == 0.5 and config.seed == 0 and config.mini_batch_size == 2


def test_max_grad_norm_none_does_not_clip_and_a_norm_clips(tmp_path, tiny_tokenizer):
    """Measured at the optimizer: with SGD, one step moves the trainable parameters by lr * gradient, so the
    update's norm over lr is the gradient norm actually applied."""

    def applied_norm(max_grad_norm):
        model = value_head_model()
        optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            trainer = PPOTrainer(trl_config(tmp_path, batch_size=2, mini_batch_size=2, ppo_epochs=1,
                                            max_grad_norm=max_grad_norm), model, tokenizer=tiny_tokenizer,
                                 optimizer=optimizer)
        before = [p.detach().clone() for p in model.trainable_parameters()]
        stats = trainer.step(queries(tiny_tokenizer, 2), fixed_responses(2), [torch.tensor(1.0), torch.tensor(-1.0)])
        moved = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.trainable_parameters(), before)))
        return moved.item() / 0.1, stats["policy/grad_norm"]

    unclipped, gradient_norm = applied_norm(None)
    assert gradient_norm > 1e-3 and unclipped == pytest.approx(gradient_norm, rel=1e-4)
    clipped, _ = applied_norm(1e-3)
    assert clipped == pytest.approx(1e-3, rel=1e-3)


# --------------------------------------------------------------------------- 1. trl.core names


def test_length_sampler_and_set_seed_follow_trl_0_11():
    sampler = core.LengthSampler(4, 8)
    core.set_seed(3)
    draws = [sampler() for _ in range(200)]
    assert set(draws) == {4, 5, 6, 7} and all(isinstance(draw, int) for draw in draws)  # max excluded
    core.set_seed(3)
    assert [sampler() for _ in range(200)] == draws
    with pytest.raises(ValueError, match="max_value"):
        core.LengthSampler(5, 5)


def test_core_tensor_helpers_match_their_definitions():
    values = torch.tensor([[1.0, 2.0, 4.0], [8.0, 0.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    kept = torch.tensor([1.0, 2.0, 8.0, -1.0])
    assert core.masked_mean(values, mask).item() == pytest.approx(kept.mean().item())
    assert core.masked_var(values, mask).item() == pytest.approx(kept.var().item())
    assert core.masked_var(values, mask, unbiased=False).item() == pytest.approx(kept.var(unbiased=False).item())
    with pytest.raises(ValueError, match="empty"):
        core.masked_var(values, torch.zeros_like(mask))
    whitened = core.whiten(kept)
    assert whitened.mean().abs() < 1e-6 and whitened.std().item() == pytest.approx(1.0, rel=1e-6)
    assert torch.equal(core.clip_by_value(kept, -0.5, 3.0), torch.tensor([1.0, 2.0, 3.0, -0.5]))
    logits = torch.randn(2, 3, 7)
    assert torch.allclose(core.logprobs_from_logits(logits, None, gather=False), torch.log_softmax(logits, -1))
    labels = torch.tensor([[1, 2, 3], [4, 5, 6]])
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    assert torch.allclose(core.logprobs_from_logits(logits, labels), expected, atol=1e-6)
    probabilities = torch.softmax(logits, -1)
    assert torch.allclose(core.entropy_from_logits(logits), -(probabilities * probabilities.log()).sum(-1), atol=1e-5)
    filtered = core.top_k_top_p_filtering(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), top_k=2)
    assert torch.isinf(filtered).tolist() == [[True, False, False, True]]
    assert core.flatten_dict({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a/b": 1, "a/c/d": 2, "e": 3}
    stacked = core.stack_dicts([{"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0])}])
    assert stacked["x"].tolist() == [[1.0, 2.0], [3.0, core.WANDB_PADDING]]
    as_numpy = core.stats_to_np({"x": torch.tensor([1.0, 2.0]), "y": torch.tensor(2.5, dtype=torch.bfloat16), "z": 1})
    assert isinstance(as_numpy["x"], np.ndarray) and as_numpy["y"] == 2.5 and as_numpy["z"] == 1.0
    assert core.convert_to_scalar({"a": np.array([3.0]), "b": np.array([1.0, 2.0])})["a"] == 3.0


def test_respond_to_batch_samples_exactly_txt_len_tokens_from_the_policy():
    model = value_head_model()
    twin = plain_policy(model)
    prompt = torch.tensor([[0, 77, 291, 81], [0, 12, 13, 14]])
    responses = core.respond_to_batch(model, prompt, txt_len=7, top_k=1)  # top-1: the greedy continuation
    assert responses.shape == (2, 7)
    with torch.no_grad():
        expected = twin.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=7, min_new_tokens=7, pad_token_id=PAD_ID)[:, 4:]
    assert torch.equal(responses, expected)


# --------------------------------------------------------------------------- 2, 3, 6. the value-head model


def test_compute_reward_score_returns_every_label_at_every_position(tmp_path, tiny_reward_adapter_dir):
    """(B, T, num_labels) as TRL 0.11; [:, -1] is each row's last real token under right padding; a real
    position t holds the score of the prefix ending at t. Checked against the merged seq-cls model."""
    base = tiny_reward_adapter_dir.base_model_dir
    legacy = two_label_copy(tiny_reward_adapter_dir.adapter_dir, tmp_path / "legacy")
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(base), reward_adapter=str(legacy))
    assert model.reward_label_index is None  # loads without an index, as in TRL 0.11
    reference = merged_reward_model(legacy, num_labels=2)
    rows = [[0, 77, 291, 81, 84, 324, 593], [0, 12, 13]]
    input_ids = torch.tensor([row + [PAD_ID] * (7 - len(row)) for row in rows])  # right padding
    attention_mask = torch.tensor([[1] * len(row) + [0] * (7 - len(row)) for row in rows])
    scores = model.compute_reward_score(input_ids=input_ids, attention_mask=attention_mask)
    assert scores.shape == (2, 7, 2)
    with torch.no_grad():
        for row_index, row in enumerate(rows):
            last = reference(input_ids=torch.tensor([row])).logits[0]
            assert torch.allclose(scores[row_index, -1], last, atol=3e-6)
            prefix = reference(input_ids=torch.tensor([row[:2]])).logits[0]
            assert torch.allclose(scores[row_index, 1], prefix, atol=3e-6)
    assert torch.allclose(scores[..., 1], -scores[..., 0])
    left = model.compute_reward_score(input_ids=torch.tensor([[PAD_ID] * 4 + rows[1]]),
                                      attention_mask=torch.tensor([[0] * 4 + [1] * 3]))
    assert torch.allclose(left[0, -1], scores[1, -1], atol=3e-6) and not left[0, :4].any()


def test_a_multi_label_head_without_index_scores_only_through_compute_reward_score(tmp_path, tiny_tokenizer,
                                                                                   tiny_reward_adapter_dir):
    base, adapter = tiny_reward_adapter_dir.base_model_dir, tiny_reward_adapter_dir.adapter_dir
    legacy = two_label_copy(adapter, tmp_path / "legacy")
    unindexed = AutoModelForCausalLMWithValueHead.from_pretrained(str(base), reward_adapter=str(legacy))
    trainer = trainer_for(tmp_path / "a", tiny_tokenizer, model=unindexed)
    with pytest.raises(ValueError, match="reward_label_index"):
        trainer.score_responses(queries(tiny_tokenizer), fixed_responses())
    indexed = AutoModelForCausalLMWithValueHead.from_pretrained(str(base), reward_adapter=str(legacy),
                                                                reward_label_index=1)
    one_label = AutoModelForCausalLMWithValueHead.from_pretrained(str(base), reward_adapter=str(adapter))
    scores = trainer_for(tmp_path / "b", tiny_tokenizer, model=indexed).score_responses(
        queries(tiny_tokenizer), fixed_responses())
    expected = trainer_for(tmp_path / "c", tiny_tokenizer, model=one_label).score_responses(
        queries(tiny_tokenizer), fixed_responses())
    assert torch.allclose(scores, expected, atol=1e-6)


def test_from_pretrained_takes_over_an_existing_peft_model(tmp_path, tiny_reward_adapter_dir):
    """TRL's own test pattern (and the QLoRA route): a PeftModel whose LoRA becomes the policy, weights kept."""
    base = build_tiny_model("tiny")

    def make_inputs_require_grad(module, inputs, output):  # "this line is very important" in TRL's tests
        output.requires_grad_(True)

    base.get_input_embeddings().register_forward_hook(make_inputs_require_grad)
    torch.manual_seed(1)
    peft_model = get_peft_model(base, lora())
    ids = torch.tensor([[0, 77, 291, 81, 84]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    model = AutoModelForCausalLMWithValueHead.from_pretrained(peft_model,
                                                              reward_adapter=str(tiny_reward_adapter_dir.adapter_dir))
    logits, _, values = model(input_ids=ids)
    assert torch.equal(logits, expected) and values.shape == (1, 5)
    trainable = {id(p) for p in model.trainable_parameters()}
    for name, parameter in model.named_parameters():
        policy_lora = "lora_" in name and ".policy." in name
        assert parameter.requires_grad == (policy_lora or name.startswith("value_head")), name
        assert (id(parameter) in trainable) == parameter.requires_grad
    with torch.no_grad():
        reference = model.reference_logits(ids)
        bare = build_tiny_model("tiny")(input_ids=ids).logits
    assert torch.allclose(reference, bare, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        two = get_peft_model(build_tiny_model("tiny"), lora())
        two.add_adapter("other", lora())
        AutoModelForCausalLMWithValueHead.from_pretrained(two)


def test_from_pretrained_starts_the_policy_from_a_saved_peft_adapter(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(2)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), lora())
    peft_model.save_pretrained(str(tmp_path / "sft"))
    ids = torch.tensor([[0, 77, 291, 81, 84]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    with pytest.warns(UserWarning, match="peft_config is ignored"):
        model = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / "sft"), peft_config=lora())
    assert torch.allclose(model(input_ids=ids)[0], expected, atol=1e-6)
    assert all(p.requires_grad for p in model.trainable_parameters())


def test_model_attributes_forward_and_value_head_options(tiny_model_dir):
    ids = torch.tensor([[0, 77, 291, 81, 84, 324]])
    with pytest.warns(UserWarning, match="summary_dropout_prob"):
        torch.manual_seed(0)
        model = AutoModelForCausalLMWithValueHead.from_pretrained(str(tiny_model_dir), peft_config=lora(),
                                                                  summary_dropout_prob=0.1,
                                                                  v_head_init_strategy="normal",
                                                                  v_head_initializer_range=0.5)
    assert model.pretrained_model is model.peft_model and model.is_peft_model
    assert model.v_head.summary is model.value_head and not model.value_head.bias.any()
    assert 0.3 < model.value_head.weight.std().item() < 0.7  # normal(0, 0.5) over 64 weights
    model.train()
    logits, loss, values = model(input_ids=ids, labels=ids)
    _, _, again = model(input_ids=ids)
    assert torch.equal(values, again)  # no dropout in training mode either
    with torch.no_grad():
        hidden = model.peft_model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        plain = plain_policy(model)(input_ids=ids, labels=ids)
    assert torch.allclose(model.v_head(hidden)[..., 0], values, atol=1e-6)
    assert torch.allclose(logits, plain.logits, atol=1e-6) and loss.item() == pytest.approx(plain.loss.item(), rel=1e-5)
    bf16 = AutoModelForCausalLMWithValueHead.from_pretrained(str(tiny_model_dir), torch_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


def test_gradient_checkpointing_enable_keeps_values_and_gradients():
    model = value_head_model()
    ids = torch.tensor([[0, 77, 291, 81, 84, 324], [0, 12, 13, 14, 15, 16]])

    def gradients():
        model.train()
        logits, _, values = model(input_ids=ids)
        (logits.logsumexp(-1).mean() + values.mean()).backward()
        grads = [p.grad.clone() for p in model.trainable_parameters()]
        model.zero_grad(set_to_none=True)
        return grads

    plain = gradients()
    model.gradient_checkpointing_enable()
    assert model.gradient_checkpointing
    checkpointed = gradients()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


def test_load_in_8bit_takes_the_quantized_path(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    with pytest.warns(UserWarning, match="refused on CPU"):
        model = AutoModelForCausalLMWithValueHead.from_pretrained(str(tiny_model_dir), load_in_8bit=True)
    assert model.is_loaded_in_8bit and not model.is_loaded_in_4bit
    with pytest.raises(RuntimeError, match="refused on CPU"):
        model(input_ids=torch.tensor([[0, 77, 291]]))


def test_save_pretrained_round_trips_through_from_pretrained(tmp_path, tiny_tokenizer, tiny_model_dir,
                                                             tiny_reward_adapter_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(tiny_model_dir), peft_config=lora(),
                                                              reward_adapter=str(tiny_reward_adapter_dir.adapter_dir))
    trainer = trainer_for(tmp_path / "run", tiny_tokenizer, model=model, batch_size=2, mini_batch_size=2)
    trainer.step(queries(tiny_tokenizer, 2), fixed_responses(2), [torch.tensor(1.0), torch.tensor(0.0)])
    trainer.save_pretrained(str(tmp_path / "saved"))
    model.save_pretrained(str(tmp_path / "model"))
    ids = torch.tensor([[0, 77, 291, 81, 84]])
    for folder in ("saved", "model"):
        loaded = AutoModelForCausalLMWithValueHead.from_pretrained(str(tmp_path / folder))
        with torch.no_grad():
            for new, old in zip(loaded(input_ids=ids), model(input_ids=ids)):
                assert new is None and old is None or torch.equal(new, old)
            assert torch.equal(loaded.compute_reward_score(ids), model.compute_reward_score(ids))
    assert (tmp_path / "saved" / "tokenizer_config.json").is_file()
    with pytest.raises(ValueError, match="upload"):
        trainer.save_pretrained(str(tmp_path / "x"), push_to_hub=True)


# --------------------------------------------------------------------------- 3, 7, 11. the trainer


def test_trainer_builds_and_wraps_the_optimizer_and_scheduler_at_construction(tmp_path, tiny_tokenizer):
    trainer = trainer_for(tmp_path, tiny_tokenizer)
    assert trainer.optimizer.optimizer.param_groups[0]["lr"] == 1e-3  # accelerate's wrapper around torch's
    assert trainer.lr_scheduler.scheduler is not None
    assert trainer.tokenizer is tiny_tokenizer and trainer.ref_model is None
    assert trainer.current_device == trainer.accelerator.device and isinstance(trainer.config, PPOConfig)
    assert trainer.config.world_size == 1 and trainer.config.global_batch_size == 4
    model = value_head_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)  # over every parameter, as TRL's tests do
    schedule = torch.optim.lr_scheduler.ExponentialLR(sgd, gamma=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer = PPOTrainer(trl_config(tmp_path), model, tokenizer=tiny_tokenizer, optimizer=sgd, lr_scheduler=schedule)
    assert isinstance(trainer.optimizer.optimizer, torch.optim.SGD)
    assert isinstance(trainer.lr_scheduler.scheduler, torch.optim.lr_scheduler.ExponentialLR)
    rewards = [torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.5), torch.tensor(-1.0)]
    first = trainer.step(queries(tiny_tokenizer), fixed_responses(), rewards)
    second = trainer.step(queries(tiny_tokenizer), fixed_responses(), rewards)
    assert first["ppo/learning_rate"] == pytest.approx(0.01) and second["ppo/learning_rate"] == pytest.approx(0.009)
    with pytest.raises(ValueError, match="LRScheduler"):
        PPOTrainer(trl_config(tmp_path), value_head_model(), tokenizer=tiny_tokenizer, dataset=None,
                   lr_scheduler=object())


def test_a_native_config_is_accepted_as_config(tmp_path, tiny_tokenizer):
    args = MultiAdapterPPOConfig(output_dir=str(tmp_path), batch_size=2, mini_batch_size=2, ppo_epochs=1,
                                 save_strategy="no", report_to="none", use_cpu=True)
    with pytest.warns(UserWarning, match="No dataset"):
        trainer = PPOTrainer(config=args, model=value_head_model(), tokenizer=tiny_tokenizer)
    assert trainer.config is trainer.args is args and args.max_grad_norm == 1.0
    stats = trainer.step(queries(tiny_tokenizer, 2), fixed_responses(2), [torch.tensor(1.0), torch.tensor(0.0)])
    assert stats["ppo/mean_scores"] == pytest.approx(0.5) and stats["policy/grad_norm"] > 0


def test_trainer_warnings_and_refusals_follow_trl_0_11(tmp_path, tiny_tokenizer):
    with pytest.warns(UserWarning, match="No dataset"):
        PPOTrainer(trl_config(tmp_path), value_head_model(), tokenizer=tiny_tokenizer)
    dataset = Dataset.from_dict({"input_ids": [[1, 2, 3]] * 4})
    with pytest.warns(UserWarning, match="num_shared_layers"):
        PPOTrainer(trl_config(tmp_path), value_head_model(), None, tiny_tokenizer, dataset=dataset, num_shared_layers=1)
    model = value_head_model()
    with pytest.raises(ValueError, match="ref_model"):
        PPOTrainer(trl_config(tmp_path), model, ref_model=model, tokenizer=tiny_tokenizer, dataset=dataset)
    with pytest.raises(ValueError, match="tokenizer"):
        PPOTrainer(trl_config(tmp_path), model, tokenizer=None, dataset=dataset)
    with pytest.raises(ValueError, match="model"):
        PPOTrainer(trl_config(tmp_path), build_tiny_model("tiny"), tokenizer=tiny_tokenizer, dataset=dataset)


# --------------------------------------------------------------------------- 8. dataloader


def test_dataloader_is_a_torch_dataloader_over_the_dataset_as_given(tmp_path, tiny_tokenizer):
    texts = [f"Human: question {i}? Assistant:" for i in range(10)]
    dataset = Dataset.from_dict({"chosen": texts, "rejected": texts})
    dataset = dataset.map(lambda row: {"input_ids": tiny_tokenizer.encode(row["chosen"]), "query": row["chosen"]})
    dataset.set_format("torch")

    def collator(rows):
        return {key: [row[key] for row in rows] for key in rows[0]}

    trainer = PPOTrainer(trl_config(tmp_path), value_head_model(), None, tiny_tokenizer, dataset=dataset,
                         data_collator=collator)
    batches = list(trainer.dataloader)
    assert len(trainer.dataloader) == len(batches) == 2  # 10 rows, batches of 4, tail dropped
    assert all(set(batch) == {"input_ids", "query"} for batch in batches)  # remove_unused_columns
    seen = [query for batch in batches for query in batch["query"]]
    assert len(set(seen)) == 8 and set(seen) <= set(texts)
    again = PPOTrainer(trl_config(tmp_path), value_head_model(), None, tiny_tokenizer, dataset=dataset,
                       data_collator=collator)
    assert [query for batch in again.dataloader for query in batch["query"]] == seen  # seeded by config.seed
    kept = PPOTrainer(trl_config(tmp_path, remove_unused_columns=False), value_head_model(), None, tiny_tokenizer,
                      dataset=dataset, data_collator=collator)
    assert set(next(iter(kept.dataloader))) == {"chosen", "rejected", "input_ids", "query"}
    small = PPOTrainer(trl_config(tmp_path, batch_size=16, mini_batch_size=4), value_head_model(), None,
                       tiny_tokenizer, dataset=dataset, data_collator=collator)
    assert len(small.dataloader) == 0 and list(small.dataloader) == []


def test_a_torch_dataset_of_tuples_trains_as_in_trl_0_11_tests(tmp_path, tiny_tokenizer):
    """TRL 0.11's DummyDataset: (query, response) tuples, default collation, then step(list(q), list(r), ...)."""
    model = value_head_model()
    query = torch.tensor([[0, 77, 291, 81, 84, 324, 593]])
    response = core.respond_to_batch(model, query, txt_len=7)

    class DummyDataset(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return query[0], response[0]

    trainer = PPOTrainer(trl_config(tmp_path, batch_size=2, mini_batch_size=1), model, None, tiny_tokenizer,
                         dataset=DummyDataset())
    before = [p.detach().clone() for p in model.trainable_parameters()]
    for query_tensor, response_tensor in trainer.dataloader:
        assert query_tensor.shape == (2, 7) and response_tensor.shape == (2, 7)
        stats = trainer.step(list(query_tensor), list(response_tensor), [torch.tensor(1.0), torch.tensor(0.0)])
    assert all(key in stats for key in TRL_0_11_STATS)
    assert all(not torch.equal(p, b) for p, b in zip(model.trainable_parameters(), before))


# --------------------------------------------------------------------------- 5. generate


def test_generate_follows_trl_0_11_shapes_lengths_and_length_sampler(tmp_path, tiny_tokenizer):
    trainer = trainer_for(tmp_path, tiny_tokenizer, multiadapter_kwargs={"stop_token": None})
    prompts = queries(tiny_tokenizer, 5)
    single = trainer.generate(prompts[0], max_new_tokens=3, top_k=0.0, top_p=1.0, do_sample=True, min_length=-1,
                              pad_token_id=PAD_ID)
    assert single.shape == (1, len(prompts[0]) + 3) and torch.equal(single[0, : len(prompts[0])], prompts[0])
    draws = iter([2, 5, 3])
    responses = trainer.generate(prompts, length_sampler=lambda: next(draws), batch_size=2, return_prompt=False)
    assert [len(r) for r in responses] == [2, 2, 5, 5, 3]  # one draw per chunk of batch_size queries
    with_prompts = trainer.generate(prompts[:2], max_new_tokens=2)
    assert [len(r) for r in with_prompts] == [len(prompts[0]) + 2, len(prompts[1]) + 2]
    with pytest.raises(ValueError, match="seq_len"):
        trainer.generate(torch.stack([prompts[0], prompts[0]]))
    for kwargs, reason in (({"num_beams": 2}, "beam search"), ({"repetition_penalty": 1.2}, "distribution"),
                           ({"temperature": 0.5}, "PPOConfig\\(temperature"), ({"foo": 1}, "not supported")):
        with pytest.raises(ValueError, match=reason):
            trainer.generate(prompts[:1], **kwargs)
    assert trainer.generate(prompts[:1], num_beams=1, max_new_tokens=1)[0].numel() == len(prompts[0]) + 1


def test_generate_stops_after_the_stop_token(tmp_path, tiny_tokenizer):
    trainer = trainer_for(tmp_path, tiny_tokenizer)
    stops = list(range(6, 400))  # many stop ids: responses of several lengths
    torch.manual_seed(0)
    responses = trainer.generate(queries(tiny_tokenizer, 8), return_prompt=False, max_new_tokens=8, eos_token_id=stops)
    for response in responses:
        ends = [index for index, token in enumerate(response.tolist()) if token in stops]
        assert ends == [] and len(response) == 8 or ends == [len(response) - 1]
    assert len({len(response) for response in responses}) >= 2


@needs_greedy_and_roles
def test_greedy_and_reference_responses_match_plain_greedy_generation(tmp_path, tiny_tokenizer):
    model = value_head_model()
    policy, base = plain_policy(model), build_tiny_model("tiny")
    trainer = trainer_for(tmp_path, tiny_tokenizer, model=model)
    prompts = queries(tiny_tokenizer, 3)
    batched, reference = trainer.generate(prompts, batch_size=3, return_prompt=False, generate_ref_response=True,
                                          do_sample=False, max_new_tokens=6)
    singles = [trainer.generate(prompt, do_sample=False, max_new_tokens=6)[0] for prompt in prompts]
    for prompt, response, ref_response, single in zip(prompts, batched, reference, singles):
        with torch.no_grad():
            expected = policy.generate(input_ids=prompt[None], do_sample=False, max_new_tokens=6)[0, len(prompt):]
            expected_ref = base.generate(input_ids=prompt[None], do_sample=False, max_new_tokens=6)[0, len(prompt):]
        assert torch.equal(response, expected) and torch.equal(ref_response, expected_ref)
        assert torch.equal(single, torch.cat([prompt, response]))
    assert any(not torch.equal(a, b) for a, b in zip(batched, reference))
    with torch.no_grad():
        greedy = model.generate(prompts[0][None], do_sample=False, max_new_tokens=6)
    assert torch.equal(greedy[0], singles[0])


# --------------------------------------------------------------------------- 9, 10. step


def test_step_returns_every_trl_0_11_key_with_its_meaning(tmp_path, tiny_tokenizer):
    """Logprobs against the plain peft policy and the bare base, run row by row without padding; the
    derived keys against their TRL 0.11 definitions."""
    model = value_head_model()
    policy, base = plain_policy(model), build_tiny_model("tiny")
    trainer = trainer_for(tmp_path, tiny_tokenizer, model=model, score_clip=0.5, init_kl_coef=0.3, adap_kl_ctrl=False)
    prompts, responses = queries(tiny_tokenizer), fixed_responses()
    expected_logprobs = [response_logprobs(policy, q, r) for q, r in zip(prompts, responses)]
    expected_ref = [response_logprobs(base, q, r) for q, r in zip(prompts, responses)]
    raw = [torch.tensor(2.0), torch.tensor(-0.2), torch.tensor(0.1), torch.tensor(-3.0)]
    stats = trainer.step(prompts, responses, raw)
    assert all(key in stats for key in (*TRL_0_11_STATS, *NATIVE_STATS))
    for row, (logprobs, ref) in enumerate(zip(expected_logprobs, expected_ref)):
        length = len(logprobs)
        assert np.allclose(stats["objective/logprobs"][row, :length], logprobs.numpy(), atol=1e-5)
        assert np.allclose(stats["objective/ref_logprobs"][row, :length], ref.numpy(), atol=1e-5)
        assert not stats["objective/logprobs"][row, length:].any()
    kl = np.array([(lp - ref).sum().item() for lp, ref in zip(expected_logprobs, expected_ref)])
    assert np.allclose(stats["objective/kl_dist"], kl, atol=1e-4)
    assert stats["objective/kl"] == pytest.approx(kl.mean(), abs=1e-4)
    tokens = sum(len(r) for r in responses)
    assert stats["ppo/mean_non_score_reward"] == pytest.approx(-0.3 * kl.sum() / tokens, abs=1e-4)
    clipped = torch.stack(raw).clamp(-0.5, 0.5)
    assert stats["ppo/mean_scores"] == pytest.approx(clipped.mean().item())  # after clipping, as TRL 0.11
    assert stats["ppo/std_scores"] == pytest.approx(clipped.std().item(), rel=1e-6)
    assert stats["objective/scores"] == pytest.approx(torch.stack(raw).mean().item())  # native: raw scores
    assert stats["tokens/queries_len_mean"] == pytest.approx(np.mean([len(q) for q in prompts]))
    assert stats["tokens/responses_dist"].tolist() == [len(r) for r in responses]
    assert stats["ppo/val/var_explained"] == pytest.approx(1 - stats["ppo/val/error"] / stats["ppo/returns/var"])
    assert stats["ppo/loss/total"] == pytest.approx(stats["ppo/loss/policy"] + 0.1 * stats["ppo/loss/value"])
    # the same mini-batches as the native losses, computed separately from the recorded tensors
    assert stats["ppo/loss/policy"] == pytest.approx(stats["loss/policy_avg"], abs=1e-6)
    assert stats["ppo/loss/value"] == pytest.approx(stats["loss/value_avg"], abs=1e-6)
    assert stats["ppo/policy/ratio"].shape == stats["ppo/policy/advantages"].shape == (2 * tokens,)  # ppo_epochs=2
    assert stats["ppo/learning_rate"] == 1e-3 and stats["objective/kl_coef"] == 0.3
    assert stats["time/ppo/total"] >= stats["time/ppo/forward_pass"] + stats["time/ppo/optimize_step"] > 0


def test_response_masks_narrow_the_trained_tokens(tmp_path, tiny_tokenizer):
    trainer = trainer_for(tmp_path, tiny_tokenizer)
    responses = fixed_responses()
    masks = [torch.tensor([1] * (len(r) - 1) + [0]) for r in responses]
    stats = trainer.step(queries(tiny_tokenizer), responses, [torch.tensor(1.0)] * 4, masks)
    assert stats["ppo/policy/ratio"].shape == (2 * sum(len(r) - 1 for r in responses),)


def test_step_checks_its_inputs_like_trl_0_11(tmp_path, tiny_tokenizer):
    trainer = trainer_for(tmp_path, tiny_tokenizer, batch_size=2, mini_batch_size=2)
    prompts, responses = queries(tiny_tokenizer, 2), fixed_responses(2)
    ok = [torch.tensor(1.0), torch.tensor(0.0)]
    cases = (
        ((tuple(prompts), responses, ok), "queries must be a list of tensors"),
        ((prompts, responses, [1.0, 0.0]), "Elements in scores must be tensors"),
        ((prompts + prompts[:1], responses, ok), r"Batch size \(2\) does not match number of examples - but got 3"),
        ((prompts, responses[:1], ok), "got 1 for: responses"),
        ((prompts, responses, [torch.tensor([[1.0]]), torch.tensor([[0.0]])]), "Scores must be 1-dimensional"),
        ((prompts, responses, [torch.tensor([1.0, 2.0]), torch.tensor([0.0])]), "Scores must be 1-dimensional"),
        (([prompts[0][None], prompts[1]], responses, ok), r"queries\[0\] must be a non-empty 1-D tensor"),
        ((prompts, [responses[0].float(), responses[1]], ok), r"responses\[0\] must be"),
    )
    for arguments, message in cases:
        with pytest.raises(ValueError, match=message):
            trainer.step(*arguments)
    checked = trainer._step_safety_checker(2, prompts, responses, [torch.tensor([1.0]), torch.tensor([0.0])])
    assert [score.shape for score in checked[2]] == [(), ()]  # 1-element scores are squeezed, as TRL 0.11
    assert "ppo/mean_scores" in trainer.step(prompts, responses, [torch.tensor([1.0]), torch.tensor([0.0])])


def test_gradient_accumulation_matches_one_larger_minibatch(tmp_path, tiny_tokenizer):
    """TRL 0.11's test_grad_accumulation: batch 2 as one mini-batch, or two accumulated mini-batches of 1
    (responses of one length, so a mean over the tokens of both equals the mean of the two means)."""
    responses = [torch.tensor([11, 12, 13, 14]), torch.tensor([21, 22, 23, 24])]

    def update(**config):
        model = value_head_model()
        before = [p.detach().clone() for p in model.trainable_parameters()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            trainer = PPOTrainer(trl_config(tmp_path, batch_size=2, ppo_epochs=1, **config), model,
                                 tokenizer=tiny_tokenizer, optimizer=torch.optim.SGD(model.trainable_parameters(), lr=1.0))
        stats = trainer.step(queries(tiny_tokenizer, 2), responses, [torch.tensor(1.0), torch.tensor(-1.0)])
        assert stats["policy/optimizer_steps"] == 1
        return torch.cat([(p - b).flatten() for p, b in zip(model.trainable_parameters(), before)])

    together = update(mini_batch_size=2)
    accumulated = update(mini_batch_size=1, gradient_accumulation_steps=2)
    assert together.abs().max() > 1e-4
    assert torch.allclose(together, accumulated, rtol=1e-4, atol=1e-7)


def test_log_stats_logs_scalars_and_reward_moments(tmp_path, tiny_tokenizer):
    trainer = trainer_for(tmp_path, tiny_tokenizer)
    rewards = [torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.5), torch.tensor(-1.0)]
    stats = trainer.step(queries(tiny_tokenizer), fixed_responses(), rewards)
    trainer.log_stats(stats, {"query": ["q"] * 4, "response": ["r"] * 4}, rewards)
    logged = trainer.state.log_history[-1]
    assert logged["env/reward_mean"] == pytest.approx(0.125)
    assert logged["env/reward_std"] == pytest.approx(torch.stack(rewards).std().item())
    assert logged["ppo/mean_scores"] == pytest.approx(stats["ppo/mean_scores"])
    assert "objective/kl_dist" not in logged and logged["loss/policy_avg"] == pytest.approx(stats["loss/policy_avg"])


# --------------------------------------------------------------------------- the example scripts


def hh_folder(root: Path, rows: int = 1600) -> Path:
    """A local hh-rlhf "dataset name": a folder with train.jsonl (1% of 1600 rows = two batches of 8)."""
    folder = root / "hh-rlhf"
    folder.mkdir(parents=True, exist_ok=True)
    write_tiny_hh_rlhf(folder / "train.jsonl", rows, seed=5)
    return folder


def test_the_ppo_multi_adapter_example_runs_with_a_two_label_and_a_one_label_adapter(tmp_path,
                                                                                     tiny_reward_adapter_dir):
    """examples/trl_011_ppo_multi_adapter.py: TRL 0.11.4's ppo_multi_adapter.py, imports changed, CPU settings."""
    example = load_module(EXAMPLES / "trl_011_ppo_multi_adapter.py")
    base, adapter = tiny_reward_adapter_dir.base_model_dir, tiny_reward_adapter_dir.adapter_dir
    legacy = two_label_copy(adapter, tmp_path / "legacy")
    dataset = hh_folder(tmp_path)
    common = ["--model_name", str(base), "--dataset_name", str(dataset), "--quantization", "none",
              "--batch_size", "8", "--mini_batch_size", "2", "--gradient_accumulation_steps", "2",
              "--learning_rate", "1e-5", "--max_new_tokens", "8", "--ppo_epochs", "2"]
    runs = {}
    for name, adapter_dir, label in (("two", legacy, "1"), ("one", adapter, "0")):
        output = tmp_path / f"out-{name}"
        runs[name] = example.main([*common, "--rm_adapter", str(adapter_dir), "--reward_label", label,
                                   "--output_dir", str(output)])
        trainer, history = runs[name]
        assert len(history) == 2 == trainer.state.global_step
        assert all(key in history[-1] for key in TRL_0_11_STATS)
        assert (output / "multiadapter.json").is_file() and (output / "tokenizer_config.json").is_file()
        assert trainer.args.max_grad_norm == 0.0 and trainer.config.batch_size == 8
    # column 1 of the 2-label head is the 1-label head: the same PPO run, the same scores
    assert runs["two"][1][0]["ppo/mean_scores"] == pytest.approx(runs["one"][1][0]["ppo/mean_scores"], abs=1e-5)


def test_the_trl_0_11_style_notebook_loop_runs(tmp_path, tiny_reward_adapter_dir):
    example = load_module(EXAMPLES / "trl_011_style_loop.py")
    trainer = example.main(str(tiny_reward_adapter_dir.base_model_dir), str(tiny_reward_adapter_dir.adapter_dir),
                           steps=2, batch_size=4, output_dir=str(tmp_path / "saved"))
    assert trainer.state.global_step == 2
    assert len([entry for entry in trainer.state.log_history if "env/reward_mean" in entry]) == 2
    assert (tmp_path / "saved" / "multiadapter.json").is_file()
