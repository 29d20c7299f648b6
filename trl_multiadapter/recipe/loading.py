"""Reading a recipe: a path or a bundled name, the YAML file, dotted ``--set`` overrides, then ``load``."""

from __future__ import annotations

import copy
import difflib
import importlib.resources
import os
import re
from pathlib import Path
from typing import Any

import yaml

from .coercion import build
from .errors import RecipeError
from .sections import Recipe
from .validation import validate

RECIPE_PACKAGE = "trl_multiadapter.recipes"


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
        raw = copy.deepcopy(data)
        for text in overrides:
            try:
                apply_overrides(raw, [text])
            except RecipeError as error:
                raise error.with_source(f"--set {text}") from None
        if output_dir is not None:
            raw["output_dir"] = str(output_dir)
        recipe = build(Recipe, raw, "")
        recipe.source = source
        validate(recipe)
    except RecipeError as error:
        raise _blame(error, source, overrides, output_dir) from None
    return recipe


def _blame(error: RecipeError, source: str | None, overrides, output_dir) -> RecipeError:
    """The error with where its value came from: the last ``--set`` that wrote its key, ``--output_dir``,
    or else the recipe file (a value from the command line is not the file's fault)."""
    if error.source is not None:
        return error
    for text in reversed(list(overrides)):
        written = ".".join(parse_override(text)[0])
        if error.key_path == written or error.key_path.startswith((f"{written}.", f"{written}[")):
            return error.with_source(f"--set {text}")
    if output_dir is not None and error.key_path == "output_dir":
        return error.with_source("--output_dir")
    return error.with_source(source) if source else error


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
