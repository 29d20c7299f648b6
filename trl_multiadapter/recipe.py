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

The ``reward`` section holds ``RewardAdapterConfig`` fields and the ``ppo`` section
``MultiAdapterPPOConfig`` fields plus the policy LoRA; both lists are read from those classes, so a field
added there is a recipe key here without an edit. A field's ``metadata["help"]`` is its documentation.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import functools
import importlib.resources
import json
import os
import re
import types
import typing
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .data import DEFAULT_SQUAD_SYSTEM_PROMPT

RECIPE_PACKAGE = "trl_multiadapter.recipes"
BUILTIN_MODEL_PREFIX = "builtin:"
DTYPES = ("float32", "bfloat16", "float16", "auto")
DEFAULT_STAGES = ("data", "reward", "ppo", "evaluate", "export")
# Modules whose import registers the built-in data sources and stages that recipes name.
BUILTIN_ENTRY_MODULES = ("trl_multiadapter.data", "trl_multiadapter.pipeline")
# Local-path look-alikes: a value with one of these endings names a file that must exist.
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet", ".csv")


class RecipeError(ValueError):
    """A recipe problem: ``key_path`` says where (``ppo.mini_batch_size``), ``fix`` says what to change."""

    exit_code = 2

    def __init__(self, key_path: str, problem: str, fix: str = "", source: str | os.PathLike | None = None):
        self.key_path = key_path
        self.problem = problem
        self.fix = fix
        self.source = None if source is None else str(source)
        super().__init__(str(self))

    def with_source(self, source: str | os.PathLike) -> RecipeError:
        return RecipeError(self.key_path, self.problem, self.fix, source)

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        key = self.key_path or "<recipe>"
        text = f"{where}{key}: {self.problem}"
        return f"{text} Fix: {self.fix}" if self.fix else text


# ------------------------------------------------------------------------------------------------ sections


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class ModelConfig:
    name_or_path: str = field(
        metadata=_help(
            "Base causal LM: a hub id, a local folder, or 'builtin:tiny' / 'builtin:small' / 'builtin:medium' "
            "for the offline test models of trl_multiadapter.testing."
        )
    )
    tokenizer: str | None = field(
        default=None, metadata=_help("Tokenizer hub id or folder; null uses the model's own.")
    )
    revision: str | None = field(default=None, metadata=_help("Hub revision (branch, tag or commit) of the model."))
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = field(
        default="float32",
        metadata=_help("Dtype of the frozen base weights (and the compute dtype of layers that stay unquantized)."),
    )
    trust_remote_code: bool = field(default=False, metadata=_help("Allow model code from the hub repository."))
    attn_implementation: str | None = field(
        default=None, metadata=_help("Attention kernel ('sdpa', 'eager', 'flash_attention_2'); null: default.")
    )
    seed: int = field(default=0, metadata=_help("Weight seed of a builtin: model (ignored otherwise)."))

    @property
    def is_builtin(self) -> bool:
        return self.name_or_path.startswith(BUILTIN_MODEL_PREFIX)

    @property
    def builtin_size(self) -> str:
        return self.name_or_path[len(BUILTIN_MODEL_PREFIX) :]


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = field(
        default=False, metadata=_help("Load the frozen base in 4-bit through bitsandbytes (needs CUDA).")
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata=_help("4-bit data type."))
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = field(
        default="bfloat16", metadata=_help("Dtype the 4-bit weights are dequantized to for matmuls.")
    )
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata=_help("Quantize the quantization constants too (~0.4 bits per weight saved).")
    )

    def bitsandbytes_config(self):
        """The transformers ``BitsAndBytesConfig``, or None when the base is not quantized."""
        if not self.load_in_4bit:
            return None
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=getattr(torch, self.bnb_4bit_compute_dtype),
            bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
        )


@dataclass
class PreferenceDataConfig:
    source: str = field(
        default="hh_rlhf",
        metadata=_help("Registered data source that yields preference pairs (e.g. 'hh_rlhf', 'synthetic_hh_rlhf')."),
    )
    path: str | None = field(
        default="Anthropic/hh-rlhf",
        metadata=_help("Hub dataset id, or a local .jsonl / .jsonl.gz / .parquet file with 'chosen'/'rejected'."),
    )
    data_dir: str | None = field(
        default="helpful-base", metadata=_help("Subset folder of a hub dataset (hh-rlhf: 'helpful-base', ...).")
    )
    train_split: str = field(default="train", metadata=_help("Split used to train the reward adapter."))
    eval_split: str | None = field(
        default="test", metadata=_help("Held-out split for pairwise accuracy; null holds out reward.eval_fraction.")
    )
    max_train_samples: int | None = field(default=None, metadata=_help("Use at most this many training pairs."))
    max_eval_samples: int | None = field(default=None, metadata=_help("Use at most this many held-out pairs."))
    max_length: int = field(
        default=512,
        metadata=_help("Token budget per sequence; longer pairs lose their earliest turns, never the final one."),
    )
    on_malformed: Literal["skip", "error"] = field(
        default="skip", metadata=_help("Malformed rows: 'skip' counts and reports them, 'error' stops at the row.")
    )
    options: dict[str, Any] = field(
        default_factory=dict, metadata=_help("Extra keyword arguments for the data source (plugins, synthetic size).")
    )


@dataclass
class PromptDataConfig:
    source: str = field(
        default="squad",
        metadata=_help("Registered data source that yields PPO prompts (e.g. 'squad', 'synthetic_squad')."),
    )
    path: str | None = field(
        default="rajpurkar/squad",
        metadata=_help("Hub dataset id, or a local SQuAD file (nested .json, or flat .jsonl / .jsonl.gz / .parquet)."),
    )
    train_split: str = field(default="train", metadata=_help("Split whose questions are the PPO prompts."))
    eval_split: str = field(default="validation", metadata=_help("Held-out split used by the evaluate stage."))
    max_train_samples: int | None = field(default=None, metadata=_help("Use at most this many training prompts."))
    max_eval_samples: int | None = field(default=None, metadata=_help("Use at most this many held-out prompts."))
    max_prompt_length: int = field(default=512, metadata=_help("Token budget of a prompt (chat template included)."))
    long_prompts: Literal["drop", "cut_context"] = field(
        default="drop",
        metadata=_help("Longer prompts: 'drop' (counted), or 'cut_context' to whole sentences around the answer."),
    )
    system_prompt: str | None = field(
        default=DEFAULT_SQUAD_SYSTEM_PROMPT, metadata=_help("System message put before every question; null for none.")
    )
    options: dict[str, Any] = field(default_factory=dict, metadata=_help("Extra keyword arguments for the source."))


@dataclass
class DataConfig:
    preference: PreferenceDataConfig = field(
        default_factory=PreferenceDataConfig, metadata=_help("Preference pairs for the reward adapter.")
    )
    prompts: PromptDataConfig = field(default_factory=PromptDataConfig, metadata=_help("Prompts for PPO."))
    seed: int = field(default=0, metadata=_help("Seed for sub-sampling and shuffling the data."))


@dataclass
class EvaluateConfig:
    num_prompts: int = field(default=64, metadata=_help("Held-out prompts that both policies answer."))
    batch_size: int = field(default=8, metadata=_help("Prompts per generation batch."))
    max_new_tokens: int | None = field(
        default=None, metadata=_help("Tokens to sample per answer; null uses the PPO setting.")
    )
    do_sample: bool = field(
        default=True, metadata=_help("Sample with the PPO generation settings (true) or decode greedily (false).")
    )
    num_shown_samples: int = field(default=8, metadata=_help("Generations written to samples.jsonl and the report."))
    seed: int = field(default=1234, metadata=_help("Sampling seed; base and aligned use the same one."))


@dataclass
class ExportConfig:
    merged_model: bool = field(
        default=False, metadata=_help("Also save base + policy adapter merged into one plain model.")
    )
    push_to_hub: bool = field(default=False, metadata=_help("Push the exported policy adapter to the hub."))
    hub_model_id: str | None = field(
        default=None, metadata=_help("Hub repository ('user/name') for push_to_hub.")
    )
    hub_private: bool = field(default=True, metadata=_help("Create the hub repository as private."))
    intended_use: str = field(
        default="Research on RLHF with multi-adapter PPO; not evaluated for safety or for deployment.",
        metadata=_help("The 'intended use' paragraph of the model card."),
    )


@dataclass
class InstanceConfig:
    name: str = field(default="local", metadata=_help("Instance type the recipe targets (e.g. 'ml.g5.12xlarge')."))
    num_gpus: int = field(default=0, metadata=_help("GPUs on the instance; 0 for a CPU-only machine."))
    gpu_type: str | None = field(default=None, metadata=_help("GPU model (e.g. 'A10G'), for the plan."))
    gpu_memory_gib: float | None = field(
        default=None, metadata=_help("Memory per GPU in GiB; the dry run checks the estimate against it.")
    )
    price_per_hour: float | None = field(
        default=None, metadata=_help("On-demand price of the whole instance in USD per hour; null: no cost report.")
    )
    accelerate_config: str | None = field(
        default=None,
        metadata=_help("Bundled accelerate config name or path used when --accelerate_config is not given."),
    )


def _reward_section_class():
    from .reward import RewardAdapterConfig

    return RewardAdapterConfig


@dataclass
class Recipe:
    model: ModelConfig = field(metadata=_help("The frozen base model every role shares."))
    quantization: QuantizationConfig = field(
        default_factory=QuantizationConfig, metadata=_help("Optional 4-bit loading of the base.")
    )
    data: DataConfig = field(default_factory=DataConfig, metadata=_help("Preference pairs and PPO prompts."))
    reward: Any = field(
        default=None,
        metadata=_help("Reward-adapter stage: RewardAdapterConfig fields.", section=_reward_section_class),
    )
    ppo: Any = field(
        default=None,
        metadata=_help(
            "PPO stage: MultiAdapterPPOConfig fields plus the policy LoRA (lora_r, lora_alpha, ...).",
            section=lambda: ppo_section_class(),
        ),
    )
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig, metadata=_help("Base vs aligned evaluation."))
    export: ExportConfig = field(default_factory=ExportConfig, metadata=_help("What the export stage writes."))
    instance: InstanceConfig = field(
        default_factory=InstanceConfig, metadata=_help("Target hardware and its price, for the plan and the report.")
    )
    output_dir: str = field(default="runs/recipe", metadata=_help("Folder of the run; each stage writes below it."))
    stages: list[str] = field(
        default_factory=lambda: list(DEFAULT_STAGES),
        metadata=_help("Stages to run, in order (registered stage names; plugins add more)."),
    )
    stage_options: dict[str, dict[str, Any]] = field(
        default_factory=dict, metadata=_help("Options for plugin stages, keyed by stage name.")
    )
    source: str | None = field(
        default=None, metadata=_help("Where the recipe was read from (set by load; not a YAML key).", internal=True)
    )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML-safe) of every section, without internal fields."""
        return {
            f.name: _to_plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if not f.metadata.get("internal")
        }


# -------------------------------------------------------------------------------------- the ppo section

PPO_LORA_FIELDS = {
    "lora_r": (int, 16, "LoRA rank of the policy adapter."),
    "lora_alpha": (int, 32, "LoRA scaling numerator of the policy adapter (scale = alpha / r)."),
    "lora_dropout": (float, 0.05, "LoRA dropout of the policy adapter (off in every PPO forward pass)."),
    "lora_target_modules": (str | list[str], "all-linear", "Modules that get the policy LoRA, or 'all-linear'."),
}
# Config fields a recipe sets elsewhere: the value comes from that key.
PPO_DERIVED_FIELDS = {
    "output_dir": "output_dir (top level, or --output_dir)",
    "model_init_kwargs": "model.dtype and the quantization section (the ppo stage builds the model)",
}
REWARD_DERIVED_FIELDS = {"dtype": "model.dtype"}


@functools.cache
def ppo_section_class() -> type:
    """A dataclass with MultiAdapterPPOConfig's fields (types, defaults, help) plus the policy LoRA fields."""
    from .ppo_config import MultiAdapterPPOConfig

    return _section_class_from("PPOSection", MultiAdapterPPOConfig, PPO_LORA_FIELDS, PPO_DERIVED_FIELDS)


def _section_class_from(name: str, config_class: type, extra: dict[str, tuple], derived: dict[str, str]) -> type:
    hints = typing.get_type_hints(config_class)
    specs = []
    for f in dataclasses.fields(config_class):
        if not f.init or f.name in derived or f.name in extra:
            continue
        default = (
            field(default_factory=f.default_factory, metadata=f.metadata)
            if f.default_factory is not dataclasses.MISSING
            else field(default=f.default, metadata=f.metadata)
        )
        specs.append((f.name, hints[f.name], default))
    for key, (hint, default, text) in extra.items():
        if any(key == spec[0] for spec in specs):
            continue
        specs.append((key, hint, field(default=default, metadata=_help(text))))
    cls = dataclasses.make_dataclass(name, specs)
    cls.config_class = config_class
    cls.derived_fields = derived
    return cls


# ------------------------------------------------------------------------------------------- loading


def bundled_recipe_names() -> list[str]:
    root = importlib.resources.files(RECIPE_PACKAGE)
    return sorted(entry.name[: -len(".yaml")] for entry in root.iterdir() if entry.name.endswith(".yaml"))


def resolve_recipe_path(path_or_name: str | os.PathLike) -> Path:
    """A recipe file path, or the bundled recipe of that name (``hh_squad`` or ``hh_squad.yaml``)."""
    candidate = Path(path_or_name)
    if candidate.is_file():
        return candidate
    name = candidate.name.removesuffix(".yaml").removesuffix(".yml")
    if str(path_or_name) in (name, f"{name}.yaml"):
        bundled = importlib.resources.files(RECIPE_PACKAGE).joinpath(f"{name}.yaml")
        if bundled.is_file():
            return Path(str(bundled))
    known = bundled_recipe_names()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise RecipeError(
        "",
        f"recipe {str(path_or_name)!r} is neither a file nor a bundled recipe.{hint}",
        f"pass a path to a YAML recipe, or one of the bundled names: {', '.join(known)}.",
    )


def load(
    path_or_name: str | os.PathLike | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    output_dir: str | os.PathLike | None = None,
    data: dict[str, Any] | None = None,
) -> Recipe:
    """Read, override, map and validate a recipe. ``data`` passes the YAML content directly (tests)."""
    source = None
    if data is None:
        if path_or_name is None:
            raise RecipeError("", "no recipe given.", "pass a recipe path or a bundled recipe name.")
        path = resolve_recipe_path(path_or_name)
        source = str(path)
        data = read_yaml(path)
    try:
        raw = apply_overrides(copy.deepcopy(data), overrides)
        if output_dir is not None:
            raw["output_dir"] = str(output_dir)
        recipe = build(Recipe, raw, "")
        recipe.source = source
        validate(recipe)
    except RecipeError as error:
        raise error.with_source(source) if source else error from None
    return recipe


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError("", f"not valid YAML{where}: {getattr(error, 'problem', error)}.",
                          "fix the YAML syntax.", path) from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise RecipeError("", f"a recipe must be a mapping of sections, got {type(content).__name__}.",
                          "start the file with 'model:' and the other sections.", path)
    return content


_OVERRIDE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)=(.*)$", re.DOTALL)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"ppo.learning_rate=2e-5"`` -> (["ppo", "learning_rate"], 2e-05); the value is read as YAML."""
    match = _OVERRIDE.match(text.strip())
    if not match:
        raise RecipeError("--set", f"cannot read override {text!r}.",
                          "write it as dotted.key=value, e.g. --set ppo.learning_rate=2e-5.")
    key, value_text = match.groups()
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError:
        value = value_text  # e.g. an unquoted string with a colon: keep it as written
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                path = ".".join(keys[: depth + 1])
                raise RecipeError(path, f"is a {type(child).__name__}, so --set {text} cannot set a key inside it.",
                                  f"set {path} itself, e.g. --set {path}=...")
            node = child
        node[keys[-1]] = value
    return raw


# ------------------------------------------------------------------------------------ mapping and types


def build(cls: type, raw: Any, key_path: str) -> Any:
    """An instance of dataclass ``cls`` from the mapping ``raw``, type-checking every value."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(key_path, f"must be a mapping of keys, got {_describe(raw)}.",
                          f"write {key_path or 'the recipe'} as 'key: value' lines.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")}
    derived = getattr(cls, "derived_fields", {}) | _DERIVED_BY_CLASS.get(cls.__name__, {})
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        path = _join(key_path, key)
        if not isinstance(key, str):
            raise RecipeError(path, f"keys must be strings, got {_describe(key)}.", "quote the key.")
        if key in derived:
            raise RecipeError(path, "is set elsewhere in a recipe.", f"remove it and set {derived[key]} instead.")
        if key not in fields:
            raise _unknown_key(path, key, sorted(fields))
        values[key] = _field_value(fields[key], hints[key], value, path)
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(_join(key_path, name), "is required but missing.",
                              f"add '{name}: ...' ({f.metadata.get('help', 'see docs/recipes.md')}).")
        if name not in values and "section" in f.metadata:
            values[name] = _field_value(f, hints[name], {}, _join(key_path, name))
    try:
        return cls(**values)
    except RecipeError:
        raise
    except (ValueError, TypeError) as error:
        raise _config_error(key_path, error) from None


_DERIVED_BY_CLASS = {"RewardAdapterConfig": REWARD_DERIVED_FIELDS}


def _field_value(f: dataclasses.Field, hint: Any, value: Any, path: str) -> Any:
    section = f.metadata.get("section")
    if section is not None:
        return build(section(), value, path)
    return coerce(value, hint, path)


def _config_error(key_path: str, error: Exception) -> RecipeError:
    """A config class's own check failed; name the key it mentions when we can find it."""
    message = str(error)
    match = re.search(rf"{re.escape(key_path)}\.([A-Za-z_]+)", message) if key_path else None
    if match:
        return RecipeError(_join(key_path, match.group(1)), message, "change the value as the message says.")
    return RecipeError(key_path, message, "change the values as the message says.")


def coerce(value: Any, hint: Any, path: str) -> Any:
    """``value`` checked against the type ``hint`` (Optional, Union, Literal, list, dict, enum, dataclass)."""
    if hint is Any or hint is object:
        return value
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint_text = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(path, f"{value!r} is not allowed.{hint_text}",
                          f"use one of: {', '.join(repr(c) for c in choices)}.")
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(hint), hint, path)
    if origin in (list, tuple, typing.Sequence, typing.get_origin(typing.Sequence[int])):
        if not isinstance(value, (list, tuple)):
            raise _type_error(path, value, hint)
        args = typing.get_args(hint)
        item_hint = args[0] if args else Any
        return [coerce(item, item_hint, f"{path}[{index}]") for index, item in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _type_error(path, value, hint)
        args = typing.get_args(hint)
        key_hint, value_hint = args if args else (Any, Any)
        return {coerce(k, key_hint, path): coerce(v, value_hint, _join(path, str(k))) for k, v in value.items()}
    if hint is list:
        if not isinstance(value, list):
            raise _type_error(path, value, hint)
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise RecipeError(path, f"{value!r} is not allowed.",
                              f"use one of: {', '.join(repr(m.value) for m in hint)}.") from None
    return _coerce_scalar(value, hint, path)


def _coerce_union(value: Any, options: tuple, hint: Any, path: str) -> Any:
    if value is None:
        if type(None) in options:
            return None
        raise RecipeError(path, "must not be null.", f"give {_type_name(hint)}.")
    errors = []
    # Try exact scalar matches first so that `int | str` keeps 3 as an int and `float | str` reads "2e-5".
    for option in sorted((o for o in options if o is not type(None)), key=_union_order):
        try:
            return coerce(value, option, path)
        except RecipeError as error:
            errors.append(error)
    # An option that matched the value's shape and failed deeper (a list item, a nested key) says more.
    deeper = [error for error in errors if error.key_path != path]
    if deeper:
        raise deeper[0]
    if len(errors) == 1 and "is not allowed" in errors[0].problem:
        raise errors[0]  # a Literal's own message lists its choices
    raise _type_error(path, value, hint)


def _union_order(option: Any) -> int:
    # A string option last: anything can be read as a string, so try the specific types before it.
    return 1 if option is str else 0


def _coerce_scalar(value: Any, hint: Any, path: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(path, value, hint, "write true or false.")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _type_error(path, value, hint)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads 2e-5 (no dot) as a string; accept any string Python reads as a float.
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(path, value, hint)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _type_error(path, value, hint, "quote the value.")
    if hint is type(None):
        if value is None:
            return None
        raise _type_error(path, value, hint)
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise RecipeError(path, f"takes a {hint.__name__} object, which a YAML recipe cannot express.",
                          "remove the key from the recipe and set it in Python instead.")
    return value


def _type_error(path: str, value: Any, hint: Any, fix: str | None = None) -> RecipeError:
    return RecipeError(path, f"must be {_type_name(hint)}, got {_describe(value)}.",
                       fix or f"give {_type_name(hint)}.")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(arg) for arg in typing.get_args(hint)]
        return " or ".join(dict.fromkeys(names))
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    return getattr(hint, "__name__", str(hint))


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{kind.get(type(value), type(value).__name__)} {text}"


def _unknown_key(path: str, key: str, known: list[str]) -> RecipeError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    problem = f"unknown key {key!r}." + (f" Did you mean {close[0]!r}?" if close else "")
    parent = path.rpartition(".")[0] or "the top level"
    fix = (f"rename it to {close[0]!r}." if close
           else f"remove it; keys allowed in {parent}: {', '.join(known)}.")
    return RecipeError(path, problem, fix)


def _join(key_path: str, key: Any) -> str:
    return f"{key_path}.{key}" if key_path else str(key)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.init and not f.metadata.get("internal")}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _to_plain(item) for key, item in value.items()}
    return value


# ------------------------------------------------------------------------------------------- validation


def validate(recipe: Recipe) -> None:
    """Cross-field checks that need no hardware: files, registry names, batch arithmetic, consistency."""
    recipe.reward.dtype = recipe.model.dtype  # one base model: the reward stage loads it like every other
    _check_model(recipe.model)
    _check_data(recipe.data)
    _check_ppo(recipe.ppo)
    _check_positive(recipe.evaluate, "evaluate", ("num_prompts", "batch_size", "max_new_tokens"))
    _check_nonnegative(recipe.evaluate, "evaluate", ("num_shown_samples",))
    _check_export(recipe.export)
    _check_instance(recipe.instance)
    _check_stages(recipe)


def _fail(key_path: str, problem: str, fix: str) -> None:
    raise RecipeError(key_path, problem, fix)


def _check_positive(section: Any, name: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = getattr(section, key)
        if value is not None and value < 1:
            _fail(f"{name}.{key}", f"must be at least 1, got {value}.", "use a positive number.")


def _check_nonnegative(section: Any, name: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = getattr(section, key)
        if value is not None and value < 0:
            _fail(f"{name}.{key}", f"must be >= 0, got {value}.", "use 0 or a positive number.")


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
        _fail(key_path, f"{what} {path!r} does not exist (relative paths are read from {os.getcwd()}).",
              "correct the path, or give a hub id instead.")


def _check_model(model: ModelConfig) -> None:
    if model.is_builtin:
        from .testing import MODEL_SIZES

        if model.builtin_size not in MODEL_SIZES:
            close = difflib.get_close_matches(model.builtin_size, list(MODEL_SIZES), n=1)
            _fail("model.name_or_path", f"unknown builtin model {model.name_or_path!r}."
                  + (f" Did you mean 'builtin:{close[0]}'?" if close else ""),
                  "use one of: " + ", ".join(f"builtin:{size}" for size in MODEL_SIZES) + ".")
        return
    _check_local_path("model.name_or_path", model.name_or_path, "model folder")
    _check_local_path("model.tokenizer", model.tokenizer, "tokenizer folder")


def _ensure_builtin_entries() -> None:
    """Register the built-in data sources and stages (their modules register on import)."""
    import importlib

    for module in BUILTIN_ENTRY_MODULES:
        importlib.import_module(module)


def _check_data(data: DataConfig) -> None:
    from .registry import data_sources

    _ensure_builtin_entries()
    for name, section in (("preference", data.preference), ("prompts", data.prompts)):
        if section.source not in data_sources:
            close = difflib.get_close_matches(section.source, data_sources.names(), n=1)
            _fail(f"data.{name}.source", f"unknown data source {section.source!r}."
                  + (f" Did you mean {close[0]!r}?" if close else ""),
                  f"use one of: {', '.join(data_sources.names())} (plugins add more).")
        _check_local_path(f"data.{name}.path", section.path, "data file")
        _check_positive(section, f"data.{name}", ("max_train_samples", "max_eval_samples"))
    if data.preference.max_length < 2:
        _fail("data.preference.max_length", f"must be at least 2, got {data.preference.max_length}.",
              "use the longest sequence the reward adapter should see, e.g. 512.")
    _check_positive(data.prompts, "data.prompts", ("max_prompt_length",))


def check_batch_arithmetic(batch_size: int, mini_batch_size: int, gradient_accumulation_steps: int) -> None:
    """TRL 0.11 semantics, per process: batch_size = k * mini_batch_size * gradient_accumulation_steps."""
    for key, value in (("batch_size", batch_size), ("mini_batch_size", mini_batch_size),
                       ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if value < 1:
            _fail(f"ppo.{key}", f"must be at least 1, got {value}.", "use a positive number.")
    backward_batch_size = mini_batch_size * gradient_accumulation_steps
    if batch_size % backward_batch_size:
        lower = batch_size - batch_size % backward_batch_size
        options = [str(n) for n in (lower, lower + backward_batch_size) if n >= 1]
        _fail(
            "ppo.batch_size",
            f"{batch_size} is not a multiple of ppo.mini_batch_size x ppo.gradient_accumulation_steps "
            f"= {mini_batch_size} x {gradient_accumulation_steps} = {backward_batch_size} (per process, "
            f"as in TRL 0.11: each optimizer step consumes {backward_batch_size} rollouts).",
            f"set ppo.batch_size to {' or '.join(options)}, or lower ppo.mini_batch_size or "
            f"ppo.gradient_accumulation_steps.",
        )


def _check_ppo(ppo: Any) -> None:
    check_batch_arithmetic(ppo.batch_size, ppo.mini_batch_size, ppo.gradient_accumulation_steps)
    if ppo.lora_r < 1 or ppo.lora_alpha < 1:
        key = "lora_r" if ppo.lora_r < 1 else "lora_alpha"
        _fail(f"ppo.{key}", f"must be at least 1, got {getattr(ppo, key)}.", "use a positive number, e.g. 16.")
    if not 0.0 <= ppo.lora_dropout < 1.0:
        _fail("ppo.lora_dropout", f"must be in [0, 1), got {ppo.lora_dropout}.", "use e.g. 0.05.")
    for key in ("policy_adapter",):
        _check_local_path(f"ppo.{key}", getattr(ppo, key, None), "adapter folder")
    # The config class's own checks, made independent of this machine (bf16 on a CPU laptop is fine
    # in a dry run: the recipe's instance has the GPUs).
    build_ppo_config(ppo, output_dir="<dry-run>", use_cpu=True)


def build_ppo_config(ppo: Any, output_dir: str | os.PathLike, **overrides: Any):
    """``MultiAdapterPPOConfig`` from the ppo section; the config's own errors become RecipeErrors."""
    config_class = ppo.config_class
    names = {f.name for f in dataclasses.fields(config_class) if f.init}
    kwargs = {key: copy.deepcopy(getattr(ppo, key)) for key in names if hasattr(ppo, key)}
    kwargs.update(output_dir=str(output_dir), **overrides)
    try:
        return config_class(**kwargs)
    except (ValueError, TypeError) as error:
        match = re.search(r"`([A-Za-z_]+)`|--([A-Za-z_]+)", str(error))
        key = next((g for g in match.groups() if g), "") if match else ""
        raise RecipeError(f"ppo.{key}" if key in names else "ppo", str(error),
                          "change the value as the message says.") from None


def ppo_lora_config(ppo: Any):
    """The peft ``LoraConfig`` of the policy adapter."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=ppo.lora_r,
        lora_alpha=ppo.lora_alpha,
        lora_dropout=ppo.lora_dropout,
        target_modules=copy.copy(ppo.lora_target_modules),
    )


def _check_export(export: ExportConfig) -> None:
    if export.push_to_hub and not export.hub_model_id:
        _fail("export.hub_model_id", "is required when export.push_to_hub is true.",
              "set export.hub_model_id to 'your-user/your-model', or set export.push_to_hub to false.")


def _check_instance(instance: InstanceConfig) -> None:
    _check_nonnegative(instance, "instance", ("num_gpus", "price_per_hour", "gpu_memory_gib"))
    if instance.accelerate_config is None:
        return
    from .launch import AccelerateConfigError, read_accelerate_config

    try:
        launch = read_accelerate_config(instance.accelerate_config)
    except AccelerateConfigError as error:
        _fail("instance.accelerate_config", str(error), "use a bundled config name or an existing file.")
    gpus_needed = launch.processes_per_machine if not launch.use_cpu else 0
    if gpus_needed > max(instance.num_gpus, 0) and launch.uses_gpus:
        _fail("instance.accelerate_config",
              f"{instance.accelerate_config!r} starts {gpus_needed} GPU processes per machine but "
              f"instance.num_gpus is {instance.num_gpus}.",
              "pick an accelerate config with at most instance.num_gpus processes, or correct instance.num_gpus.")


def _check_stages(recipe: Recipe) -> None:
    from .registry import stages

    _ensure_builtin_entries()
    if not recipe.stages:
        _fail("stages", "is empty.", f"list the stages to run, e.g. {list(DEFAULT_STAGES)}.")
    for index, name in enumerate(recipe.stages):
        if name not in stages:
            close = difflib.get_close_matches(name, stages.names(), n=1)
            _fail(f"stages[{index}]", f"unknown stage {name!r}." + (f" Did you mean {close[0]!r}?" if close else ""),
                  f"use registered stages: {', '.join(stages.names())} (plugins add more).")
    if len(set(recipe.stages)) != len(recipe.stages):
        _fail("stages", "lists a stage twice.", "keep each stage once.")
    for name in recipe.stage_options:
        if name not in recipe.stages:
            _fail(f"stage_options.{name}", f"gives options for {name!r}, which is not in stages.",
                  f"add {name!r} to stages, or remove its options.")
    _check_reward_functions(recipe.stage_options.get("ppo", {}).get("reward_funcs"))
    order = [name for name in DEFAULT_STAGES if name in recipe.stages]
    if order != [name for name in recipe.stages if name in DEFAULT_STAGES]:
        _fail("stages", f"lists the built-in stages out of order: {recipe.stages}.",
              f"keep the order {list(DEFAULT_STAGES)}; plugin stages may go anywhere.")


def _check_reward_functions(names: Any) -> None:
    from .registry import reward_functions

    if names is None:
        return
    key = "stage_options.ppo.reward_funcs"
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        _fail(key, f"must be a list of reward function names, got {_describe(names)}.",
              "write e.g. reward_funcs: [keyword_reward].")
    for index, name in enumerate(names):
        if name not in reward_functions:
            close = difflib.get_close_matches(name, reward_functions.names(), n=1)
            _fail(f"{key}[{index}]", f"unknown reward function {name!r}."
                  + (f" Did you mean {close[0]!r}?" if close else ""),
                  f"use registered reward functions: {', '.join(reward_functions.names()) or '(none)'} "
                  "(plugins add more).")


# ------------------------------------------------------------------------------------ runtime checks


def check_runtime(recipe: Recipe) -> None:
    """Checks against the machine a run really starts on (not done by --dry_run)."""
    if recipe.quantization.load_in_4bit:
        _check_4bit_runtime()
    if recipe.export.push_to_hub:
        _check_hub_push(recipe.export)


def _check_4bit_runtime() -> None:
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        _fail("quantization.load_in_4bit", "4-bit loading needs a CUDA GPU, and this machine has none.",
              "run on a GPU instance, or set quantization.load_in_4bit=false (e.g. --set "
              "quantization.load_in_4bit=false --set model.dtype=float32 on CPU).")
    if importlib.util.find_spec("bitsandbytes") is None:
        _fail("quantization.load_in_4bit", "4-bit loading needs the bitsandbytes package, which is not installed.",
              "pip install 'trl-multiadapter[quant]' (or bitsandbytes), or set quantization.load_in_4bit=false.")


def _check_hub_push(export: ExportConfig) -> None:
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        _fail("export.push_to_hub", "the Hugging Face Hub is switched off here (HF_HUB_OFFLINE=1).",
              "unset HF_HUB_OFFLINE, or set export.push_to_hub=false and upload the exported folder later.")
    if get_token() is None:
        _fail("export.push_to_hub", "no Hugging Face token found.",
              "run `hf auth login` (or set HF_TOKEN), or set export.push_to_hub=false.")
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=5)
    except OSError as error:  # URLError, timeouts, DNS failures: all mean "no hub from here"
        _fail("export.push_to_hub", f"cannot reach {constants.ENDPOINT} ({type(error).__name__}).",
              "check the network, or set export.push_to_hub=false and upload the exported folder later.")


# ---------------------------------------------------------------------------------------- reference docs

# TrainingArguments fields that PPO recipes commonly set; the rest are accepted too but not listed.
_LISTED_TRAINING_ARGUMENTS = ("learning_rate", "max_steps", "num_train_epochs", "gradient_accumulation_steps",
                              "max_grad_norm", "lr_scheduler_type", "warmup_steps", "weight_decay", "seed",
                              "bf16", "activation_checkpointing", "logging_steps", "save_steps",
                              "save_total_limit", "report_to")


def reference_markdown() -> str:
    """The key reference of docs/recipes.md, generated from the sections' ``metadata["help"]``."""
    from transformers import TrainingArguments

    lines = []
    sections = [(f.name, f) for f in dataclasses.fields(Recipe) if not f.metadata.get("internal")]
    top_level = [(name, f) for name, f in sections if not _is_section(f)]
    lines += ["### top level", "", "| key | default | meaning |", "|---|---|---|"]
    lines += [_row(name, f) for name, f in top_level]
    training_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    for name, f in sections:
        if not _is_section(f):
            continue
        cls = f.metadata["section"]() if "section" in f.metadata else typing.get_type_hints(Recipe)[name]
        for path, sub_cls in _nested_sections(name, cls):
            rows = []
            for sub in dataclasses.fields(sub_cls):
                if not sub.init or dataclasses.is_dataclass(typing.get_type_hints(sub_cls).get(sub.name)):
                    continue
                if sub.name in getattr(sub_cls, "derived_fields", {}) or sub.name in _DERIVED_BY_CLASS.get(
                        sub_cls.__name__, {}):
                    continue
                if path == "ppo" and sub.name in training_fields and sub.name not in _LISTED_TRAINING_ARGUMENTS:
                    continue
                rows.append(_row(sub.name, sub))
            lines += ["", f"### {path}", ""]
            if path == "ppo":
                lines += ["Also accepted: every other `transformers.TrainingArguments` field.", ""]
            lines += ["| key | default | meaning |", "|---|---|---|", *rows]
    return "\n".join(lines) + "\n"


def _is_section(f: dataclasses.Field) -> bool:
    return "section" in f.metadata or dataclasses.is_dataclass(typing.get_type_hints(Recipe).get(f.name))


def _nested_sections(path: str, cls: type) -> list[tuple[str, type]]:
    found = [(path, cls)]
    hints = typing.get_type_hints(cls)
    for sub in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints.get(sub.name)):
            found += _nested_sections(f"{path}.{sub.name}", hints[sub.name])
    return found


def _row(name: str, f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        default = _to_plain(f.default)
    elif f.default_factory is not dataclasses.MISSING:
        default = _to_plain(f.default_factory())
    else:
        default = "(required)"
    shown = "(required)" if default == "(required)" else f"`{json.dumps(default)}`"
    text = " ".join(str(f.metadata.get("help", "")).split()).replace("|", "\\|")
    return f"| `{name}` | {shown} | {text} |"
