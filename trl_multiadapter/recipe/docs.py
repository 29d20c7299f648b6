"""The key reference of docs/recipes.md, generated from the sections' ``metadata["help"]``."""

from __future__ import annotations

import dataclasses
import json
import typing

from .sections import Recipe, to_plain

# TrainingArguments fields that recipes commonly set, per section; the rest are accepted too but not listed.
_LISTED_TRAINING_ARGUMENTS = {
    "ppo": ("learning_rate", "max_steps", "num_train_epochs", "gradient_accumulation_steps", "max_grad_norm",
            "lr_scheduler_type", "warmup_steps", "weight_decay", "seed", "bf16", "activation_checkpointing",
            "logging_steps", "save_steps", "save_total_limit", "report_to"),
    "reward": ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
               "per_device_eval_batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
               "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "eval_strategy", "eval_steps",
               "save_strategy", "seed", "bf16", "logging_steps", "report_to", "disable_tqdm"),
}


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
                if sub.name in getattr(sub_cls, "derived_fields", {}) or _is_deprecated(sub):
                    continue
                listed = _LISTED_TRAINING_ARGUMENTS.get(path)
                if listed is not None and sub.name in training_fields and sub.name not in listed:
                    continue
                rows.append(_row(sub.name, sub))
            lines += ["", f"### {path}", ""]
            if path in _LISTED_TRAINING_ARGUMENTS:
                lines += ["Also accepted: every other `transformers.TrainingArguments` field (`optim`, `adam_beta2`, ...).", ""]
            lines += ["| key | default | meaning |", "|---|---|---|", *rows]
    return "\n".join(lines) + "\n"


def _is_deprecated(f: dataclasses.Field) -> bool:
    return str(f.metadata.get("help", "")).startswith("Deprecated")


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
        default = to_plain(f.default)
    elif f.default_factory is not dataclasses.MISSING:
        default = to_plain(f.default_factory())
    else:
        default = "(required)"
    shown = "(required)" if default == "(required)" else f"`{json.dumps(default)}`"
    # argparse-escaped percent signs (TrainingArguments' help texts) read as one in the docs
    text = " ".join(str(f.metadata.get("help", "")).split()).replace("%%", "%").replace("|", "\\|")
    return f"| `{name}` | {shown} | {text} |"
