"""Named registries for data sources, reward functions and pipeline stages, extensible by plugins.

Three registries hold the named building blocks that recipes refer to:

=====================  =============================  ==============================
registry               decorator                      a recipe names it in
=====================  =============================  ==============================
``data_sources``       ``@register_data_source``      a data section's ``source``
``reward_functions``   ``@register_reward_function``  ``reward_funcs``
``stages``             ``@register_stage``            the pipeline's stage list
=====================  =============================  ==============================

Built-in modules register their entries with the decorators when they are imported::

    from trl_multiadapter.registry import register_reward_function

    @register_reward_function("length")
    def length_reward(completions, **kwargs): ...

and are listed in ``BUILTIN_MODULES`` so that a lookup finds them without the caller importing them.

Plugins
-------
Another installed package adds entries through the entry-point group ``trl_multiadapter.plugins``
(``ENTRY_POINT_GROUP``). In its ``pyproject.toml``::

    [project.entry-points."trl_multiadapter.plugins"]
    my_rewards = "my_package.rewards:register"     # a callable taking the registries
    my_sources = "my_package.sources"              # or a module that registers on import

An entry point names either

* a callable (a function, not a class) that is called once with the ``Registries`` object::

      def register(registries):
          registries.reward_functions.register("toxicity", toxicity_reward)
          registries.data_sources.register("my_corpus", load_my_corpus)

* or a module, whose import registers entries with the decorators above.

Discovery is lazy and idempotent: entry points are loaded on the first lookup (``get``, ``names``,
``in``), each at most once per process. A plugin that fails to import, names something other than a
module or a callable, raises, or registers a name that is already taken stops discovery with a
``PluginError`` naming its distribution and entry point; whatever it registered before failing is
removed again. Set ``TRL_MULTIADAPTER_DISABLE_PLUGINS=1`` to skip all plugins.

This module imports nothing heavy: the CLI and recipe validation use it before torch is loaded.
"""

from __future__ import annotations

import contextvars
import difflib
import importlib
import inspect
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType
from typing import Any

ENTRY_POINT_GROUP = "trl_multiadapter.plugins"
DISABLE_PLUGINS_ENV = "TRL_MULTIADAPTER_DISABLE_PLUGINS"

# Modules of this package whose import registers built-in entries; imported on the first lookup.
# A module written later adds its name here (and registers with the decorators below).
BUILTIN_MODULES: dict[str, tuple[str, ...]] = {
    "data_sources": ("trl_multiadapter.data.hh_rlhf", "trl_multiadapter.data.squad",
                     "trl_multiadapter.pipeline.synthetic_sources"),
    "reward_functions": (),
    "stages": tuple(f"trl_multiadapter.pipeline.{name}_stage" for name in ("data", "reward", "ppo", "evaluate", "export")),
}

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class RegistryError(Exception):
    """Base class of the errors raised here."""


class UnknownNameError(RegistryError, LookupError, ValueError):
    """A lookup of a name nobody registered; the message lists the known names."""


class DuplicateNameError(RegistryError, ValueError):
    """A name registered twice with different objects; the message names both origins."""


class PluginError(RegistryError, RuntimeError):
    """A plugin entry point failed to load or register; the message names its distribution."""


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    origin: str  # who registered it: a module name or a plugin's entry point and distribution


@dataclass(frozen=True)
class PluginInfo:
    """Where an entry point came from, for error messages and ``Registries.loaded_plugins``."""

    distribution: str
    version: str
    entry_point: str  # "name = value"

    def describe(self) -> str:
        return (
            f"entry point '{self.entry_point}' (group '{ENTRY_POINT_GROUP}') "
            f"of distribution '{self.distribution}' {self.version}".rstrip()
        )


# Set while a plugin is being loaded, so that decorators used at import time
# register into the registries doing the discovery and record the plugin as the entries' origin.
_loading_into: contextvars.ContextVar[Registries | None] = contextvars.ContextVar("_loading_into", default=None)
_loading_origin: contextvars.ContextVar[str | None] = contextvars.ContextVar("_loading_origin", default=None)


class Registry:
    """A mapping from names to callables of one kind (e.g. reward functions)."""

    def __init__(self, kind: str, noun: str, owner: Registries | None = None):
        self.kind = kind  # e.g. "reward_functions"
        self.noun = noun  # e.g. "reward function", used in messages
        self._owner = owner
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, obj: Any = None, *, replace: bool = False):
        """Register ``obj`` under ``name``; without ``obj``, return a decorator that does.

        ``replace=True`` overrides an existing entry on purpose; otherwise a second, different object
        under the same name raises ``DuplicateNameError``. Registering the same object again is a no-op.
        """
        if obj is None:

            def decorator(target):
                self.register(name, target, replace=replace)
                return target

            return decorator
        self._check_name(name)
        if not callable(obj):
            raise TypeError(f"{self.noun} {name!r} must be callable, got {type(obj).__name__}")
        origin = _loading_origin.get() or getattr(obj, "__module__", None) or "<unknown>"
        existing = self._entries.get(name)
        if existing is not None and existing.obj is not obj and not replace:
            raise DuplicateNameError(
                f"{self.noun} {name!r} is already registered by {existing.origin}; "
                f"{origin} tried to register it again. Pick another name, or pass replace=True "
                f"to override it on purpose."
            )
        self._entries[name] = Entry(name, obj, origin)
        return obj

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def get(self, name: str) -> Any:
        """The object registered under ``name``; ``UnknownNameError`` lists the known names."""
        return self.entry(name).obj

    def entry(self, name: str) -> Entry:
        self._discover()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(self._unknown_name_message(name)) from None

    def names(self) -> list[str]:
        self._discover()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={sorted(self._entries)})"

    def _discover(self) -> None:
        if self._owner is not None:
            self._owner.discover()

    def _check_name(self, name: object) -> None:
        if not isinstance(name, str) or not _NAME_PATTERN.match(name):
            raise ValueError(
                f"invalid {self.noun} name {name!r}: use letters, digits, '_', '.' or '-', "
                f"starting with a letter or digit"
            )

    def _unknown_name_message(self, name: str) -> str:
        known = sorted(self._entries)
        message = f"unknown {self.noun} {name!r}."
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            message += f" Did you mean {close[0]!r}?"
        message += f" Known {self.noun}s: {', '.join(known) if known else '(none)'}."
        message += f" Packages add more through the '{ENTRY_POINT_GROUP}' entry-point group."
        return message


class Registries:
    """The three registries plus plugin discovery.

    ``registries`` below is the one the package uses. A separate instance (for tests) holds the
    built-in entries too, and loads plugins into itself without touching the package's registries.
    """

    def __init__(self, builtin_modules: dict[str, tuple[str, ...]] | None = None):
        self.data_sources = Registry("data_sources", "data source", self)
        self.reward_functions = Registry("reward_functions", "reward function", self)
        self.stages = Registry("stages", "pipeline stage", self)
        self._builtin_modules = BUILTIN_MODULES if builtin_modules is None else builtin_modules
        self._lock = threading.RLock()
        self._discovered = False
        self._loaded_entry_points: set[tuple[str, str, str]] = set()
        self.loaded_plugins: list[PluginInfo] = []

    def __getitem__(self, kind: str) -> Registry:
        registry = getattr(self, kind, None) if kind in REGISTRY_KINDS else None
        if registry is None:
            raise UnknownNameError(f"unknown registry {kind!r}; choose one of {', '.join(REGISTRY_KINDS)}")
        return registry

    def __iter__(self) -> Iterator[Registry]:
        return iter(self[kind] for kind in REGISTRY_KINDS)

    def discover(self) -> None:
        """Import the built-in modules and load every plugin entry point, once.

        A failed plugin leaves discovery unfinished: the next lookup retries it (and fails the same
        way) while plugins that loaded fine are not loaded again.
        """
        if self._discovered:
            return
        with self._lock:
            if self._discovered or _loading_into.get() is self:
                return  # already done, or a lookup made while a plugin of ours is being imported
            self._import_builtin_modules()
            if os.environ.get(DISABLE_PLUGINS_ENV, "").strip().lower() not in ("1", "true", "yes"):
                for entry_point in _plugin_entry_points():
                    self._load_plugin(entry_point)
            self._discovered = True

    def _import_builtin_modules(self) -> None:
        # Built-in modules register into the package registries when first imported (by anyone);
        # a separate Registries instance copies their entries so it sees the same built-ins.
        module_names = {name for modules in self._builtin_modules.values() for name in modules}
        for module_name in sorted(module_names):
            importlib.import_module(module_name)
        if self is registries:
            return
        for registry in self:
            for entry in registries[registry.kind]._entries.values():
                if entry.origin in module_names and entry.name not in registry._entries:
                    registry._entries[entry.name] = entry

    def _load_plugin(self, entry_point: metadata.EntryPoint) -> None:
        info = _plugin_info(entry_point)
        key = (info.distribution, entry_point.name, entry_point.value)
        if key in self._loaded_entry_points:
            return
        snapshot = {registry.kind: dict(registry._entries) for registry in self}
        into_token = _loading_into.set(self)
        origin_token = _loading_origin.set(info.describe())
        try:
            self._run_plugin(entry_point, info)
        except Exception as error:
            for registry in self:  # drop whatever the plugin registered before it failed
                registry._entries = snapshot[registry.kind]
            raise PluginError(
                f"plugin {info.describe()} failed: {type(error).__name__}: {error}. "
                f"Fix or uninstall {info.distribution!r}, or set {DISABLE_PLUGINS_ENV}=1 to skip all plugins."
            ) from error
        finally:
            _loading_origin.reset(origin_token)
            _loading_into.reset(into_token)
        self._loaded_entry_points.add(key)
        self.loaded_plugins.append(info)

    def _run_plugin(self, entry_point: metadata.EntryPoint, info: PluginInfo) -> None:
        target = entry_point.load()
        if isinstance(target, ModuleType):
            return  # importing it registered its entries
        if inspect.isclass(target) or not callable(target):
            what = "a class" if inspect.isclass(target) else f"a non-callable {type(target).__name__}"
            raise TypeError(
                f"it names {what} ({entry_point.value}); point it at a module that registers on "
                f"import or at a function taking the registries"
            )
        target(self)


def _plugin_entry_points() -> list[metadata.EntryPoint]:
    # Sorted so that discovery order, and thus which of two clashing plugins is reported, is stable.
    found = metadata.entry_points(group=ENTRY_POINT_GROUP)
    return sorted(found, key=lambda ep: (_distribution_name(ep), ep.name, ep.value))


def _distribution_name(entry_point: metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return (dist.metadata["Name"] if dist is not None else None) or "<unknown distribution>"


def _plugin_info(entry_point: metadata.EntryPoint) -> PluginInfo:
    dist = getattr(entry_point, "dist", None)
    version = (dist.version or "") if dist is not None else ""
    return PluginInfo(_distribution_name(entry_point), version, f"{entry_point.name} = {entry_point.value}")


REGISTRY_KINDS = ("data_sources", "reward_functions", "stages")

registries = Registries()
data_sources = registries.data_sources
reward_functions = registries.reward_functions
stages = registries.stages


def get_registry(kind: str) -> Registry:
    """The package's registry of ``kind`` ("data_sources", "reward_functions" or "stages")."""
    return registries[kind]


def _target_registries() -> Registries:
    return _loading_into.get() or registries


def register_data_source(name: str, obj: Any = None, *, replace: bool = False):
    """Register a data source (decorator, or call with the object)."""
    return _target_registries().data_sources.register(name, obj, replace=replace)


def register_reward_function(name: str, obj: Any = None, *, replace: bool = False):
    """Register a reward function (decorator, or call with the object)."""
    return _target_registries().reward_functions.register(name, obj, replace=replace)


def register_stage(name: str, obj: Any = None, *, replace: bool = False):
    """Register a pipeline stage (decorator, or call with the object)."""
    return _target_registries().stages.register(name, obj, replace=replace)


__all__ = [
    "BUILTIN_MODULES",
    "DISABLE_PLUGINS_ENV",
    "ENTRY_POINT_GROUP",
    "DuplicateNameError",
    "Entry",
    "PluginError",
    "PluginInfo",
    "Registries",
    "Registry",
    "RegistryError",
    "UnknownNameError",
    "data_sources",
    "get_registry",
    "register_data_source",
    "register_reward_function",
    "register_stage",
    "registries",
    "reward_functions",
    "stages",
]
