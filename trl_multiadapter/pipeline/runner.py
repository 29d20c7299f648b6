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

from ..recipe import Recipe, RecipeError, check_model_source, check_runtime
from ..registry import stages

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
    check_model_source(recipe)
    selected = _selected_stages(recipe, until, only)
    run_dir = Path(recipe.output_dir)
    process_index, num_processes = _process_info()
    # Accept the run before writing anything: a folder holding another recipe's finished stages is refused
    # here, and the refusal leaves recipe.yaml and the report as they were.
    fingerprints = {name: stage_fingerprint(recipe, name) for name in selected}
    finished_before = {name: read_stage_marker(run_dir / name, name, fingerprints[name]) for name in selected}
    if process_index == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_text_atomically(run_dir / RECIPE_FILE, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    _barrier()
    results: dict[str, StageResult] = {}
    outcomes: list[StageOutcome] = []
    for name in selected:
        stage_dir = run_dir / name
        finished = finished_before[name]  # running a stage never writes another stage's marker
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
            write_stage_marker(stage_dir, name, result, fingerprints[name])
        _barrier()
        results[name] = result
        outcomes.append(StageOutcome(name, "ran", result))
        if on_stage:
            on_stage(name, "done")
    from ..report import build_report, write_report

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

    from ..devices import use_cpu

    # Without CUDA, accelerate only forms a gloo group when asked for CPU explicitly.
    return PartialState(cpu=use_cpu())


def _barrier() -> None:
    if _distributed_launch():
        _partial_state().wait_for_everyone()
