"""The LoRA of every adapter: its four fields, declared once, and the one builder of peft ``LoraConfig``.

``LoraArguments`` declares rank, alpha, dropout and target modules with their help texts; a config class
that trains an adapter inherits it (``RewardAdapterConfig``), and the recipe's ``ppo`` section takes its
policy fields from it. The names are ``trl.ModelConfig``'s (``lora_r``, ``lora_alpha``, ``lora_dropout``,
``lora_target_modules``), so a TRL user's keys carry over.

Every ``LoraConfig`` of the project is built here:

* ``policy_lora_config(fields)``  CAUSAL_LM, the policy adapter (``MultiAdapterModel``'s default too);
* ``critic_lora_config(fields)``  CAUSAL_LM, a separate critic adapter under the value head;
* ``reward_lora_config(fields)``  SEQ_CLS, the 1-label ``score`` head trained and saved with the adapter.

Why not ``trl.ModelConfig`` + ``trl.get_peft_config``: a ``ModelConfig`` describes one model *and* one
adapter (model id, dtype, attention, 4-bit fields next to the LoRA ones), while a run here has one base
(the recipe's ``model`` and ``quantization`` sections) and two or three adapters with different defaults
and task types; its ``lora_target_modules=None`` means peft's per-architecture default (q/v only), ours
is every linear layer; and ``get_peft_config`` adds nothing over one ``LoraConfig`` call.

Policy dropout: 0.0 by default. ``MultiAdapterModel`` keeps every adapter in eval mode, so LoRA dropout
never acts during PPO (rollout and training forwards must see the same function, or the first PPO ratio
is not 1); a non-zero value would only be written into ``adapter_config.json``. The reward adapter trains
with ``trl.RewardTrainer``, where its dropout (0.1) does act unless ``disable_dropout`` is set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from peft import LoraConfig

ALL_LINEAR = "all-linear"
SCORE_HEAD_MODULE = "score"
POLICY_LORA_DROPOUT = 0.0


@dataclass
class LoraArguments:
    """LoRA hyper-parameters of one adapter; the defaults are the policy adapter's."""

    lora_r: int = field(default=16, metadata={"help": "LoRA rank r of the adapter."})
    lora_alpha: int = field(
        default=32, metadata={"help": "LoRA scaling numerator: the adapter's update is scaled by lora_alpha / lora_r."}
    )
    lora_dropout: float = field(
        default=POLICY_LORA_DROPOUT,
        metadata={
            "help": "Dropout on the LoRA input while the adapter trains, in [0, 1). PPO runs every adapter with "
            "dropout off, so it only acts in the reward stage (and there only when disable_dropout is false)."
        },
    )
    lora_target_modules: str | list[str] = field(
        default=ALL_LINEAR,
        metadata={
            "help": "Modules that get the LoRA: 'all-linear' (every linear layer but the output or score head) "
            "or a list of module names (e.g. [q_proj, v_proj, lm_head])."
        },
    )


LORA_FIELDS = tuple(f.name for f in dataclasses.fields(LoraArguments))


class HasLoraFields(Protocol):
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: str | list[str] | None


def lora_field(name: str, default: Any) -> Any:
    """The ``LoraArguments`` field ``name`` (its help text) with another default, for a subclass."""
    base = {f.name: f for f in dataclasses.fields(LoraArguments)}[name]
    return field(default=default, metadata=base.metadata)


def lora_field_problems(fields: HasLoraFields) -> list[tuple[str, str]]:
    """``(field name, problem)`` for every LoRA value that cannot build a ``LoraConfig``; empty when fine."""
    problems = []
    for name in ("lora_r", "lora_alpha"):
        value = getattr(fields, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append((name, f"must be an integer >= 1, got {value!r}."))
    if not 0.0 <= fields.lora_dropout < 1.0:
        problems.append(("lora_dropout", f"must be in [0, 1), got {fields.lora_dropout}."))
    targets = fields.lora_target_modules
    if targets is not None and not isinstance(targets, str) and (
        not targets or not all(isinstance(name, str) and name for name in targets)
    ):
        problems.append(("lora_target_modules",
                         f"must be 'all-linear' or a non-empty list of module names, got {targets!r}."))
    return problems


def check_lora_fields(fields: HasLoraFields, section: str) -> None:
    """ValueError naming ``{section}.lora_r`` (etc.) for the first LoRA value that cannot build a LoRA."""
    for name, problem in lora_field_problems(fields):
        raise ValueError(f"{section}.{name} {problem}")


def lora_config(
    task_type: str,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: str | list[str] | None,
    modules_to_save: list[str] | None = None,
) -> LoraConfig:
    """The peft ``LoraConfig`` every adapter of the project is built with (``None`` targets: all-linear)."""
    from peft import LoraConfig

    if target_modules is None:
        target_modules = ALL_LINEAR
    return LoraConfig(
        task_type=task_type,
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        modules_to_save=None if modules_to_save is None else list(modules_to_save),
        bias="none",
    )


def _from_fields(task_type: str, fields: HasLoraFields, modules_to_save: list[str] | None = None) -> LoraConfig:
    return lora_config(task_type, fields.lora_r, fields.lora_alpha, fields.lora_dropout,
                       fields.lora_target_modules, modules_to_save)


def policy_lora_config(fields: HasLoraFields | None = None) -> LoraConfig:
    """CAUSAL_LM ``LoraConfig`` of the policy adapter; ``None`` gives the ``LoraArguments`` defaults."""
    return _from_fields("CAUSAL_LM", fields if fields is not None else LoraArguments())


def critic_lora_config(fields: HasLoraFields | None = None) -> LoraConfig:
    """CAUSAL_LM ``LoraConfig`` of a separate critic adapter (its value head is ours, not peft's)."""
    return _from_fields("CAUSAL_LM", fields if fields is not None else LoraArguments())


def reward_lora_config(fields: HasLoraFields) -> LoraConfig:
    """SEQ_CLS ``LoraConfig``: peft trains the 1-label ``score`` head and saves it with the adapter."""
    return _from_fields("SEQ_CLS", fields, modules_to_save=[SCORE_HEAD_MODULE])


__all__ = [
    "ALL_LINEAR",
    "LORA_FIELDS",
    "POLICY_LORA_DROPOUT",
    "SCORE_HEAD_MODULE",
    "LoraArguments",
    "check_lora_fields",
    "lora_field_problems",
    "critic_lora_config",
    "lora_config",
    "lora_field",
    "policy_lora_config",
    "reward_lora_config",
]
