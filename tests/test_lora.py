"""The one LoRA source: field declarations, the LoraConfig builders, one policy default everywhere."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trl_multiadapter import lora

PEFT_FIELDS = ("task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "bias")


def peft_fields(config) -> dict:
    return {name: getattr(config, name) for name in PEFT_FIELDS}


def fields(r=4, alpha=8, dropout=0.25, targets=("q_proj", "v_proj")):
    return SimpleNamespace(lora_r=r, lora_alpha=alpha, lora_dropout=dropout,
                           lora_target_modules=list(targets) if isinstance(targets, (list, tuple)) else targets)


def test_each_role_builds_what_peft_builds_by_hand():
    from peft import LoraConfig

    given_fields = fields()
    by_hand = {
        "policy": LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.25,
                             target_modules=["q_proj", "v_proj"]),
        "critic": LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.25,
                             target_modules=["q_proj", "v_proj"]),
        "reward": LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.25,
                             target_modules=["q_proj", "v_proj"], modules_to_save=["score"]),
    }
    built = {
        "policy": lora.policy_lora_config(given_fields),
        "critic": lora.critic_lora_config(given_fields),
        "reward": lora.reward_lora_config(given_fields),
    }
    for role in by_hand:
        assert peft_fields(built[role]) == peft_fields(by_hand[role]), role
    assert given_fields.lora_target_modules == ["q_proj", "v_proj"]  # the caller's list is not peft's set


def test_none_targets_mean_all_linear():
    assert lora.policy_lora_config(fields(targets=None)).target_modules == "all-linear"
    assert lora.lora_config("CAUSAL_LM", 2, 4, 0.0, None).target_modules == "all-linear"


def test_one_policy_default_everywhere():
    """MultiAdapterModel's default, the recipe's ppo section and LoraArguments agree (dropout included)."""
    from trl_multiadapter import recipe
    from trl_multiadapter.model import default_policy_config

    defaults = lora.LoraArguments()
    assert (defaults.lora_r, defaults.lora_alpha, defaults.lora_dropout, defaults.lora_target_modules) == (
        16, 32, lora.POLICY_LORA_DROPOUT, "all-linear")
    assert lora.POLICY_LORA_DROPOUT == 0.0
    assert peft_fields(default_policy_config()) == peft_fields(lora.policy_lora_config(defaults))
    section = {f.name: f.default for f in dataclasses.fields(recipe.ppo_section_class())}
    assert {name: section[name] for name in lora.LORA_FIELDS} == dataclasses.asdict(defaults)


def test_reward_defaults_keep_the_help_of_the_one_declaration():
    from trl_multiadapter.reward import RewardAdapterConfig

    base = {f.name: f for f in dataclasses.fields(lora.LoraArguments)}
    reward = {f.name: f for f in dataclasses.fields(RewardAdapterConfig)}
    for name in lora.LORA_FIELDS:
        assert reward[name].metadata["help"] == base[name].metadata["help"]
    assert (reward["lora_r"].default, reward["lora_dropout"].default) == (8, 0.1)


@given(r=st.integers(-2, 4), alpha=st.integers(-2, 4), dropout=st.floats(-0.5, 1.5, allow_nan=False))
def test_problems_are_exactly_the_invalid_values(r, alpha, dropout):
    problems = dict(lora.lora_field_problems(fields(r=r, alpha=alpha, dropout=dropout)))
    assert ("lora_r" in problems) == (r < 1)
    assert ("lora_alpha" in problems) == (alpha < 1)
    assert ("lora_dropout" in problems) == (not 0.0 <= dropout < 1.0)
    if problems:
        with pytest.raises(ValueError, match=rf"^reward\.({'|'.join(problems)}) "):
            lora.check_lora_fields(fields(r=r, alpha=alpha, dropout=dropout), "reward")
    else:
        lora.check_lora_fields(fields(r=r, alpha=alpha, dropout=dropout), "reward")


@pytest.mark.parametrize("targets", [[], ["q_proj", ""], [3]])
def test_bad_target_modules_are_named(targets):
    assert dict(lora.lora_field_problems(fields(targets=targets))).keys() == {"lora_target_modules"}
