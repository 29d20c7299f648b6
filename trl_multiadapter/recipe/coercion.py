"""Mapping raw YAML data onto the section dataclasses, checking every value against its type hint."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from typing import Any, Literal

from .errors import RecipeError


def build(cls: type, raw: Any, key_path: str) -> Any:
    """An instance of dataclass ``cls`` from the mapping ``raw``, type-checking every value."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(key_path, f"must be a mapping of keys, got {describe(raw)}.",
                          f"write {key_path or 'the recipe'} as 'key: value' lines.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")}
    derived = getattr(cls, "derived_fields", {})
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        path = join_key(key_path, key)
        if not isinstance(key, str):
            raise RecipeError(path, f"keys must be strings, got {describe(key)}.", "quote the key.")
        if key in derived:
            raise RecipeError(path, "is set elsewhere in a recipe.", f"remove it and set {derived[key]} instead.")
        if key not in fields:
            raise _unknown_key(path, key, sorted(fields))
        values[key] = _field_value(fields[key], hints[key], value, path)
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(join_key(key_path, name), "is required but missing.",
                              f"add '{name}: ...' ({f.metadata.get('help', 'see docs/recipes.md')}).")
        if name not in values and "section" in f.metadata:
            values[name] = _field_value(f, hints[name], {}, join_key(key_path, name))
    try:
        return cls(**values)
    except RecipeError:
        raise
    except (ValueError, TypeError) as error:
        raise _config_error(key_path, error) from None


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
        return RecipeError(join_key(key_path, match.group(1)), message, "change the value as the message says.")
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
        return {coerce(k, key_hint, path): coerce(v, value_hint, join_key(path, str(k))) for k, v in value.items()}
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
    return RecipeError(path, f"must be {_type_name(hint)}, got {describe(value)}.",
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


def describe(value: Any) -> str:
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


def join_key(key_path: str, key: Any) -> str:
    return f"{key_path}.{key}" if key_path else str(key)
