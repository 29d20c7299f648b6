"""The recipe's sections: one dataclass per stage, pure data (no I/O, no validation beyond types).

``reward`` holds ``RewardAdapterConfig`` fields and ``ppo`` ``MultiAdapterPPOConfig`` fields plus the policy
LoRA; both lists are read from those classes, so a field added there is a recipe key here without an edit.
A field's ``metadata["help"]`` is its documentation.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from ..builtin_models import builtin_size, is_builtin
from ..data import DEFAULT_SQUAD_SYSTEM_PROMPT
from ..lora import LoraArguments

# The dtype names a base model loads in (the one list: ModelConfig.dtype and RewardAdapterConfig.dtype).
BaseDtype = Literal["float32", "bfloat16", "float16", "auto"]
DEFAULT_STAGES = ("data", "reward", "ppo", "evaluate", "export")


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
    dtype: BaseDtype = field(
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
        return is_builtin(self.name_or_path)

    @property
    def builtin_size(self) -> str:
        """The size of a ``builtin:`` name; ValueError (listing the valid ones) for an unknown size."""
        return builtin_size(self.name_or_path)


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


_EVAL_SPLIT_HELP = (
    "Held-out split{what}. null, or a source without it (one file, a folder without that split), "
    "carves eval_fraction of the train split instead."
)
_EVAL_FRACTION_HELP = (
    "Share of the train rows held out as the eval split when the source has none (seeded by data.seed; "
    "rows sharing {group} stay on one side); 0: no held-out set."
)
_FILES_HELP = (
    "Explicit files of the {split} split (relative to path, and data_dir, when path is a folder); "
    "overrides the split name. null: found by name."
)


@dataclass
class PreferenceDataConfig:
    source: str = field(
        default="hh_rlhf",
        metadata=_help("Registered data source that yields preference pairs (e.g. 'hh_rlhf', 'synthetic_hh_rlhf')."),
    )
    path: str | None = field(
        default="Anthropic/hh-rlhf",
        metadata=_help("Hub dataset id, a local .jsonl / .jsonl.gz / .json / .parquet file with 'chosen'/'rejected', "
                       "or a folder of split files (a clone of the hub repository)."),
    )
    data_dir: str | None = field(
        default="helpful-base",
        metadata=_help("Subset folder of a hub dataset or a local folder (hh-rlhf: 'helpful-base', ...); "
                       "null for a file."),
    )
    train_split: str = field(default="train", metadata=_help("Split used to train the reward adapter."))
    eval_split: str | None = field(default="test", metadata=_help(_EVAL_SPLIT_HELP.format(what=" for pairwise accuracy")))
    eval_fraction: float = field(default=0.05, metadata=_help(_EVAL_FRACTION_HELP.format(group="a conversation")))
    train_files: list[str] | None = field(default=None, metadata=_help(_FILES_HELP.format(split="train")))
    eval_files: list[str] | None = field(default=None, metadata=_help(_FILES_HELP.format(split="eval")))
    max_train_samples: int | None = field(default=None, metadata=_help("Use at most this many training pairs."))
    max_eval_samples: int | None = field(default=None, metadata=_help("Use at most this many held-out pairs."))
    max_length: int = field(
        default=512,
        metadata=_help("Token budget per sequence; longer pairs lose their earliest turns, never the final one."),
    )
    on_malformed: Literal["skip", "error"] = field(
        default="skip", metadata=_help("Malformed rows: 'skip' counts and reports them, 'error' stops at the row.")
    )
    merge_turns: bool = field(
        default=True,
        metadata=_help("Merge consecutive turns of one role (counted as merged_turns); false drops those rows."),
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
        metadata=_help("Hub dataset id, a local SQuAD file (nested .json, or flat .jsonl / .jsonl.gz / .parquet), "
                       "or a folder of split files (train-v1.1.json, dev-v1.1.json, ...)."),
    )
    data_dir: str | None = field(default=None, metadata=_help("Subset folder of a hub dataset or a local folder."))
    train_split: str = field(default="train", metadata=_help("Split whose questions are the PPO prompts."))
    eval_split: str | None = field(
        default="validation",
        metadata=_help(_EVAL_SPLIT_HELP.format(what=" used by the evaluate stage ('validation' also finds dev*)")),
    )
    eval_fraction: float = field(default=0.05, metadata=_help(_EVAL_FRACTION_HELP.format(group="a context")))
    train_files: list[str] | None = field(default=None, metadata=_help(_FILES_HELP.format(split="train")))
    eval_files: list[str] | None = field(default=None, metadata=_help(_FILES_HELP.format(split="eval")))
    max_train_samples: int | None = field(default=None, metadata=_help("Use at most this many training prompts."))
    max_eval_samples: int | None = field(default=None, metadata=_help("Use at most this many held-out prompts."))
    max_prompt_length: int = field(default=512, metadata=_help("Token budget of a prompt (chat template included)."))
    long_prompts: Literal["drop", "cut_context"] = field(
        default="drop",
        metadata=_help("Longer prompts: 'drop' (counted), or 'cut_context' to whole sentences around every "
                       "answer (a row that would lose an answer is dropped as answer_cut)."),
    )
    on_malformed: Literal["skip", "error"] = field(
        default="skip",
        metadata=_help("Malformed records ('answer_start': null, no id, ...): 'skip' counts them, 'error' stops."),
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
    seed: int = field(default=0, metadata=_help("Seed for sub-sampling, shuffling and carving held-out rows."))
    max_drop_fraction: float = field(
        default=0.5,
        metadata=_help("Stop the data stage when loading or fitting drops more than this share of a split's rows."),
    )


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


@dataclass
class Recipe:
    model: ModelConfig = field(metadata=_help("The frozen base model every role shares."))
    quantization: QuantizationConfig = field(
        default_factory=QuantizationConfig, metadata=_help("Optional 4-bit loading of the base.")
    )
    data: DataConfig = field(default_factory=DataConfig, metadata=_help("Preference pairs and PPO prompts."))
    reward: Any = field(
        default=None,
        metadata=_help(
            "Reward-adapter stage: RewardAdapterConfig fields (trl.RewardConfig plus the reward LoRA).",
            section=lambda: reward_section_class(),
        ),
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
            f.name: to_plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if not f.metadata.get("internal")
        }


# The policy LoRA fields of the ppo section (LoraArguments: one declaration for every adapter).
PPO_LORA_FIELDS = tuple(f.name for f in dataclasses.fields(LoraArguments))
# Config fields a recipe sets elsewhere: the value comes from that key.
LAUNCHER_SET = "nothing: accelerate launch sets each process's rank"
PPO_DERIVED_FIELDS = {
    "output_dir": "output_dir (top level, or --output_dir)",
    "model_init_kwargs": "model.dtype and the quantization section (the ppo stage builds the model)",
    "local_rank": LAUNCHER_SET,
}
REWARD_DERIVED_FIELDS = {
    "local_rank": LAUNCHER_SET,
    "output_dir": "output_dir (top level, or --output_dir; the reward stage writes to <output_dir>/reward)",
    "dtype": "model.dtype",
    "model_init_kwargs": "model.dtype (the reward stage loads the base model)",
    "trust_remote_code": "model.trust_remote_code",
    "use_cpu": "nothing: it is on exactly when no CUDA device is visible",
    # The data stage holds out the pairs (saved as data/preference_eval); the reward stage evaluates on them.
    "eval_fraction": "data.preference.eval_fraction (the data stage holds out the pairs: data/preference_eval)",
}


@functools.cache
def ppo_section_class() -> type:
    """A dataclass with MultiAdapterPPOConfig's fields (types, defaults, help) plus the policy LoRA fields."""
    from ..ppo_config import MultiAdapterPPOConfig

    return _section_class_from("PPOSection", MultiAdapterPPOConfig, PPO_DERIVED_FIELDS, extra=LoraArguments)


@functools.cache
def reward_section_class() -> type:
    """A dataclass with RewardAdapterConfig's fields (its LoRA included), less the derived ones."""
    from ..reward import RewardAdapterConfig

    return _section_class_from("RewardSection", RewardAdapterConfig, REWARD_DERIVED_FIELDS)


def _section_class_from(name: str, config_class: type, derived: dict[str, str], extra: type | None = None) -> type:
    """A plain dataclass mirroring ``config_class``'s init fields (and ``extra``'s), without ``derived``.

    Plain data: building it runs none of the config class's checks, so a recipe loads on any machine;
    ``stage_configs`` builds the real config from it.
    """
    specs = []
    for cls in (config_class, extra) if extra is not None else (config_class,):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name in derived or any(f.name == spec[0] for spec in specs):
                continue
            default = (
                field(default_factory=f.default_factory, metadata=f.metadata)
                if f.default_factory is not dataclasses.MISSING
                else field(default=f.default, metadata=f.metadata)
            )
            specs.append((f.name, hints[f.name], default))
    section = dataclasses.make_dataclass(name, specs)
    section.config_class = config_class
    section.derived_fields = derived
    return section


def to_plain(value: Any) -> Any:
    """Plain (YAML-safe) data: dataclasses become mappings of their init fields, enums their values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.init and not f.metadata.get("internal")}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [to_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    return value
