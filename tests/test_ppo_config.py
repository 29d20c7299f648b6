"""MultiAdapterPPOConfig: defaults, validation messages, and TrlParser round trips."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_multiadapter.ppo_config import KL_ESTIMATORS, MultiAdapterPPOConfig


def make_config(tmp_path, **kwargs) -> MultiAdapterPPOConfig:
    return MultiAdapterPPOConfig(output_dir=str(tmp_path), **kwargs)


def test_issue_example_builds_and_keeps_every_value(tmp_path):
    values = dict(
        learning_rate=1e-5, batch_size=4, mini_batch_size=1, gradient_accumulation_steps=4, ppo_epochs=4,
        init_kl_coef=0.2, adap_kl_ctrl=True, target=6, horizon=10000, kl_estimator="k1", gamma=1.0, lam=0.95,
        cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, whiten_rewards=False, temperature=1.0, top_k=0,
        top_p=1.0, max_new_tokens=32, stop_token="eos", missing_eos_penalty=None, ratio_threshold=10.0,
        max_grad_norm=1.0, seed=0,
    )
    config = make_config(tmp_path, **values)
    assert {key: getattr(config, key) for key in values} == values
    assert config.backward_batch_size == 1 * 4


def test_defaults_follow_trl_0_11_ppo_config(tmp_path):
    # The values of trl==0.11.4's PPOConfig, so migrated configs behave the same.
    config = make_config(tmp_path)
    assert (config.ppo_epochs, config.init_kl_coef, config.adap_kl_ctrl, config.target, config.horizon) == (
        4, 0.2, True, 6, 10000,
    )
    assert (config.gamma, config.lam, config.cliprange, config.cliprange_value, config.vf_coef) == (
        1, 0.95, 0.2, 0.2, 0.1,
    )
    assert (config.ratio_threshold, config.learning_rate, config.whiten_rewards) == (10.0, 1.41e-5, False)
    assert config.bf16 is False and config.report_to in ([], "none", ["none"])


@settings(max_examples=60, deadline=None)
@given(
    batch_size=st.integers(1, 24), mini_batch_size=st.integers(1, 8), accumulation=st.integers(1, 4)
)
def test_batch_arithmetic_is_accepted_exactly_when_divisible(tmp_path_factory, batch_size, mini_batch_size, accumulation):
    kwargs = dict(batch_size=batch_size, mini_batch_size=mini_batch_size, gradient_accumulation_steps=accumulation)
    output_dir = tmp_path_factory.getbasetemp()
    if batch_size % (mini_batch_size * accumulation) == 0:
        assert make_config(output_dir, **kwargs).backward_batch_size == mini_batch_size * accumulation
    else:
        with pytest.raises(ValueError, match="`batch_size`") as error:
            make_config(output_dir, **kwargs)
        assert f"= {mini_batch_size * accumulation})" in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(kl_estimator="kl2"), "'k1', 'kl', 'abs', 'k2', 'mse', 'k3', 'full'"),
        (dict(value_model="mlp"), "'head', 'critic'"),
        (dict(reference="sft"), "'base', 'policy_init'"),
        (dict(rollout_logprobs="exact"), "'generation', 'forward'"),
        (dict(mini_batch_size=0), "`mini_batch_size`"),
        (dict(ppo_epochs=0), "`ppo_epochs`"),
        (dict(temperature=0.0), "`temperature`"),
        (dict(top_p=0.0), "`top_p`"),
        (dict(top_k=-1), "`top_k`"),
        (dict(gamma=1.5), "`gamma`"),
        (dict(lam=-0.1), "`lam`"),
        (dict(cliprange=0), "`cliprange`"),
        (dict(ratio_threshold=0), "`ratio_threshold`"),
        (dict(score_clip=-1.0), "`score_clip`"),
        (dict(use_score_norm=True), "use_score_scaling"),
        (dict(stop_token=None, missing_eos_penalty=1.0), "`missing_eos_penalty`"),
        (dict(stop_token=""), "`stop_token`"),
        (dict(max_new_tokens=0), "`max_new_tokens`"),
        (dict(value_model="head", critic_init="reward"), "`critic_init`"),
        (dict(adap_kl_ctrl=True, target=0), "`target`"),
    ],
)
def test_invalid_values_are_rejected_with_the_field_name(tmp_path, overrides, message):
    with pytest.raises(ValueError) as error:
        make_config(tmp_path, **overrides)
    assert message in str(error.value)


def test_fixed_kl_controller_does_not_need_a_target(tmp_path):
    assert make_config(tmp_path, adap_kl_ctrl=False, target=0).target == 0


def test_config_kl_estimators_are_exactly_the_ones_ppo_math_accepts():
    torch = pytest.importorskip("torch")
    ppo_math = pytest.importorskip("trl_multiadapter.ppo_math")
    logprob, ref_logprob = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    logits = torch.randn(1, 2, 5)
    for name in KL_ESTIMATORS:
        kl = ppo_math.kl_penalty(logprob, ref_logprob, name, logits=logits, ref_logits=logits + 1)
        assert kl.shape == (1, 2)
    with pytest.raises(ValueError):
        ppo_math.kl_penalty(logprob, ref_logprob, "not-an-estimator")


def test_trl_parser_reads_a_flat_yaml_and_command_line_overrides(tmp_path):
    from trl import TrlParser

    config_file = tmp_path / "ppo.yaml"
    config_file.write_text(
        "output_dir: out\n"
        "batch_size: 8\n"
        "mini_batch_size: 2\n"
        "gradient_accumulation_steps: 2\n"
        "kl_estimator: k3\n"
        "stop_token: <|eot_id|>\n"
        "missing_eos_penalty: 1.5\n"
        "reward_weights: [1.0, 0.5]\n"
        "model_init_kwargs: '{\"dtype\": \"bfloat16\"}'\n"
        "report_to: none\n"
        "max_steps: 7\n"
        "bf16: false\n"
    )
    parser = TrlParser(dataclass_types=[MultiAdapterPPOConfig])
    (config,) = parser.parse_args_and_config(["--config", str(config_file), "--learning_rate", "3e-4"])
    assert (config.batch_size, config.mini_batch_size, config.gradient_accumulation_steps) == (8, 2, 2)
    assert (config.kl_estimator, config.stop_token, config.missing_eos_penalty) == ("k3", "<|eot_id|>", 1.5)
    assert config.reward_weights == [1.0, 0.5]
    assert config.model_init_kwargs == {"dtype": "bfloat16"}
    assert (config.learning_rate, config.max_steps, config.bf16) == (3e-4, 7, False)


def test_trl_parser_reports_impossible_batch_arithmetic(tmp_path):
    from trl import TrlParser

    config_file = tmp_path / "ppo.yaml"
    config_file.write_text("output_dir: out\nbatch_size: 6\nmini_batch_size: 4\n")
    parser = TrlParser(dataclass_types=[MultiAdapterPPOConfig])
    with pytest.raises(ValueError, match="multiple of"):
        parser.parse_args_and_config(["--config", str(config_file)])


def test_every_new_field_is_documented():
    from transformers import TrainingArguments

    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    for config_field in dataclasses.fields(MultiAdapterPPOConfig):
        if config_field.name not in inherited:
            assert config_field.metadata.get("help"), config_field.name


def test_config_estimator_names_are_the_ones_ppo_math_dispatches():
    """ppo_config keeps its own copy of the names (no torch import at config time): it must stay equal."""
    from trl_multiadapter import ppo_config, ppo_math

    assert set(ppo_config.ADVANTAGE_ESTIMATORS) == set(ppo_math.ADVANTAGE_ESTIMATORS)
    assert set(ppo_config.CRITIC_FREE_ESTIMATORS) == set(ppo_math.CRITIC_FREE_ESTIMATORS)
    for name in ppo_config.ADVANTAGE_ESTIMATORS:
        assert MultiAdapterPPOConfig(output_dir="out", advantage_estimator=name, report_to="none").critic_free == (
            name in ppo_math.CRITIC_FREE_ESTIMATORS)
