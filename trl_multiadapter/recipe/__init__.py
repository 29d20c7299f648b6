"""Recipes: a YAML file mapped onto typed dataclasses, validated before any work starts.

``load(path_or_name, overrides)`` reads a recipe (a path, or the name of a recipe bundled with the package),
applies dotted overrides (``ppo.learning_rate=2e-5``), maps every section onto its dataclass and checks it:

* unknown keys (with a "did you mean"), wrong types, missing required keys;
* local data files that do not exist;
* impossible batch arithmetic (per process, as in TRL 0.11: ``batch_size`` must be a multiple of
  ``mini_batch_size * gradient_accumulation_steps``);
* a data source, reward function or stage name that no registry knows.

Every problem raises ``RecipeError`` naming the key path (``ppo.mini_batch_size``) and how to fix it.
Checks that need the real machine (4-bit without CUDA or bitsandbytes, a hub push without network) live in
``check_runtime`` and run when a run really starts, never in ``--dry_run``.

Modules, one job each:

* ``sections``       the section dataclasses and ``Recipe`` (pure data);
* ``loading``        YAML files, bundled recipe names, ``--set`` overrides, ``load``;
* ``coercion``       raw data -> dataclasses, type-checked against the hints;
* ``validation``     cross-field checks without hardware;
* ``stage_configs``  what a stage gets from its section (``MultiAdapterPPOConfig``, ``RewardAdapterConfig``,
  the policy LoRA);
* ``runtime``        checks that need the machine (4-bit, hub push, a hub model id);
* ``docs``           the generated key reference of docs/recipes.md.
"""

from __future__ import annotations

from ..builtin_models import BUILTIN_MODEL_PREFIX  # re-exported: the one builtin: resolver owns it
from .coercion import build, coerce
from .docs import reference_markdown
from .errors import RecipeError
from .loading import (
    RECIPE_PACKAGE,
    apply_overrides,
    bundled_recipe_names,
    load,
    parse_override,
    read_yaml,
    resolve_recipe_path,
)
from .runtime import check_model_source, check_runtime
from .sections import (
    DEFAULT_STAGES,
    PPO_DERIVED_FIELDS,
    PPO_LORA_FIELDS,
    REWARD_DERIVED_FIELDS,
    BaseDtype,
    DataConfig,
    EvaluateConfig,
    ExportConfig,
    InstanceConfig,
    ModelConfig,
    PreferenceDataConfig,
    PromptDataConfig,
    QuantizationConfig,
    Recipe,
    ppo_section_class,
    reward_section_class,
)
from .stage_configs import build_ppo_config, build_reward_config, ppo_lora_config
from .validation import (
    LOCAL_DATA_SUFFIXES,
    check_batch_arithmetic,
    looks_local,
    validate,
)

__all__ = [
    "BUILTIN_MODEL_PREFIX",
    "DEFAULT_STAGES",
    "LOCAL_DATA_SUFFIXES",
    "PPO_DERIVED_FIELDS",
    "PPO_LORA_FIELDS",
    "RECIPE_PACKAGE",
    "REWARD_DERIVED_FIELDS",
    "BaseDtype",
    "DataConfig",
    "EvaluateConfig",
    "ExportConfig",
    "InstanceConfig",
    "ModelConfig",
    "PreferenceDataConfig",
    "PromptDataConfig",
    "QuantizationConfig",
    "Recipe",
    "RecipeError",
    "apply_overrides",
    "build",
    "build_ppo_config",
    "build_reward_config",
    "bundled_recipe_names",
    "check_batch_arithmetic",
    "check_model_source",
    "check_runtime",
    "coerce",
    "load",
    "looks_local",
    "parse_override",
    "ppo_lora_config",
    "ppo_section_class",
    "read_yaml",
    "reference_markdown",
    "resolve_recipe_path",
    "reward_section_class",
    "validate",
]
