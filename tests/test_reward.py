"""Reward-adapter stage: planted preference, independent scoring, saved format, reload, `reward` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_multiadapter.reward import (
    COMPLETE_MARKER,
    REWARD_METRICS_FILE,
    RewardAdapterConfig,
    check_score_head_saved,
    is_reward_adapter_complete,
    load_reward_result,
    pairwise_metrics,
    prepare_reward_tokenizer,
    score_sequences,
    train_reward_adapter,
)
from trl_multiadapter.testing import build_tiny_model, build_tiny_tokenizer
from trl_multiadapter.testing.tokenizer import BOS_TOKEN_ID, EOT_TOKEN_ID, PAD_TOKEN_ID
from trl_multiadapter.testing.words import DISMISSIVE_WORDS, HELPFUL_WORDS

LINEAR_LAYERS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# ------------------------------------------------------------------------------------------ helpers


def chat_ids(tokenizer, pair: dict, side: str) -> list[int]:
    """Token ids of prompt + one answer, encoded independently of TRL with the chat template."""
    return tokenizer.apply_chat_template(pair["prompt"] + pair[side], tokenize=True, return_dict=False)


def load_trained_reward_model(base_model_dir, adapter_dir):
    """The trained reward model rebuilt the plain peft way: seq-cls base + adapter, eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(
        base_model_dir, num_labels=1, dtype=torch.float32
    )
    base.config.pad_token_id = PAD_TOKEN_ID
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def unpadded_scores(model, sequences) -> torch.Tensor:
    """One sequence per forward, no padding at all: the reference every padded path is compared with."""
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([ids])).logits[0, 0].float() for ids in sequences])


def padded_batch(sequences, side: str):
    longest = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), longest), PAD_TOKEN_ID)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, ids in enumerate(sequences):
        span = slice(0, len(ids)) if side == "right" else slice(longest - len(ids), longest)
        input_ids[row, span] = torch.tensor(ids)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


# ------------------------------------------------------------------- the session-trained adapter


def test_reward_adapter_learns_the_planted_preference(tiny_reward_adapter_dir):
    metrics = tiny_reward_adapter_dir.result.metrics
    wall = tiny_reward_adapter_dir.wall_seconds
    print(
        f"\nreward stage: {metrics['train_runtime']:.1f}s training, {wall:.1f}s wall, held-out accuracy "
        f"{metrics['eval_pairwise_accuracy']:.3f}, margin {metrics['eval_mean_margin']:.3f}"
    )
    assert metrics["eval_pairwise_accuracy"] >= 0.9
    assert metrics["eval_mean_margin"] > 0


def test_held_out_metrics_match_unpadded_rescoring_and_the_trainer(tiny_reward_adapter_dir, tiny_tokenizer):
    fixture = tiny_reward_adapter_dir
    model = load_trained_reward_model(fixture.base_model_dir, fixture.adapter_dir)
    chosen = unpadded_scores(model, [chat_ids(tiny_tokenizer, pair, "chosen") for pair in fixture.eval_pairs])
    rejected = unpadded_scores(
        model, [chat_ids(tiny_tokenizer, pair, "rejected") for pair in fixture.eval_pairs]
    )
    margins = (chosen - rejected).tolist()
    expected_accuracy = sum(margin > 0 for margin in margins) / len(margins)
    expected_margin = sum(margins) / len(margins)

    metrics = fixture.result.metrics
    assert metrics["eval_num_pairs"] == len(fixture.eval_pairs)
    assert metrics["eval_pairwise_accuracy"] == pytest.approx(expected_accuracy, abs=1e-9)
    assert metrics["eval_mean_margin"] == pytest.approx(expected_margin, abs=1e-4)
    # TRL averages per-batch means; the fixture's eval set is a whole number of batches, so they agree.
    assert metrics["trainer_eval_accuracy"] == pytest.approx(expected_accuracy, abs=1e-6)
    assert metrics["trainer_eval_margin"] == pytest.approx(expected_margin, abs=1e-4)


def test_trainer_saw_the_chat_template_tokens_with_one_bos(tiny_reward_adapter_dir, tiny_tokenizer):
    """Every epoch feeds each training pair's chosen and rejected tokens exactly once, nothing more."""
    fixture = tiny_reward_adapter_dir
    per_epoch = 0
    for pair in fixture.train_pairs:
        for side in ("chosen", "rejected"):
            ids = chat_ids(tiny_tokenizer, pair, side)
            assert ids.count(BOS_TOKEN_ID) == 1 and ids[0] == BOS_TOKEN_ID and ids[-1] == EOT_TOKEN_ID
            per_epoch += len(ids)
    metrics = fixture.result.metrics
    assert metrics["train_tokens"] == fixture.config.num_train_epochs * per_epoch
    assert metrics["train_tokens_per_second"] == pytest.approx(
        metrics["train_tokens"] / metrics["train_runtime"]
    )


def test_saved_directory_is_a_seq_cls_adapter_with_its_score_head(tiny_reward_adapter_dir, tiny_tokenizer):
    from transformers import AutoTokenizer

    adapter_dir = tiny_reward_adapter_dir.adapter_dir
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS"
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (8, 32)
    assert adapter_config["lora_dropout"] == pytest.approx(0.1)
    targets = adapter_config["target_modules"]  # peft records "all-linear" as the layers it found
    assert {name.rsplit(".", 1)[-1] for name in targets} == LINEAR_LAYERS
    assert len(targets) == 2 * len(
        LINEAR_LAYERS
    )  # the tiny model's 2 decoder layers; the score head is excluded
    assert "score" in adapter_config["modules_to_save"]

    head_keys = check_score_head_saved(adapter_dir)
    from safetensors.torch import load_file

    weights = load_file(adapter_dir / "adapter_model.safetensors")
    (head_key,) = head_keys
    assert weights[head_key].shape == (1, 64)  # (num_labels, hidden_size)
    lora_modules = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in weights if ".lora_" in key}
    assert lora_modules == LINEAR_LAYERS

    saved_tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    assert saved_tokenizer.pad_token_id == PAD_TOKEN_ID
    assert saved_tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    assert saved_tokenizer.chat_template == tiny_tokenizer.chat_template

    saved = json.loads((adapter_dir / REWARD_METRICS_FILE).read_text())
    assert saved["metrics"] == pytest.approx(tiny_reward_adapter_dir.result.metrics)
    assert saved["config"]["lora_r"] == 8
    assert is_reward_adapter_complete(adapter_dir)
    assert load_reward_result(adapter_dir).metrics == saved["metrics"]


def test_trained_scores_equal_the_merged_plain_model(tiny_reward_adapter_dir, tiny_tokenizer):
    fixture = tiny_reward_adapter_dir
    sequences = [chat_ids(tiny_tokenizer, pair, "chosen") for pair in fixture.eval_pairs[:6]]
    adapter_model = load_trained_reward_model(fixture.base_model_dir, fixture.adapter_dir)
    merged = load_trained_reward_model(fixture.base_model_dir, fixture.adapter_dir).merge_and_unload().eval()
    assert type(merged).__name__ == "LlamaForSequenceClassification"
    input_ids, attention_mask = padded_batch(sequences, "right")
    with torch.no_grad():
        merged_scores = merged(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    torch.testing.assert_close(
        score_sequences(adapter_model, sequences, PAD_TOKEN_ID, 4), merged_scores, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(unpadded_scores(adapter_model, sequences), merged_scores, atol=1e-5, rtol=0)


def test_multi_adapter_model_reloads_identical_scores(tiny_reward_adapter_dir, tiny_tokenizer):
    from peft import LoraConfig

    from trl_multiadapter.model import MultiAdapterModel

    fixture = tiny_reward_adapter_dir
    sequences = [
        chat_ids(tiny_tokenizer, pair, side)
        for pair in fixture.eval_pairs[:5]
        for side in ("chosen", "rejected")
    ]
    expected = unpadded_scores(
        load_trained_reward_model(fixture.base_model_dir, fixture.adapter_dir), sequences
    )
    multi = MultiAdapterModel.from_pretrained(
        str(fixture.base_model_dir),
        policy_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        reward_adapter=str(fixture.adapter_dir),
    )
    for side in ("right", "left"):
        input_ids, attention_mask = padded_batch(sequences, side)
        with torch.no_grad():
            scores = multi.score(input_ids, attention_mask)
        assert scores.dtype == torch.float32
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------ a second, short run: model-object input


@pytest.fixture(scope="module")
def short_run_from_model_object(tmp_path_factory):
    """Two epochs on 20 pairs from a causal LM object and a tokenizer whose pad token is the EOS."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    causal_lm = build_tiny_model("tiny", task="causal", seed=0)
    before = {name: tensor.clone() for name, tensor in causal_lm.state_dict().items()}
    pairs = synthetic_pairs(20, seed=3)
    output_dir = tmp_path_factory.mktemp("reward-from-object")
    (output_dir / COMPLETE_MARKER).write_text("stale")
    config = RewardAdapterConfig(
        num_train_epochs=1,
        per_device_train_batch_size=4,
        gradient_checkpointing=False,
        eval_fraction=0.25,
        logging_steps=1,
        disable_tqdm=True,
        seed=7,
    )
    result = train_reward_adapter(causal_lm, pairs, tokenizer, output_dir, config)
    return result, causal_lm, before, tokenizer, pairs


def test_model_object_and_tokenizer_are_left_unchanged(short_run_from_model_object):
    _, causal_lm, before, tokenizer, _ = short_run_from_model_object
    after = causal_lm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not any("lora" in name for name, _ in causal_lm.named_modules())
    assert tokenizer.pad_token_id == EOT_TOKEN_ID  # the caller's copy keeps its (bad) pad token


def test_eval_fraction_holds_out_a_share_of_the_pairs(short_run_from_model_object):
    result, *_ = short_run_from_model_object
    metrics = result.metrics
    assert (metrics["train_pairs"], metrics["eval_pairs"], metrics["eval_num_pairs"]) == (15, 5, 5)
    assert metrics["train_pairs_dropped_too_long"] == metrics["eval_pairs_dropped_too_long"] == 0


def test_the_marker_of_a_finished_run_replaces_a_stale_one(short_run_from_model_object):
    result, *_ = short_run_from_model_object
    assert (result.output_dir / COMPLETE_MARKER).read_text() != "stale"
    assert load_reward_result(result.output_dir).metrics == pytest.approx(result.metrics)
    saved = json.loads((result.output_dir / REWARD_METRICS_FILE).read_text())["config"]
    assert (saved["seed"], saved["lora_target_modules"], saved["eval_fraction"]) == (7, "all-linear", 0.25)
    assert saved["optim"] == RewardAdapterConfig().optim  # every TrainingArguments field is recorded


def test_a_distinct_pad_token_is_chosen_when_pad_is_eos(short_run_from_model_object):
    from transformers import AutoTokenizer

    result, *_ = short_run_from_model_object
    assert AutoTokenizer.from_pretrained(result.output_dir).pad_token_id == PAD_TOKEN_ID


# ------------------------------------------------------------------------------- small pieces


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question = f"what about the item number {rng.randint(0, 99)}?"
        body = " ".join(
            rng.choice(("the", "garden", "river", "and", "with")) for _ in range(rng.randint(1, 5))
        )
        rows.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": f"{rng.choice(HELPFUL_WORDS)} {body}"}],
                "rejected": [{"role": "assistant", "content": f"{rng.choice(DISMISSIVE_WORDS)} {body}"}],
            }
        )
    return rows


@given(st.lists(st.tuples(st.floats(-50, 50), st.floats(-50, 50)), min_size=1, max_size=30))
def test_pairwise_metrics_against_a_loop(pairs):
    chosen = torch.tensor([c for c, _ in pairs], dtype=torch.float64)
    rejected = torch.tensor([r for _, r in pairs], dtype=torch.float64)
    wins = 0
    total_margin = 0.0
    for c, r in zip(chosen.float().tolist(), rejected.float().tolist()):
        wins += c > r  # a tie is not a win
        total_margin += c - r
    metrics = pairwise_metrics(chosen, rejected, prefix="eval_")
    assert metrics["eval_pairwise_accuracy"] == pytest.approx(wins / len(pairs))
    assert metrics["eval_mean_margin"] == pytest.approx(total_margin / len(pairs), abs=1e-4)
    assert metrics["eval_num_pairs"] == len(pairs)


def test_pairwise_metrics_rejects_empty_and_mismatched_inputs():
    with pytest.raises(ValueError, match="max_length"):
        pairwise_metrics(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="2 chosen scores but 3"):
        pairwise_metrics(torch.zeros(2), torch.zeros(3))


@pytest.fixture(scope="module")
def tiny_seq_cls_model():
    from transformers import LlamaForSequenceClassification

    from trl_multiadapter.testing import tiny_llama_config

    torch.manual_seed(1)
    return LlamaForSequenceClassification(tiny_llama_config("tiny"))


@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    batch_size=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_batched_right_padded_scores_equal_unpadded_scores(tiny_seq_cls_model, lengths, batch_size, seed):
    generator = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(6, 1024, (length,), generator=generator).tolist() for length in lengths]
    tiny_seq_cls_model.train()
    scores = score_sequences(tiny_seq_cls_model, sequences, PAD_TOKEN_ID, batch_size)
    assert tiny_seq_cls_model.training  # the caller's mode is restored
    tiny_seq_cls_model.eval()
    torch.testing.assert_close(scores, unpadded_scores(tiny_seq_cls_model, sequences), atol=1e-5, rtol=0)


def test_check_score_head_saved_rejects_an_adapter_without_head(tmp_path):
    from safetensors.torch import save_file

    save_file(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 4)},
        tmp_path / "adapter_model.safetensors",
    )
    with pytest.raises(RuntimeError, match="no 'score' head"):
        check_score_head_saved(tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        check_score_head_saved(tmp_path / "missing")


def test_prepare_reward_tokenizer_copies_and_fixes_the_pad_token():
    tokenizer = build_tiny_tokenizer()
    assert prepare_reward_tokenizer(tokenizer).pad_token_id == PAD_TOKEN_ID  # already distinct: kept
    tokenizer.pad_token = tokenizer.eos_token
    fixed = prepare_reward_tokenizer(tokenizer)
    assert (fixed.pad_token_id, tokenizer.pad_token_id) == (PAD_TOKEN_ID, EOT_TOKEN_ID)


def test_prepare_reward_tokenizer_explains_when_no_pad_token_exists():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<eos>": 0, "a": 1}, unk_token=None))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    with pytest.raises(ValueError, match="pad_token"):
        prepare_reward_tokenizer(tokenizer)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lora_r": 0}, "reward.lora_r"),
        ({"lora_dropout": 1.0}, "reward.lora_dropout"),
        ({"eval_fraction": 1.0}, "reward.eval_fraction"),
        ({"max_length": 1}, "reward.max_length"),
        ({"learning_rate": 0.0}, "reward.learning_rate"),
        ({"max_steps": 0}, "reward.max_steps"),
        ({"per_device_train_batch_size": 0}, "reward.per_device_train_batch_size"),
        ({"dtype": "fp8"}, "reward.dtype"),
        ({"eval_steps": 0}, "reward.eval_steps"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        RewardAdapterConfig(**overrides)


def test_lora_config_targets_all_linear_layers_and_saves_the_score_head():
    lora = RewardAdapterConfig().lora_config()
    assert (lora.task_type, lora.r, lora.lora_alpha, lora.lora_dropout) == ("SEQ_CLS", 8, 32, 0.1)
    assert lora.target_modules == "all-linear" and "score" in lora.modules_to_save


def test_defaults_follow_the_seed_recipe():
    config = RewardAdapterConfig()
    assert (config.learning_rate, config.max_length) == (2e-4, 512)


def test_config_is_trl_reward_config_with_the_stage_defaults():
    from trl import RewardConfig

    ours, trl_defaults = RewardAdapterConfig(), RewardConfig(output_dir="unused", use_cpu=True, bf16=False)
    assert isinstance(ours, RewardConfig)
    differing = {"learning_rate": 2e-4, "num_train_epochs": 1.0, "max_length": 512, "disable_dropout": False,
                 "save_strategy": "no", "include_num_input_tokens_seen": "non_padding"}
    for name, value in differing.items():
        assert getattr(ours, name) == value != getattr(trl_defaults, name), name
    # everything else is TRL's (and transformers') own default, not a copy of it
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_grad_norm", "optim",
                 "lr_scheduler_type", "warmup_steps", "weight_decay", "logging_steps", "seed", "report_to",
                 "center_rewards_coefficient", "max_steps", "gradient_checkpointing"):
        assert getattr(ours, name) == getattr(trl_defaults, name), name
    assert (ours.lora_r, ours.lora_alpha, ours.lora_dropout, ours.lora_target_modules) == (8, 32, 0.1, "all-linear")


def test_training_arguments_reach_the_trainer_copy(tmp_path):
    config = RewardAdapterConfig(optim="adafactor", warmup_steps=0.25, eval_strategy="epoch", seed=5,
                                 gradient_checkpointing=False)
    args = config.reward_config(tmp_path / "out", evaluate=True, model_init_kwargs={"dtype": "float32"})
    assert isinstance(args, RewardAdapterConfig) and args is not config
    assert (args.optim, args.warmup_steps, args.eval_strategy, args.data_seed) == ("adafactor", 0.25, "epoch", 5)
    assert (args.output_dir, args.model_init_kwargs) == (str(tmp_path / "out"), {"dtype": "float32"})
    assert args.activation_checkpointing is False and args.save_strategy == "no"
    # no held-out pairs: no evaluation at all, whatever the strategy; eval_steps alone means "steps"
    assert config.reward_config(tmp_path, evaluate=False).eval_strategy == "no"
    periodic = RewardAdapterConfig(eval_steps=5).reward_config(tmp_path, evaluate=True)
    assert (periodic.eval_strategy, periodic.eval_steps) == ("steps", 5)
    assert RewardAdapterConfig(eval_steps=5).reward_config(tmp_path, evaluate=False).eval_steps is None


def test_use_cpu_and_bf16_follow_the_device_decision(monkeypatch):
    from trl_multiadapter import devices

    monkeypatch.setattr(devices, "cuda_available", lambda: False)
    config = RewardAdapterConfig()
    assert config.use_cpu and config.bf16 is False  # None: bf16 only where a GPU supports it
    assert RewardAdapterConfig(bf16=True).bf16 is True  # an explicit choice stays


def test_gradient_checkpointing_key_is_carried_over_without_a_deprecation_warning():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gradient_checkpointing.*", category=FutureWarning)
        off = RewardAdapterConfig(gradient_checkpointing=False)
        on = RewardAdapterConfig()
    assert (off.activation_checkpointing, on.activation_checkpointing) == (False, True)
    assert RewardAdapterConfig(activation_checkpointing=False).gradient_checkpointing is False


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ([{"prompt": [], "answer": []}], "needs 'chosen' and 'rejected'"),
        ([], "train_dataset is empty"),
        ("pairs.jsonl", "datasets.Dataset or a list of dicts"),
    ],
)
def test_bad_training_data_is_reported_before_any_work(tmp_path, dataset, message):
    with pytest.raises((ValueError, TypeError), match=message):
        train_reward_adapter(build_tiny_model(), dataset, build_tiny_tokenizer(), tmp_path)


def test_conversational_data_needs_a_chat_template(tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        train_reward_adapter(build_tiny_model(), synthetic_pairs(4, 0), tokenizer, tmp_path)


def test_too_small_held_out_share_is_reported(tmp_path):
    config = RewardAdapterConfig(eval_fraction=0.05)
    with pytest.raises(ValueError, match="eval_fraction=0.05 of 4 pairs"):
        train_reward_adapter(
            build_tiny_model(), synthetic_pairs(4, 0), build_tiny_tokenizer(), tmp_path, config
        )


def test_pairs_longer_than_max_length_are_reported(tmp_path):
    config = RewardAdapterConfig(max_length=8, gradient_checkpointing=False, disable_tqdm=True)
    with pytest.raises(ValueError, match="longer than reward.max_length"):
        train_reward_adapter(
            build_tiny_model(), synthetic_pairs(10, 0), build_tiny_tokenizer(), tmp_path, config
        )
    assert not is_reward_adapter_complete(tmp_path)


def test_model_object_must_be_plain(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(build_tiny_model(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already a PeftModel"):
        train_reward_adapter(peft_model, synthetic_pairs(10, 0), build_tiny_tokenizer(), tmp_path)
    from transformers import LlamaForSequenceClassification

    from trl_multiadapter.testing import tiny_llama_config

    two_labels = LlamaForSequenceClassification(tiny_llama_config("tiny", num_labels=2))
    with pytest.raises(ValueError, match="num_labels=1"):
        train_reward_adapter(two_labels, synthetic_pairs(10, 0), build_tiny_tokenizer(), tmp_path)
    with pytest.raises(ValueError, match="tokenizer="):
        train_reward_adapter(build_tiny_model(), synthetic_pairs(10, 0), None, tmp_path)


def test_pre_rendered_text_with_a_second_bos_is_reported(tmp_path):
    """Plain-text pairs rendered with the chat template already hold BOS; the tokenizer would add another."""
    tokenizer = build_tiny_tokenizer()
    rendered = [
        {
            side: tokenizer.apply_chat_template(pair["prompt"] + pair[side], tokenize=False)
            for side in ("chosen", "rejected")
        }
        for pair in synthetic_pairs(10, 0)
    ]
    config = RewardAdapterConfig(gradient_checkpointing=False, disable_tqdm=True)
    with pytest.raises(ValueError, match="two BOS tokens"):
        train_reward_adapter(build_tiny_model(), rendered, tokenizer, tmp_path, config)


def test_model_kwargs_reach_from_pretrained_and_need_a_path(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="no_such_kernel"):
        train_reward_adapter(
            str(tiny_model_dir),
            synthetic_pairs(10, 0),
            None,
            tmp_path,
            model_kwargs={"attn_implementation": "no_such_kernel"},
        )
    with pytest.raises(ValueError, match="only apply when `model` is a hub id or path"):
        train_reward_adapter(
            build_tiny_model(),
            synthetic_pairs(10, 0),
            build_tiny_tokenizer(),
            tmp_path,
            model_kwargs={"revision": "main"},
        )


# --------------------------------------------------------------------------- the `reward` command


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "trl_multiadapter", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd,
    )


@pytest.fixture
def tiny_reward_recipe(tmp_path, tiny_model_dir):
    """A recipe that runs the data and reward stages on hh-rlhf files and the saved tiny model."""
    from trl_multiadapter.testing import write_tiny_hh_rlhf

    write_tiny_hh_rlhf(tmp_path / "hh" / "train.jsonl", 48, seed=2)
    write_tiny_hh_rlhf(tmp_path / "hh" / "test.jsonl", 16, seed=3)
    recipe = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {
            "preference": {
                "source": "hh_rlhf",
                "path": str(tmp_path / "hh"),
                "data_dir": None,
                "eval_split": "test",
                "max_length": 256,
            },
            "prompts": {
                "source": "synthetic_squad",
                "path": None,
                "max_prompt_length": 256,
                "options": {"train_size": 4, "eval_size": 4},
            },
        },
        "reward": {
            "learning_rate": 1e-3,
            "num_train_epochs": 1,
            "gradient_checkpointing": False,
            "max_length": 256,
        },
        "output_dir": str(tmp_path / "run"),
        "stages": ["data", "reward"],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_reward_command_trains_the_recipe_adapter(tiny_reward_recipe, tiny_model_dir, tiny_tokenizer):
    from trl_multiadapter.data import load_hh_rlhf

    folder = tiny_reward_recipe.parent
    completed = run_cli("reward", "--config", str(tiny_reward_recipe), "--set", "reward.seed=3", cwd=folder)
    assert completed.returncode == 0, completed.stderr[-3000:]
    adapter_dir = folder / "run" / "reward"
    assert is_reward_adapter_complete(adapter_dir)
    metrics = load_reward_result(adapter_dir).metrics
    assert json.loads((adapter_dir / REWARD_METRICS_FILE).read_text())["config"]["seed"] == 3

    held_out = load_hh_rlhf(folder / "hh" / "test.jsonl").to_list()
    model = load_trained_reward_model(tiny_model_dir, adapter_dir)
    margins = (
        unpadded_scores(model, [chat_ids(tiny_tokenizer, pair, "chosen") for pair in held_out])
        - unpadded_scores(model, [chat_ids(tiny_tokenizer, pair, "rejected") for pair in held_out])
    ).tolist()
    assert metrics["eval_num_pairs"] == len(held_out) == 16
    assert metrics["eval_pairwise_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert metrics["eval_mean_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)


def test_reward_command_reports_an_unknown_reward_key(tiny_reward_recipe):
    completed = run_cli(
        "reward",
        "--config",
        str(tiny_reward_recipe),
        "--set",
        "reward.lora_rank=4",
        cwd=tiny_reward_recipe.parent,
    )
    assert completed.returncode != 0
    assert "reward.lora_rank" in completed.stderr and "lora_r" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not (tiny_reward_recipe.parent / "run" / "reward").exists()
