"""Run a recipe's stages in order, skip the finished ones, and write the run report.

Layout of a run folder (``recipe.output_dir``)::

    recipe.yaml          the resolved recipe this run uses
    base_model/          the builtin test model, saved once (builtin:... recipes only)
    data/                encoded datasets + data_report.json          (stage "data")
    reward/              reward adapter + score head + metrics        (stage "reward")
    ppo/                 checkpoints, final adapters, training log    (stage "ppo")
    evaluate/            metrics.json, samples.jsonl, PNG plots       (stage "evaluate")
    export/              policy adapter + model card, value head, reward adapter (stage "export")
    report.md, report.json

A stage is a registered callable ``stage(context: StageContext) -> StageResult``
(``trl_multiadapter.registry.register_stage``); plugins add stages the same way. A stage is finished when
its folder holds ``stage.json`` (written last, atomically, by the main process); a rerun skips it and reads
its numbers back, so a rerun of a finished run only checks and reports. ``stage.json`` also records a
fingerprint of the recipe sections the stage depends on: a rerun with a changed recipe stops with a
message instead of mixing results of two recipes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .ground_truth import planted_rule_metrics, supplies_ground_truth
from .recipe import DEFAULT_STAGES, Recipe, RecipeError, check_runtime
from .registry import register_data_source, register_stage, stages

logger = logging.getLogger(__name__)

STAGE_MARKER = "stage.json"
RECIPE_FILE = "recipe.yaml"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
BASE_MODEL_DIR = "base_model"
# Which recipe sections each built-in stage's output depends on (for the rerun fingerprint).
STAGE_INPUTS = {
    "data": ("model", "data"),
    "reward": ("model", "quantization", "data", "reward"),
    "ppo": ("model", "quantization", "data", "reward", "ppo"),
    "evaluate": ("model", "quantization", "data", "reward", "ppo", "evaluate"),
    "export": ("model", "quantization", "data", "reward", "ppo", "export"),
}


class StageFailedError(RuntimeError):
    """A stage raised; the message names the stage and its folder."""


@dataclass
class StageResult:
    """What a stage did: the report derives throughput and cost from ``samples``, ``tokens`` and the time."""

    samples: int = 0  # items processed (pairs, prompts, generations), over all epochs and processes
    tokens: int = 0  # tokens processed, same convention
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> path relative to the run folder
    wall_time_s: float = 0.0  # filled in by the runner

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclass
class StageContext:
    """What a stage gets: its recipe section through ``recipe``, its folder, and earlier results."""

    name: str
    recipe: Recipe
    run_dir: Path
    stage_dir: Path
    options: dict[str, Any]  # recipe.stage_options[name] (plugin stages)
    results: dict[str, StageResult]  # finished earlier stages (run or skipped), by name
    process_index: int = 0
    num_processes: int = 1

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def path(self, stage: str) -> Path:
        return self.run_dir / stage

    def wait_for_everyone(self) -> None:
        _barrier()


@dataclass
class StageOutcome:
    name: str
    status: str  # "ran" or "skipped"
    result: StageResult


@dataclass
class RunReport:
    run_dir: Path
    outcomes: list[StageOutcome]
    report: dict[str, Any]


# -------------------------------------------------------------------------------------------- the runner


def run_pipeline(
    recipe: Recipe,
    *,
    until: str | None = None,
    only: Sequence[str] | None = None,
    on_stage: Callable[[str, str], None] | None = None,
) -> RunReport:
    """Run the recipe's stages (up to and including ``until``, or just ``only``), skipping finished ones.

    Raises ``RecipeError`` (before any work) when the machine cannot run the recipe or the run folder
    holds results of a different recipe.
    """
    check_runtime(recipe)
    selected = _selected_stages(recipe, until, only)
    run_dir = Path(recipe.output_dir)
    process_index, num_processes = _process_info()
    # Accept the run before writing anything: a folder holding another recipe's finished stages is refused
    # here, and the refusal leaves recipe.yaml and the report as they were.
    fingerprints = {name: stage_fingerprint(recipe, name) for name in selected}
    for name in selected:
        read_stage_marker(run_dir / name, name, fingerprints[name])
    if process_index == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_text_atomically(run_dir / RECIPE_FILE, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    _barrier()
    results: dict[str, StageResult] = {}
    outcomes: list[StageOutcome] = []
    for name in selected:
        stage_dir = run_dir / name
        fingerprint = stage_fingerprint(recipe, name)
        finished = read_stage_marker(stage_dir, name, fingerprint)
        if finished is not None:
            results[name] = finished
            outcomes.append(StageOutcome(name, "skipped", finished))
            if on_stage:
                on_stage(name, "skipped")
            continue
        if on_stage:
            on_stage(name, "running")
        context = StageContext(name, recipe, run_dir, stage_dir, dict(recipe.stage_options.get(name, {})),
                               dict(results), process_index, num_processes)
        result = _run_stage(context)
        if process_index == 0:
            write_stage_marker(stage_dir, name, result, fingerprint)
        _barrier()
        results[name] = result
        outcomes.append(StageOutcome(name, "ran", result))
        if on_stage:
            on_stage(name, "done")
    from .report import build_report, write_report

    report = build_report(recipe, outcomes)
    if process_index == 0:
        write_report(run_dir, report)
    return RunReport(run_dir, outcomes, report)


def _selected_stages(recipe: Recipe, until: str | None, only: Sequence[str] | None) -> list[str]:
    names = list(recipe.stages)
    for requested in ([until] if until else []) + list(only or []):
        if requested not in names:
            raise RecipeError("stages", f"the recipe does not run the stage {requested!r}: it runs {names}.",
                              f"add {requested!r} to stages, or run another command.")
    if only:
        return [name for name in names if name in only]
    if until:
        return names[: names.index(until) + 1]
    return names


def _run_stage(context: StageContext) -> StageResult:
    stage = stages.get(context.name)
    started = time.perf_counter()
    logger.info("stage %s: running into %s", context.name, context.stage_dir)
    context.stage_dir.mkdir(parents=True, exist_ok=True)
    result = stage(context)
    if not isinstance(result, StageResult):
        raise StageFailedError(
            f"stage {context.name!r} returned {type(result).__name__}; a stage must return a StageResult."
        )
    result.wall_time_s = time.perf_counter() - started
    return result


def stage_fingerprint(recipe: Recipe, name: str) -> str:
    sections = STAGE_INPUTS.get(name, ("model", "quantization", "data", "reward", "ppo"))
    plain = recipe.to_dict()
    content = {section: plain[section] for section in sections}
    content["stage_options"] = plain["stage_options"].get(name, {})
    encoded = json.dumps(content, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def read_stage_marker(stage_dir: Path, name: str, fingerprint: str) -> StageResult | None:
    """The result of a finished stage, None when it has not finished; a changed recipe is an error."""
    marker = stage_dir / STAGE_MARKER
    if not marker.is_file():
        return None
    saved = json.loads(marker.read_text())
    if saved.get("fingerprint") != fingerprint:
        sections = ", ".join(STAGE_INPUTS.get(name, ("the recipe",)))
        raise RecipeError(
            "output_dir",
            f"{stage_dir} holds a finished '{name}' stage of a different recipe (one of {sections} changed).",
            f"use a new --output_dir, or delete {stage_dir} (and the stages after it) to redo it.",
        )
    return StageResult.from_dict(saved["result"])


def write_stage_marker(stage_dir: Path, name: str, result: StageResult, fingerprint: str) -> None:
    payload = {"stage": name, "fingerprint": fingerprint, "finished_at": time.time(), "result": result.to_dict()}
    _write_text_atomically(stage_dir / STAGE_MARKER, json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _write_text_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=f".{path.name}.",
                                     encoding="utf-8") as handle:
        handle.write(text)
        temporary = handle.name
    os.replace(temporary, path)


def _process_info() -> tuple[int, int]:
    """(rank, world size) under accelerate/torchrun; the process group itself is set up lazily by stages."""
    if not _distributed_launch():
        return 0, 1
    state = _partial_state()
    return state.process_index, state.num_processes


def _distributed_launch() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _partial_state():
    from accelerate import PartialState

    from .devices import use_cpu

    # Without CUDA, accelerate only forms a gloo group when asked for CPU explicitly.
    return PartialState(cpu=use_cpu())


def _barrier() -> None:
    if _distributed_launch():
        _partial_state().wait_for_everyone()


# ---------------------------------------------------------------------------------------- shared helpers


def base_model_path(context: StageContext) -> str:
    """The base model as a path or hub id; a builtin test model lives under the run folder (see
    ``materialise_base_model``, which the data stage calls)."""
    model = context.recipe.model
    if not model.is_builtin:
        return model.name_or_path
    path = context.run_dir / BASE_MODEL_DIR
    if not (path / "config.json").is_file():
        raise StageFailedError(f"{path} is missing: the data stage saves the builtin base model there; "
                               f"run the 'data' stage (or delete {context.run_dir / 'data'} to redo it).")
    return str(path.resolve())


def materialise_base_model(context: StageContext) -> None:
    """Save a builtin test model once under the run folder, so every stage and the export refer to a path.
    Called by every process (it synchronises them)."""
    model = context.recipe.model
    path = context.run_dir / BASE_MODEL_DIR
    if model.is_builtin and context.is_main_process and not (path / "config.json").is_file():
        from .testing import build_tiny_model, build_tiny_tokenizer_for

        tmp = context.run_dir / f".tmp-{BASE_MODEL_DIR}"
        build_tiny_model(model.builtin_size, task="causal", seed=model.seed).save_pretrained(tmp)
        build_tiny_tokenizer_for(model.builtin_size).save_pretrained(tmp)
        os.replace(tmp, path)
    context.wait_for_everyone()


def load_tokenizer(context: StageContext):
    model = context.recipe.model
    if model.is_builtin:
        from .testing import build_tiny_tokenizer_for

        return build_tiny_tokenizer_for(model.builtin_size)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.tokenizer or model.name_or_path, revision=model.revision,
                                         trust_remote_code=model.trust_remote_code)


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
    from .registry import data_sources

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
    from .data import DataSourceError
    from .registry import data_sources

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
    from .data import EVAL_SPLIT, NO_HELD_OUT, HeldOutReport, carve_held_out, carve_reason
    from .registry import data_sources

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
    from .data import check_drop_fraction

    if report is not None and hasattr(report, "dropped_total"):
        check_drop_fraction(report, max_drop_fraction, "data.max_drop_fraction")


def _prepare(kind: str, raw, tokenizer, section: Any):
    from .data import prepare_preference_pairs, prepare_prompts

    if kind == "preference":
        return prepare_preference_pairs(raw, tokenizer, section.max_length)
    return prepare_prompts(raw, tokenizer, section.max_prompt_length, section.long_prompts)


def _prepared_tokens(kind: str, prepared, tokenizer) -> int:
    from .data import encode_chat

    if kind == "prompts":
        return _token_count(prepared, ("input_ids",))
    return sum(len(encode_chat(tokenizer, row["prompt"] + row["chosen"]))
               + len(encode_chat(tokenizer, row["prompt"] + row["rejected"])) for row in prepared)


@register_stage("data")
def data_stage(context: StageContext) -> StageResult:
    """Parse, encode and save the preference pairs and prompts, with held-out eval splits that no train row
    repeats; report kept / shortened / flagged / dropped counts and how each eval split was made."""
    from .data import drop_train_overlap

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


# ----------------------------------------------------------------------------------------- reward stage


@register_stage("reward")
def reward_stage(context: StageContext) -> StageResult:
    """Train the reward adapter with trl.RewardTrainer; report held-out pairwise accuracy."""
    from .recipe import build_reward_config
    from .reward import train_reward_adapter

    recipe = context.recipe
    train = load_stage_dataset(context, "preference_train")
    if train is None:
        raise StageFailedError("the reward stage needs the data stage's preference pairs; run the 'data' stage.")
    eval_pairs = load_stage_dataset(context, "preference_eval")
    result = train_reward_adapter(
        base_model_path(context),
        train,
        tokenizer=load_tokenizer(context),
        output_dir=context.stage_dir,
        config=build_reward_config(recipe.reward, recipe.model),
        eval_dataset=eval_pairs,
        quantization_config=recipe.quantization.bitsandbytes_config(),
    )
    metrics = dict(result.metrics)
    epochs = recipe.reward.num_train_epochs if recipe.reward.max_steps < 0 else None
    pairs = metrics.get("train_pairs", len(train))
    samples = int(round(pairs * epochs)) if epochs else recipe.reward.max_steps * (
        recipe.reward.per_device_train_batch_size * recipe.reward.gradient_accumulation_steps * context.num_processes
    )
    return StageResult(samples=samples, tokens=int(metrics.get("train_tokens", 0)), metrics=metrics,
                       artifacts={"reward_adapter": "reward"})


# -------------------------------------------------------------------------------------------- ppo stage

PPO_FINAL_DIR = "final"
LOG_HISTORY_FILE = "log_history.json"


def ppo_config_for(context: StageContext):
    """The MultiAdapterPPOConfig of this run: the recipe's ppo section, checkpoints under the stage folder, and
    the model's load options (dtype, 4-bit, this process's device) for the trainer's one model builder."""
    from .devices import process_device_map, use_cpu
    from .recipe import build_ppo_config

    recipe = context.recipe
    quantization = recipe.quantization.bitsandbytes_config()
    model_init_kwargs = {"dtype": recipe.model.dtype, **process_device_map()}
    if quantization is not None:
        model_init_kwargs["quantization_config"] = quantization.to_dict()  # JSON-friendly, as ppo_config.json keeps it
    return build_ppo_config(recipe.ppo, output_dir=context.stage_dir, model_init_kwargs=model_init_kwargs,
                            **({"use_cpu": True} if use_cpu() else {}))


def _device_map(recipe: Recipe) -> dict[str, Any]:
    from .devices import process_device_map

    return process_device_map()


@register_stage("ppo")
def ppo_stage(context: StageContext) -> StageResult:
    """Train the policy adapter + value head with PPO; checkpoints under ppo/, resumed after a kill."""
    from .checkpointing import latest_checkpoint
    from .ppo_trainer import MultiAdapterPPOTrainer

    prompts = load_stage_dataset(context, "prompts_train")
    if prompts is None:
        raise StageFailedError("the ppo stage needs the data stage's prompts; run the 'data' stage.")
    if not (context.path("reward") / STAGE_MARKER).is_file() and not (context.path("reward") / "_COMPLETE").is_file():
        raise StageFailedError("the ppo stage needs a finished reward adapter; run the 'reward' stage.")
    from .recipe import ppo_lora_config

    args = ppo_config_for(context)
    # The trainer builds base + policy LoRA + value head + reward adapter (seeded by args.seed, so a resumed
    # run that skipped the earlier stages starts from the same weights).
    trainer = MultiAdapterPPOTrainer(
        model=base_model_path(context),
        args=args,
        processing_class=load_tokenizer(context),
        train_dataset=prompts,
        reward_adapter=str(context.path("reward")),
        reward_funcs=_reward_functions(context),
        peft_config=None if args.policy_adapter else ppo_lora_config(context.recipe.ppo),
    )
    checkpoint = latest_checkpoint(context.stage_dir)
    if checkpoint is not None:
        print(f"[ppo] resuming from {checkpoint}", flush=True)
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    trainer.save_model(str(context.stage_dir / PPO_FINAL_DIR))
    history = trainer.state.log_history
    if context.is_main_process:
        _write_text_atomically(context.stage_dir / LOG_HISTORY_FILE, json.dumps(history, indent=1,
                                                                              default=_json_default))
    iterations = output.global_step
    # Throughput counts what this process did: a resumed stage ran only the iterations after its checkpoint.
    resumed_at = trainer_checkpoint_step(checkpoint)
    samples = (iterations - resumed_at) * args.batch_size * context.num_processes
    lengths = [entry["val/response_length"] for entry in history if "val/response_length" in entry]
    mean_response = sum(lengths) / len(lengths) if lengths else float(args.max_new_tokens)
    mean_prompt = sum(len(ids) for ids in prompts["input_ids"]) / max(len(prompts), 1)
    final = {key: value for key, value in (history[-1] if history else {}).items() if isinstance(value, (int, float))}
    metrics = {"iterations": iterations, "iterations_this_run": iterations - resumed_at,
               "resumed_from": str(checkpoint) if checkpoint else None, **final}
    return StageResult(samples=samples, tokens=int(samples * (mean_prompt + mean_response)), metrics=metrics,
                       artifacts={"adapters": f"ppo/{PPO_FINAL_DIR}", "log_history": f"ppo/{LOG_HISTORY_FILE}"})


def trainer_checkpoint_step(checkpoint: Path | None) -> int:
    """The PPO iteration a ``checkpoint-<step>`` folder was written at (0 without one)."""
    return int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint is not None else 0


def _reward_functions(context: StageContext) -> list | None:
    """Registered reward functions named in stage_options.ppo.reward_funcs (instead of the reward adapter)."""
    from .registry import reward_functions

    names = context.options.get("reward_funcs")
    if not names:
        return None
    return [reward_functions.get(name) for name in names]


# --------------------------------------------------------------------------------------- evaluate stage


def load_trained_model(context: StageContext):
    """The shared base with every adapter of the finished PPO stage (policy, reward, value head)."""
    from .devices import process_device_map
    from .model import MultiAdapterModel

    recipe = context.recipe
    final = context.path("ppo") / PPO_FINAL_DIR
    if not final.is_dir():
        raise StageFailedError(f"{final} is missing; run the 'ppo' stage first.")
    model = MultiAdapterModel.from_pretrained(
        base_model_path(context), from_saved=str(final), quantization_config=recipe.quantization.bitsandbytes_config(),
        dtype=recipe.model.dtype, **process_device_map(),
    )
    return model.eval()


@register_stage("evaluate")
def evaluate_stage(context: StageContext) -> StageResult:
    """Base vs aligned on held-out prompts, sampled by PPO's sampler with PPO's settings: metrics.json,
    samples.jsonl, PNG plots (main process only)."""
    from .evaluate import evaluate_policies, mixed_precision, sampling_settings, write_outputs
    from .ground_truth import ground_truth_for
    from .plots import plot_reward_histogram, plot_training_curves

    settings, ppo, data = context.recipe.evaluate, context.recipe.ppo, context.recipe.data
    metrics: dict[str, Any] = {}
    samples = tokens = 0
    if context.is_main_process:
        prompts = load_stage_dataset(context, "prompts_eval")
        if prompts is None or len(prompts) == 0:
            raise StageFailedError("the evaluate stage needs held-out prompts (data.prompts.eval_split).")
        prompts = prompts.select(range(min(settings.num_prompts, len(prompts))))
        model = load_trained_model(context)
        tokenizer = load_tokenizer(context)
        with mixed_precision(ppo, model.device):
            metrics, records, scores = evaluate_policies(
                model, tokenizer, prompts, sampling_settings(ppo, settings, tokenizer, model),
                batch_size=settings.batch_size, seed=settings.seed,
                end_of_turn_token=getattr(ppo, "end_of_turn_token", "auto"),
                ground_truth=ground_truth_for((data.preference.source, data.prompts.source)),
            )
        write_outputs(context.stage_dir, metrics, records, settings.num_shown_samples)
        plot_reward_histogram(scores, context.stage_dir / "reward_histogram.png")
        history_file = context.path("ppo") / LOG_HISTORY_FILE
        if history_file.is_file():
            plot_training_curves(json.loads(history_file.read_text()), context.stage_dir / "training_curves.png")
        prompt_tokens = sum(len(ids) for ids in prompts["input_ids"])
        samples = 2 * len(prompts)
        tokens = 2 * prompt_tokens + int(len(prompts) * (metrics["base"]["response_length"]
                                                         + metrics["aligned"]["response_length"]))
    context.wait_for_everyone()
    summary = {f"{policy}_{key}": value for policy in ("base", "aligned")
               for key, value in metrics.get(policy, {}).items()}
    if "win_rate" in metrics:
        summary["win_rate"] = metrics["win_rate"]
    return StageResult(samples=samples, tokens=tokens, metrics=summary,
                       artifacts={"metrics": "evaluate/metrics.json", "samples": "evaluate/samples.jsonl",
                                  "reward_histogram": "evaluate/reward_histogram.png",
                                  "training_curves": "evaluate/training_curves.png"})


# ----------------------------------------------------------------------------------------- export stage


@register_stage("export")
def export_stage(context: StageContext) -> StageResult:
    """Servable policy adapter + model card, value head, reward adapter; optional merged model and hub push."""
    from .export import (
        MERGED_DIR,
        MODEL_CARD,
        POLICY_DIR,
        copy_saved_adapters,
        merge_policy,
        model_card,
        push_policy,
    )

    recipe = context.recipe
    artifacts = {"model_card": f"export/{MODEL_CARD}", "policy_adapter": f"export/{POLICY_DIR}",
                 "reward_adapter": "export/reward", "value_head": "export/value_head.safetensors"}
    metrics: dict[str, Any] = {}
    if context.is_main_process:
        final = context.path("ppo") / PPO_FINAL_DIR
        if not final.is_dir():
            raise StageFailedError(f"{final} is missing; run the 'ppo' stage first.")
        base = base_model_path(context)
        copy_saved_adapters(final, context.stage_dir, base)
        evaluation = context.path("evaluate") / "metrics.json"
        reward_metrics_file = context.path("reward") / "reward_metrics.json"
        reward_metrics = json.loads(reward_metrics_file.read_text())["metrics"] if reward_metrics_file.is_file() else {}
        card = model_card(recipe, json.loads(evaluation.read_text()) if evaluation.is_file() else None,
                          reward_metrics)
        # One card: at the top of the export, and in policy/ because that folder is what the hub push uploads.
        for folder in (context.stage_dir, context.stage_dir / POLICY_DIR):
            (folder / MODEL_CARD).write_text(card)
        if recipe.export.merged_model:
            merge_policy(base, context.stage_dir / POLICY_DIR, context.stage_dir / MERGED_DIR, recipe.model.dtype,
                         load_tokenizer(context))
            artifacts["merged_model"] = f"export/{MERGED_DIR}"
        if recipe.export.push_to_hub:
            metrics["hub_url"] = push_policy(context.stage_dir / POLICY_DIR, recipe.export.hub_model_id,
                                             recipe.export.hub_private)
    context.wait_for_everyone()
    return StageResult(metrics=metrics, artifacts=artifacts)


# ------------------------------------------------------------------------------------ synthetic sources


@register_data_source("synthetic_hh_rlhf")
@supplies_ground_truth(planted_rule_metrics)
def synthetic_hh_rlhf(split: str = "train", train_size: int = 256, eval_size: int = 64, seed: int = 0,
                      neutral_rejected: float = 0.0, terse_rejected: float = 0.0, on_bad_row: str = "skip",
                      return_report: bool = False):
    """Synthetic hh-rlhf pairs with a planted preference (trl_multiadapter.testing), read by the real loader."""
    from .data import load_hh_rlhf
    from .testing import write_tiny_hh_rlhf

    size, split_seed = (train_size, seed) if split == "train" else (eval_size, seed + 10_000)
    with tempfile.TemporaryDirectory() as folder:
        path = write_tiny_hh_rlhf(Path(folder) / f"{split}.jsonl", n=size, seed=split_seed,
                                  neutral_rejected=neutral_rejected, terse_rejected=terse_rejected)
        return load_hh_rlhf(path, split=split, on_bad_row=on_bad_row, return_report=return_report)


@register_data_source("synthetic_squad")
def synthetic_squad(split: str = "train", train_size: int = 128, eval_size: int = 32, seed: int = 0,
                    system_prompt: str | None = None):
    """Synthetic SQuAD questions in the original nested format, read by the real loader."""
    from .data import load_squad_prompts
    from .testing import write_tiny_squad

    size, split_seed = (train_size, seed) if split == "train" else (eval_size, seed + 10_000)
    with tempfile.TemporaryDirectory() as folder:
        path = write_tiny_squad(Path(folder) / f"{split}.json", n=size, seed=split_seed)
        return load_squad_prompts(path, split=split, system_prompt=system_prompt)


__all__ = [
    "DEFAULT_STAGES",
    "RunReport",
    "StageContext",
    "StageResult",
    "call_data_source",
    "run_pipeline",
]
