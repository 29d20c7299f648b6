"""The data stage: check and load the sources, carve held-out splits, encode, save ``data/``."""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..recipe import Recipe, RecipeError
from ..registry import register_stage
from .runner import (
    STAGE_MARKER,
    StageContext,
    StageResult,
    _write_text_atomically,
    logger,
)
from .shared import load_tokenizer, materialise_base_model

# ------------------------------------------------------------------------------------------- data stage

DATA_FILES = {
    "preference_train": "preference_train",
    "preference_eval": "preference_eval",
    "prompts_train": "prompts_train",
    "prompts_eval": "prompts_eval",
}
DATA_REPORT_FILE = "data_report.json"


def call_data_source(name: str, section: Any, split: str, files: Sequence[str] | None = None) -> tuple[Any, Any | None]:
    """Call a registered data source with the arguments of ``section`` it accepts; (dataset, report|None).

    ``files``: an explicit list of the split's files (``train_files`` / ``eval_files``), passed as the
    source's ``path_or_hub_id`` instead of ``section.path`` + ``data_dir``.
    """
    from ..registry import data_sources

    source = data_sources.get(name)
    candidates = {
        "path_or_hub_id": resolve_split_files(section, files) if files else section.path,
        "data_dir": None if files else getattr(section, "data_dir", None),
        "split": split,
        "system_prompt": getattr(section, "system_prompt", None),
        "on_bad_row": getattr(section, "on_malformed", None),
        "merge_turns": getattr(section, "merge_turns", None),
        "return_report": True,
    }
    parameters = inspect.signature(source).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    kwargs = {key: value for key, value in candidates.items() if key in parameters or takes_any}
    for key in ("path_or_hub_id", "on_bad_row", "merge_turns"):  # not set in this section: the source's default
        if kwargs.get(key) is None:
            kwargs.pop(key, None)
    kwargs.update(section.options)
    output = source(**kwargs)
    if isinstance(output, tuple):
        return output[0], output[1]
    return output, None


def resolve_split_files(section: Any, files: Sequence[str]) -> list[str]:
    """``train_files`` / ``eval_files`` as paths: relative ones below ``path`` (and ``data_dir``) when
    ``path`` is a folder, else below the working directory."""
    base = Path(".")
    if section.path is not None and Path(section.path).expanduser().is_dir():
        base = Path(section.path).expanduser() / (getattr(section, "data_dir", None) or "")
    return [str(Path(name).expanduser() if Path(name).expanduser().is_absolute() else base / name) for name in files]


# Which recipe key chose the source, by the loader argument a DataSourceError names.
_SOURCE_KEYS = {"path_or_hub_id": "path", "data_dir": "data_dir", "split": "{role}_split", "files": "{role}_files"}


def check_data_sources(recipe: Recipe, *, dry_run: bool = False) -> list[str]:
    """Check every data source of the recipe in seconds, before any work (``run`` and ``--dry_run``).

    Files exist and are what their names say, each split resolves to its files, the first rows have the
    loader's fields, ``data_dir`` is not given with a file, hub ids are reachable. Only sources that carry
    a check (the built-in ``hh_rlhf`` and ``squad``; plugins may add ``check_split``) are looked at.
    Raises ``RecipeError`` naming the key (``data.preference.path: ...``); returns notes (a carved eval
    split, a hub id a dry run could not reach).
    """
    from ..data import DataSourceError
    from ..registry import data_sources

    notes = []
    for kind in ("preference", "prompts"):
        section = getattr(recipe.data, kind)
        source = data_sources.get(section.source)
        check = getattr(source, "check_split", None)
        if check is None:
            continue
        default = inspect.signature(source).parameters.get("path_or_hub_id")
        for role in ("train", "eval"):
            split, files = getattr(section, f"{role}_split"), getattr(section, f"{role}_files")
            if split is None and not files:
                continue
            path = resolve_split_files(section, files) if files else section.path
            if path is None and default is not None:
                path = default.default
            try:
                note = check(path, None if files else getattr(section, "data_dir", None), split or role,
                             required=role == "train" or bool(files))
            except DataSourceError as error:
                if dry_run and error.hub:
                    notes.append(f"data.{kind}.path: {error} (a dry run goes on; a run stops here)")
                    continue
                key = _SOURCE_KEYS.get(error.argument, "path").format(role=role)
                if files and key == "path":
                    key = f"{role}_files"
                fix = error.fix + (f" (data.{kind}.{role}_files: [...])" if error.argument == "split" else "")
                raise RecipeError(f"data.{kind}.{key}", f"{error.source}: {error.problem}.", f"{fix}.") from None
            if note:
                notes.append(f"data.{kind} {role}: {note}")
    return list(dict.fromkeys(notes))  # one hub id checked for both splits is one note


def data_stage_pending(recipe: Recipe) -> bool:
    """True when a run would execute the data stage (it is in the recipe and not finished)."""
    return "data" in recipe.stages and not (Path(recipe.output_dir) / "data" / STAGE_MARKER).is_file()


def _subsample(dataset, limit: int | None, seed: int):
    if limit is None or len(dataset) <= limit:
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit))


def _report_dict(report: Any) -> dict[str, Any] | None:
    if report is None:
        return None
    return {"step": report.step, "total": report.total, "kept": report.kept, "shortened": report.shortened,
            "dropped": dict(report.dropped), "flagged": dict(getattr(report, "flagged", {})),
            "examples": {k: list(v) for k, v in report.examples.items()}}


def _token_count(dataset, columns: Sequence[str]) -> int:
    return sum(len(ids) for column in columns if column in dataset.column_names for ids in dataset[column])


@dataclass
class _DataKind:
    """What differs between the two data sets of the data stage."""

    name: str  # "preference" or "prompts"
    group_columns: tuple[str, ...]  # rows carved together (a conversation, a SQuAD paragraph)
    content_columns: tuple[str, ...]  # a saved eval row must not equal a saved train row on these


_DATA_KINDS = (
    _DataKind("preference", ("prompt",), ("prompt", "chosen", "rejected")),
    _DataKind("prompts", ("context",), ("prompt",)),
)


def load_train_and_eval(kind: str, section: Any, seed: int) -> dict[str, Any]:
    """The raw train and eval rows of one data section, with their load reports and how eval was made.

    The eval split is the source's own unless there is none (``eval_split: null``, a single file, a folder
    without it): then ``eval_fraction`` of the train rows is carved out (``data.splits.carve_held_out``).
    Returns ``{"train": ..., "eval": ... | None, "train_report", "eval_report", "held_out": HeldOutReport}``.
    """
    from ..data import EVAL_SPLIT, NO_HELD_OUT, HeldOutReport, carve_held_out, carve_reason
    from ..registry import data_sources

    data_kind = next(item for item in _DATA_KINDS if item.name == kind)
    train, train_report = call_data_source(section.source, section, section.train_split, section.train_files)
    if section.eval_files:
        reason = None
    else:
        reads_files = getattr(data_sources.get(section.source), "reads_split_files", False)
        reason = carve_reason(section.path, getattr(section, "data_dir", None), section.eval_split, reads_files)
    if reason is None:
        eval_rows, eval_report = call_data_source(section.source, section, section.eval_split, section.eval_files)
        what = "eval_files" if section.eval_files else f"split '{section.eval_split}'"
        held_out = HeldOutReport(EVAL_SPLIT, f"the source's own eval rows ({what})")
    elif section.eval_fraction == 0:
        eval_rows = eval_report = None
        held_out = HeldOutReport(NO_HELD_OUT, f"{reason}; eval_fraction is 0: no held-out rows")
    else:
        columns = [c for c in data_kind.group_columns if c in train.column_names] or list(data_kind.content_columns)
        train, eval_rows, held_out = carve_held_out(train, section.eval_fraction, seed, columns, reason)
        eval_report = None
    return {"train": train, "eval": eval_rows, "train_report": train_report, "eval_report": eval_report,
            "held_out": held_out}


def _check_drops(report: Any, max_drop_fraction: float) -> None:
    from ..data import check_drop_fraction

    if report is not None and hasattr(report, "dropped_total"):
        check_drop_fraction(report, max_drop_fraction, "data.max_drop_fraction")


def _prepare(kind: str, raw, tokenizer, section: Any):
    from ..data import prepare_preference_pairs, prepare_prompts

    if kind == "preference":
        return prepare_preference_pairs(raw, tokenizer, section.max_length)
    return prepare_prompts(raw, tokenizer, section.max_prompt_length, section.long_prompts)


def _prepared_tokens(kind: str, prepared, tokenizer) -> int:
    from ..data import encode_chat

    if kind == "prompts":
        return _token_count(prepared, ("input_ids",))
    return sum(len(encode_chat(tokenizer, row["prompt"] + row["chosen"]))
               + len(encode_chat(tokenizer, row["prompt"] + row["rejected"])) for row in prepared)


@register_stage("data")
def data_stage(context: StageContext) -> StageResult:
    """Parse, encode and save the preference pairs and prompts, with held-out eval splits that no train row
    repeats; report kept / shortened / flagged / dropped counts and how each eval split was made."""
    from ..data import drop_train_overlap

    recipe, out = context.recipe, context.stage_dir
    for note in check_data_sources(recipe):  # before the base model or any data is written
        logger.info("stage data: %s", note)
    tokenizer = load_tokenizer(context)
    materialise_base_model(context)
    counts: dict[str, Any] = {}
    samples = tokens = 0
    for data_kind in _DATA_KINDS:
        kind, section = data_kind.name, getattr(recipe.data, data_kind.name)
        loaded = load_train_and_eval(kind, section, recipe.data.seed)
        held_out = loaded["held_out"]
        prepared: dict[str, Any] = {}
        for role in ("train", "eval"):
            if loaded[role] is None:
                continue
            _check_drops(loaded[f"{role}_report"], recipe.data.max_drop_fraction)
            limit = section.max_train_samples if role == "train" else section.max_eval_samples
            rows, prepare_report = _prepare(kind, _subsample(loaded[role], limit, recipe.data.seed), tokenizer, section)
            _check_drops(prepare_report, recipe.data.max_drop_fraction)
            if kind == "prompts" and len(rows) == 0:
                raise RecipeError("data.prompts.max_prompt_length",
                                  f"every {role} prompt is longer than {section.max_prompt_length} tokens.",
                                  "raise data.prompts.max_prompt_length.")
            if role == "eval":  # no stage evaluates on a row it trained on
                rows, held_out = drop_train_overlap(prepared["train"], rows, data_kind.content_columns, held_out)
            prepared[role] = rows
            counts[f"{kind}_{role}"] = {"load": _report_dict(loaded[f"{role}_report"]),
                                        "prepare": _report_dict(prepare_report)}
        held_out.train_rows = len(prepared["train"])
        held_out.eval_rows = len(prepared["eval"]) if "eval" in prepared else 0
        for role, rows in prepared.items():
            counts[f"{kind}_{role}"]["held_out"] = held_out.to_dict()
            if context.is_main_process:
                rows.save_to_disk(str(out / DATA_FILES[f"{kind}_{role}"]))
            samples += len(rows)
            tokens += _prepared_tokens(kind, rows, tokenizer)
    if context.is_main_process:
        _write_text_atomically(out / DATA_REPORT_FILE, json.dumps(counts, indent=2) + "\n")
    metrics = {f"{name}_kept": entry["prepare"]["kept"] for name, entry in counts.items()}
    metrics |= {f"{name}_shortened": entry["prepare"]["shortened"] for name, entry in counts.items()}
    metrics |= {
        f"{name}_dropped": entry["prepare"]["total"] - entry["prepare"]["kept"]
        + (sum(entry["load"]["dropped"].values()) if entry["load"] else 0)
        + (entry["held_out"]["removed_from_eval"] if name.endswith("_eval") else 0)
        for name, entry in counts.items()
    }
    metrics |= {f"{name}_held_out": entry["held_out"]["method"] for name, entry in counts.items()
                if name.endswith("_eval")}
    artifacts = {key: f"data/{value}" for key, value in DATA_FILES.items()
                 if (out / value).exists() or not context.is_main_process}
    artifacts["report"] = f"data/{DATA_REPORT_FILE}"
    return StageResult(samples=samples, tokens=tokens, metrics=metrics, artifacts=artifacts)


def load_stage_dataset(context: StageContext, key: str):
    """A dataset the data stage saved (``preference_train``, ``prompts_eval``, ...), or None."""
    from datasets import load_from_disk

    path = context.path("data") / DATA_FILES[key]
    return load_from_disk(str(path)) if path.exists() else None
