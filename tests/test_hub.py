"""trl_multiadapter.hub: one fast line when a hub id cannot be used (offline variables, cache, no network).

Nothing here talks to the real hub: offline cases use an empty or pretend cache folder; the online case
points the client at a local port nobody listens on.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from trl_multiadapter import hub


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
                 "HF_DATASETS_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return tmp_path / "hf-home"


@pytest.mark.parametrize(("kind", "variable"), [("dataset", "HF_HUB_OFFLINE"), ("dataset", "HF_DATASETS_OFFLINE"),
                                                ("model", "HF_HUB_OFFLINE"), ("model", "TRANSFORMERS_OFFLINE")])
def test_each_offline_variable_of_a_kind_is_honoured(empty_cache, monkeypatch, kind, variable):
    assert hub.offline_variable(kind) is None
    monkeypatch.setenv(variable, "1")
    assert hub.offline_variable(kind) == variable
    started = time.perf_counter()
    with pytest.raises(hub.HubUnreachableError) as caught:
        hub.check_hub_reachable("someone/something", kind)
    assert time.perf_counter() - started < 1.0
    assert str(caught.value) == (f"hub {kind} 'someone/something': {variable} is set and the local cache has no "
                                 f"copy of it; unset {variable} to download it, or use a local path")
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, ConnectionError)


def test_datasets_offline_does_not_switch_models_off(empty_cache, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub.offline_variable("model") is None


def test_offline_a_cached_id_passes(empty_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (empty_cache / "hub" / "datasets--Owner--data").mkdir(parents=True)
    (empty_cache / "datasets" / "owner___squad-like").mkdir(parents=True)  # datasets' own cache layout
    (empty_cache / "hub" / "models--Owner--model").mkdir(parents=True)
    hub.check_hub_reachable("Owner/data", "dataset")
    hub.check_hub_reachable("Owner/squad-like", "dataset")
    hub.check_hub_reachable("Owner/model", "model")
    with pytest.raises(hub.HubUnreachableError):
        hub.check_hub_reachable("Owner/data", "model")  # a dataset in the cache is not a model


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="choose one of dataset, model"):
        hub.check_hub_reachable("a/b", "space")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_hub_fails_fast_without_retries(tmp_path):
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(tmp_path / "home"))
    code = ("import time, sys\n"
            "from trl_multiadapter.hub import HubUnreachableError, check_hub_reachable\n"
            "started = time.perf_counter()\n"
            "try:\n"
            "    check_hub_reachable('Anthropic/hh-rlhf', 'dataset')\n"
            "except HubUnreachableError as error:\n"
            "    print(round(time.perf_counter() - started, 2)); print(error); sys.exit(0)\n"
            "sys.exit('no error')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    seconds, message = result.stdout.strip().split("\n")
    assert float(seconds) < hub.DEFAULT_TIMEOUT_S
    assert message.startswith("hub dataset 'Anthropic/hh-rlhf': the hub cannot be reached (")
    assert message.endswith("check the network, or set HF_HUB_OFFLINE=1 to use the local cache, or use a local path")
