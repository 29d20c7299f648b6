"""Cross-field checks that need no hardware: files, registry names, batch arithmetic, consistency."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from ..builtin_models import builtin_size
from ..lora import lora_field_problems
from .coercion import describe
from .errors import fail
from .sections import DEFAULT_STAGES, DataConfig, ExportConfig, InstanceConfig, ModelConfig, Recipe
from .stage_configs import build_ppo_config, build_reward_config

# Local-path look-alikes: a value with one of these endings names a file that must exist.
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet", ".csv")


def validate(recipe: Recipe) -> None:
    """Cross-field checks that need no hardware: files, registry names, batch arithmetic, consistency."""
    _check_model(recipe.model)
    _check_data(recipe.data)
    _check_reward(recipe)
    _check_held_out_prompts(recipe)
    _check_ppo(recipe.ppo)
    _check_positive(recipe.evaluate, "evaluate", ("num_prompts", "batch_size", "max_new_tokens"))
    _check_nonnegative(recipe.evaluate, "evaluate", ("num_shown_samples",))
    _check_export(recipe.export)
    _check_instance(recipe.instance)
    _check_stages(recipe)


def _check_positive(section: Any, name: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = getattr(section, key)
        if value is not None and value < 1:
            fail(f"{name}.{key}", f"must be at least 1, got {value}.", "use a positive number.")


def _check_nonnegative(section: Any, name: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = getattr(section, key)
        if value is not None and value < 0:
            fail(f"{name}.{key}", f"must be >= 0, got {value}.", "use 0 or a positive number.")


def looks_local(path: str) -> bool:
    """True for values that name a local file or folder rather than a hub id."""
    return (
        path.startswith(("/", "./", "../", "~"))
        or path.endswith(LOCAL_DATA_SUFFIXES)
        or os.path.exists(os.path.expanduser(path))
    )


def _check_local_path(key_path: str, path: str | None, what: str) -> None:
    if path is None or not looks_local(path):
        return
    if not Path(os.path.expanduser(path)).exists():
        fail(key_path, f"{what} {path!r} does not exist (relative paths are read from {os.getcwd()}).",
             "correct the path, or give a hub id instead.")


def _check_model(model: ModelConfig) -> None:
    if model.is_builtin:
        try:
            builtin_size(model.name_or_path)
        except ValueError as error:
            fail("model.name_or_path", str(error), "use one of the names listed, a hub id or a local folder.")
        return
    _check_local_path("model.name_or_path", model.name_or_path, "model folder")
    _check_local_path("model.tokenizer", model.tokenizer, "tokenizer folder")


def _check_data(data: DataConfig) -> None:
    from ..registry import data_sources

    for name, section in (("preference", data.preference), ("prompts", data.prompts)):
        if section.source not in data_sources:
            close = difflib.get_close_matches(section.source, data_sources.names(), n=1)
            fail(f"data.{name}.source", f"unknown data source {section.source!r}."
                 + (f" Did you mean {close[0]!r}?" if close else ""),
                 f"use one of: {', '.join(data_sources.names())} (plugins add more).")
        _check_local_path(f"data.{name}.path", section.path, "data file")
        _check_positive(section, f"data.{name}", ("max_train_samples", "max_eval_samples"))
        _check_held_out_fields(section, f"data.{name}")
    if not 0.0 <= data.max_drop_fraction <= 1.0:
        fail("data.max_drop_fraction", f"must be between 0 and 1, got {data.max_drop_fraction}.",
             "use e.g. 0.5 (stop when half of a split's rows are dropped), or 1 for no limit.")
    if data.preference.max_length < 2:
        fail("data.preference.max_length", f"must be at least 2, got {data.preference.max_length}.",
             "use the longest sequence the reward adapter should see, e.g. 512.")
    _check_positive(data.prompts, "data.prompts", ("max_prompt_length",))


def _check_held_out_fields(section: Any, key_path: str) -> None:
    if not 0.0 <= section.eval_fraction < 1.0:
        fail(f"{key_path}.eval_fraction", f"must be in [0, 1), got {section.eval_fraction}.",
             "use e.g. 0.05 (5% of the train rows held out when the source has no eval split), or 0 for none.")
    for key in ("train_files", "eval_files"):
        files = getattr(section, key)
        if files is not None and not files:
            fail(f"{key_path}.{key}", "is an empty list.", f"list the files of the split, or set {key}: null.")
        if files and section.path is not None and not looks_local(section.path):
            fail(f"{key_path}.{key}", f"lists local files, but {key_path}.path is the hub id {section.path!r}.",
                 f"set {key_path}.path to the folder that holds the files (or null), or remove {key}.")


def _check_held_out_prompts(recipe: Recipe) -> None:
    prompts = recipe.data.prompts
    if "evaluate" in recipe.stages and prompts.eval_split is None and not prompts.eval_files \
            and prompts.eval_fraction == 0:
        fail("data.prompts.eval_fraction", "is 0 with eval_split: null, so the evaluate stage gets no held-out "
             "prompts.", "set data.prompts.eval_fraction above 0 (e.g. 0.05), or name an eval_split.")


def check_batch_arithmetic(batch_size: int, mini_batch_size: int, gradient_accumulation_steps: int) -> None:
    """TRL 0.11 semantics, per process: batch_size = k * mini_batch_size * gradient_accumulation_steps."""
    for key, value in (("batch_size", batch_size), ("mini_batch_size", mini_batch_size),
                       ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if value < 1:
            fail(f"ppo.{key}", f"must be at least 1, got {value}.", "use a positive number.")
    backward_batch_size = mini_batch_size * gradient_accumulation_steps
    if batch_size % backward_batch_size:
        lower = batch_size - batch_size % backward_batch_size
        options = [str(n) for n in (lower, lower + backward_batch_size) if n >= 1]
        fail(
            "ppo.batch_size",
            f"{batch_size} is not a multiple of ppo.mini_batch_size x ppo.gradient_accumulation_steps "
            f"= {mini_batch_size} x {gradient_accumulation_steps} = {backward_batch_size} (per process, "
            f"as in TRL 0.11: each optimizer step consumes {backward_batch_size} rollouts).",
            f"set ppo.batch_size to {' or '.join(options)}, or lower ppo.mini_batch_size or "
            f"ppo.gradient_accumulation_steps.",
        )


def _check_reward(recipe: Recipe) -> None:
    # The config class's own checks (TrainingArguments' included), independent of this machine: the
    # recipe's instance has the GPUs, bf16 on a CPU laptop is fine in a dry run.
    build_reward_config(recipe.reward, recipe.model, output_dir="<dry-run>", use_cpu=True)


def _check_ppo(ppo: Any) -> None:
    check_batch_arithmetic(ppo.batch_size, ppo.mini_batch_size, ppo.gradient_accumulation_steps)
    for key, problem in lora_field_problems(ppo):
        fail(f"ppo.{key}", problem, "use e.g. lora_r: 16, lora_alpha: 32, lora_dropout: 0.0.")
    for key in ("policy_adapter",):
        _check_local_path(f"ppo.{key}", getattr(ppo, key, None), "adapter folder")
    # The config class's own checks, made independent of this machine (bf16 on a CPU laptop is fine
    # in a dry run: the recipe's instance has the GPUs).
    build_ppo_config(ppo, output_dir="<dry-run>", use_cpu=True)


def _check_export(export: ExportConfig) -> None:
    if export.push_to_hub and not export.hub_model_id:
        fail("export.hub_model_id", "is required when export.push_to_hub is true.",
             "set export.hub_model_id to 'your-user/your-model', or set export.push_to_hub to false.")


def _check_instance(instance: InstanceConfig) -> None:
    _check_nonnegative(instance, "instance", ("num_gpus", "price_per_hour", "gpu_memory_gib"))
    if instance.accelerate_config is None:
        return
    from ..launch import AccelerateConfigError, read_accelerate_config

    try:
        launch = read_accelerate_config(instance.accelerate_config)
    except AccelerateConfigError as error:
        fail("instance.accelerate_config", str(error), "use a bundled config name or an existing file.")
    gpus_needed = launch.processes_per_machine if not launch.use_cpu else 0
    if gpus_needed > max(instance.num_gpus, 0) and launch.uses_gpus:
        fail("instance.accelerate_config",
             f"{instance.accelerate_config!r} starts {gpus_needed} GPU processes per machine but "
             f"instance.num_gpus is {instance.num_gpus}.",
             "pick an accelerate config with at most instance.num_gpus processes, or correct instance.num_gpus.")


def _check_stages(recipe: Recipe) -> None:
    from ..registry import stages

    if not recipe.stages:
        fail("stages", "is empty.", f"list the stages to run, e.g. {list(DEFAULT_STAGES)}.")
    for index, name in enumerate(recipe.stages):
        if name not in stages:
            close = difflib.get_close_matches(name, stages.names(), n=1)
            fail(f"stages[{index}]", f"unknown stage {name!r}." + (f" Did you mean {close[0]!r}?" if close else ""),
                 f"use registered stages: {', '.join(stages.names())} (plugins add more).")
    if len(set(recipe.stages)) != len(recipe.stages):
        fail("stages", "lists a stage twice.", "keep each stage once.")
    for name in recipe.stage_options:
        if name not in recipe.stages:
            fail(f"stage_options.{name}", f"gives options for {name!r}, which is not in stages.",
                 f"add {name!r} to stages, or remove its options.")
    _check_reward_functions(recipe.stage_options.get("ppo", {}).get("reward_funcs"))
    order = [name for name in DEFAULT_STAGES if name in recipe.stages]
    if order != [name for name in recipe.stages if name in DEFAULT_STAGES]:
        fail("stages", f"lists the built-in stages out of order: {recipe.stages}.",
             f"keep the order {list(DEFAULT_STAGES)}; plugin stages may go anywhere.")


def _check_reward_functions(names: Any) -> None:
    from ..registry import reward_functions

    if names is None:
        return
    key = "stage_options.ppo.reward_funcs"
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        fail(key, f"must be a list of reward function names, got {describe(names)}.",
             "write e.g. reward_funcs: [keyword_reward].")
    for index, name in enumerate(names):
        if name not in reward_functions:
            close = difflib.get_close_matches(name, reward_functions.names(), n=1)
            fail(f"{key}[{index}]", f"unknown reward function {name!r}."
                 + (f" Did you mean {close[0]!r}?" if close else ""),
                 f"use registered reward functions: {', '.join(reward_functions.names()) or '(none)'} "
                 "(plugins add more).")
