"""Plugin registry: registration rules, lookups, and discovery of real entry points from dist-info."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_multiadapter import registry as reg
from trl_multiadapter.registry import (
    DuplicateNameError,
    PluginError,
    Registries,
    Registry,
    UnknownNameError,
)

NO_BUILTINS = {"data_sources": (), "reward_functions": (), "stages": ()}


def fresh_registries() -> Registries:
    return Registries(builtin_modules=NO_BUILTINS)


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def constant_reward(completions, **kwargs):
    return [1.0 for _ in completions]


# ---------------------------------------------------------------- registration and lookup


def test_register_call_and_decorator_forms():
    registries = fresh_registries()
    rewards = registries.reward_functions
    assert rewards.register("length", length_reward) is length_reward

    @rewards.register("constant")
    def decorated(completions, **kwargs):
        return constant_reward(completions)

    assert rewards.get("length") is length_reward
    assert rewards.get("constant") is decorated
    assert rewards.names() == ["constant", "length"]
    assert "length" in rewards and "missing" not in rewards
    assert rewards.entry("length").origin == __name__
    assert rewards.get("length")(["ab", "abcd"]) == [2.0, 4.0]


def test_registries_are_separate_by_kind():
    registries = fresh_registries()
    registries.data_sources.register("thing", length_reward)
    assert "thing" not in registries.reward_functions
    assert registries["data_sources"] is registries.data_sources
    assert [r.kind for r in registries] == ["data_sources", "reward_functions", "stages"]
    with pytest.raises(UnknownNameError, match="choose one of data_sources, reward_functions, stages"):
        registries["rewards"]


def test_unknown_name_lists_known_names_and_suggests_close_match():
    rewards = fresh_registries().reward_functions
    rewards.register("length", length_reward)
    rewards.register("constant", constant_reward)
    with pytest.raises(UnknownNameError) as raised:
        rewards.get("lenght")
    message = str(raised.value)
    assert "unknown reward function 'lenght'" in message
    assert "Did you mean 'length'?" in message
    assert "Known reward functions: constant, length." in message
    assert isinstance(raised.value, LookupError) and isinstance(raised.value, ValueError)


@settings(max_examples=40, deadline=None)
@given(
    names=st.sets(st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True), min_size=0, max_size=6),
    query=st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True),
)
def test_unknown_name_message_always_lists_every_known_name(names, query):
    stages = fresh_registries().stages
    for name in names:
        stages.register(name, length_reward)
    if query in names:
        assert stages.get(query) is length_reward
        return
    with pytest.raises(UnknownNameError) as raised:
        stages.get(query)
    listed = str(raised.value).split("Known pipeline stages: ")[1].split(".")[0]
    assert listed == (", ".join(sorted(names)) if names else "(none)")


def test_duplicate_name_names_both_origins():
    rewards = fresh_registries().reward_functions
    rewards.register("score", length_reward)
    rewards.register("score", length_reward)  # the same object again is a no-op
    with pytest.raises(DuplicateNameError) as raised:
        rewards.register("score", constant_reward)
    assert f"already registered by {__name__}" in str(raised.value)
    assert rewards.get("score") is length_reward
    rewards.register("score", constant_reward, replace=True)
    assert rewards.get("score") is constant_reward


@pytest.mark.parametrize("bad_name", ["", " x", "has space", "-leading", 3, None])
def test_invalid_names_are_rejected(bad_name):
    with pytest.raises(ValueError, match="invalid data source name"):
        fresh_registries().data_sources.register(bad_name, length_reward)


def test_non_callables_are_rejected():
    with pytest.raises(TypeError, match="reward function 'x' must be callable, got int"):
        fresh_registries().reward_functions.register("x", 3)


def test_package_decorators_register_into_the_package_registries():
    name = f"test-{uuid.uuid4().hex[:8]}"
    try:
        reg.register_reward_function(name)(length_reward)
        reg.register_data_source(name, length_reward)
        assert reg.get_registry("reward_functions").get(name) is length_reward
        assert reg.data_sources.get(name) is length_reward
        assert name not in reg.stages
    finally:
        reg.reward_functions.unregister(name)
        reg.data_sources.unregister(name)
    assert name not in reg.reward_functions


def test_standalone_registry_needs_no_discovery():
    standalone = Registry("stages", "pipeline stage")
    standalone.register("a", length_reward)
    assert standalone.names() == ["a"]


# ---------------------------------------------------------------- real entry points


class FakeDistributions:
    """Writes installed-looking distributions (``*.dist-info`` + plugin modules) into a folder on sys.path."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root = root
        self.monkeypatch = monkeypatch
        self.modules: list[str] = []
        self.tag = uuid.uuid4().hex[:8]  # unique module names: a module imports once per process

    def module(self, stem: str, source: str) -> str:
        name = f"tma_test_{stem}_{self.tag}"
        (self.root / f"{name}.py").write_text(textwrap.dedent(source))
        self.modules.append(name)
        return name

    def distribution(self, name: str, version: str, entry_points: dict[str, str]) -> None:
        info = self.root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = [f"[{reg.ENTRY_POINT_GROUP}]"] + [f"{key} = {value}" for key, value in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")

    def install(self) -> None:
        # syspath_prepend also calls importlib.invalidate_caches(), which clears importlib.metadata's
        # directory-listing cache, so the new dist-info folders are seen.
        self.monkeypatch.syspath_prepend(str(self.root))

    def cleanup(self) -> None:
        for name in self.modules:
            sys.modules.pop(name, None)


@pytest.fixture
def dists(tmp_path, monkeypatch):
    monkeypatch.delenv(reg.DISABLE_PLUGINS_ENV, raising=False)
    fake = FakeDistributions(tmp_path, monkeypatch)
    yield fake
    fake.cleanup()


CALLABLE_PLUGIN = """
    calls = 0

    def words(completions, **kwargs):
        return [float(len(c.split())) for c in completions]

    def load_lines(path):
        return open(path).read().splitlines()

    def register(registries):
        global calls
        calls += 1
        registries.reward_functions.register("word_count", words)
        registries.data_sources.register("lines", load_lines)
"""

MODULE_PLUGIN = """
    from trl_multiadapter.registry import register_stage

    @register_stage("shout")
    def shout(text):
        return text.upper()
"""


def test_callable_plugin_is_discovered_lazily_once(dists):
    module = dists.module("callable", CALLABLE_PLUGIN)
    dists.distribution("tma-words", "1.2", {"words": f"{module}:register"})
    dists.install()
    registries = fresh_registries()
    assert module not in sys.modules  # nothing loads before the first lookup

    reward = registries.reward_functions.get("word_count")
    assert reward(["a b c", "one"]) == [3.0, 1.0]
    assert registries.data_sources.names() == ["lines"]
    origin = registries.reward_functions.entry("word_count").origin
    assert "distribution 'tma-words' 1.2" in origin and f"'words = {module}:register'" in origin

    for _ in range(3):
        registries.discover()
        registries.stages.names()
    assert sys.modules[module].calls == 1
    assert [(p.distribution, p.version, p.entry_point) for p in registries.loaded_plugins] == [
        ("tma-words", "1.2", f"words = {module}:register")
    ]


def test_module_plugin_registers_on_import_into_the_discovering_registries(dists):
    module = dists.module("module", MODULE_PLUGIN)
    dists.distribution("tma-shout", "0.1", {"shout": module})
    dists.install()
    registries = fresh_registries()
    assert registries.stages.get("shout")("hi") == "HI"
    assert "tma-shout" in registries.stages.entry("shout").origin
    assert "shout" not in reg.stages._entries  # the package registries were not touched


def test_duplicate_name_between_plugins_names_distribution_and_entry_point(dists):
    first = dists.module("first", CALLABLE_PLUGIN)
    second = dists.module(
        "second",
        """
        def register(registries):
            registries.stages.register("extra", print)
            registries.reward_functions.register("word_count", len)
        """,
    )
    # Discovery order is sorted by distribution name: tma-a loads first, tma-b clashes.
    dists.distribution("tma-a", "1.0", {"words": f"{first}:register"})
    dists.distribution("tma-b", "2.0", {"clash": f"{second}:register"})
    dists.install()
    registries = fresh_registries()
    with pytest.raises(PluginError) as raised:
        registries.reward_functions.get("word_count")
    message = str(raised.value)
    assert f"entry point 'clash = {second}:register'" in message
    assert "distribution 'tma-b' 2.0" in message
    assert "reward function 'word_count' is already registered by entry point" in message
    assert "distribution 'tma-a'" in message
    assert isinstance(raised.value.__cause__, DuplicateNameError)
    # The failing plugin's earlier registration was rolled back; the first plugin's entries stay.
    assert "extra" not in registries.stages._entries
    assert registries.reward_functions._entries["word_count"].obj.__module__ == first


@pytest.mark.parametrize(
    ("source", "target", "cause", "reason"),
    [
        ("import tma_no_such_dependency_xyz\n", "{module}", ModuleNotFoundError, "tma_no_such_dependency_xyz"),
        ("x = 1\n", "{module}:missing", AttributeError, "missing"),
        ("class Reward:\n    pass\n", "{module}:Reward", TypeError, "it names a class"),
        ("LIMIT = 3\n", "{module}:LIMIT", TypeError, "it names a non-callable int"),
        ("def register(registries):\n    raise RuntimeError('boom')\n", "{module}:register", RuntimeError, "boom"),
    ],
    ids=["import-error", "missing-attribute", "class", "not-callable", "raises"],
)
def test_broken_plugin_error_names_distribution_and_entry_point(dists, source, target, cause, reason):
    module = dists.module("broken", source)
    value = target.format(module=module)
    dists.distribution("tma-broken", "0.3", {"bad": value})
    dists.install()
    registries = fresh_registries()
    with pytest.raises(PluginError) as raised:
        registries.stages.names()
    message = str(raised.value)
    assert f"entry point 'bad = {value}' (group 'trl_multiadapter.plugins')" in message
    assert "distribution 'tma-broken' 0.3" in message
    assert reason in message
    assert isinstance(raised.value.__cause__, cause)
    # Discovery is not marked done: the next lookup reports the same plugin again.
    with pytest.raises(PluginError, match="tma-broken"):
        registries.reward_functions.get("anything")


def test_plugins_that_loaded_are_not_reloaded_when_a_broken_one_is_retried(dists):
    good = dists.module("good", CALLABLE_PLUGIN)
    bad = dists.module("bad", "raise ImportError('cannot load')\n")
    dists.distribution("tma-a-good", "1.0", {"words": f"{good}:register"})
    dists.distribution("tma-z-bad", "1.0", {"bad": bad})
    dists.install()
    registries = fresh_registries()
    for _ in range(2):
        with pytest.raises(PluginError, match="tma-z-bad"):
            registries.discover()
    assert sys.modules[good].calls == 1


def test_disable_env_var_skips_plugins(dists, monkeypatch):
    module = dists.module("callable", CALLABLE_PLUGIN)
    dists.distribution("tma-words", "1.0", {"words": f"{module}:register"})
    dists.install()
    monkeypatch.setenv(reg.DISABLE_PLUGINS_ENV, "1")
    registries = fresh_registries()
    assert registries.reward_functions.names() == []
    assert module not in sys.modules


def test_builtin_modules_are_imported_on_first_lookup(dists):
    module = dists.module(
        "builtin",
        """
        from trl_multiadapter.registry import register_data_source

        @register_data_source("builtin_lines")
        def builtin_lines(path):
            return []
        """,
    )
    dists.install()
    builtins = {**NO_BUILTINS, "data_sources": (module,)}
    try:
        first = Registries(builtin_modules=builtins)
        assert module not in sys.modules
        assert first.data_sources.names() == ["builtin_lines"]
        assert first.data_sources.entry("builtin_lines").origin == module
        # A second instance sees the built-in although its module was imported already.
        second = Registries(builtin_modules=builtins)
        assert second.data_sources.get("builtin_lines") is first.data_sources.get("builtin_lines")
    finally:
        reg.data_sources.unregister("builtin_lines")


def test_package_builtin_modules_register_on_first_lookup_in_a_fresh_process():
    code = (
        "import json, sys\n"
        "from trl_multiadapter import registry\n"
        "listed = sorted({m for ms in registry.BUILTIN_MODULES.values() for m in ms})\n"
        "before = [m for m in listed if m in sys.modules]\n"
        "found = {kind: sorted({registry.registries[kind].entry(n).origin for n in registry.registries[kind].names()})\n"
        "         for kind in registry.REGISTRY_KINDS}\n"
        "print(json.dumps({'before': before, 'found': found, 'builtins': registry.BUILTIN_MODULES}))\n"
    )
    env = {**os.environ, reg.DISABLE_PLUGINS_ENV: "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["before"] == []  # importing the registry imports no built-in module
    for kind, modules in report["builtins"].items():
        for module in modules:  # every listed module registered at least one entry of its kind
            assert module in report["found"][kind], (kind, module, report["found"])
