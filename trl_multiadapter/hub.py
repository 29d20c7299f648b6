"""Is a hub id reachable? One fast answer, in one line, before any download starts.

``datasets.load_dataset`` and ``from_pretrained`` on an unreachable hub retry for about 23 seconds and then
raise a bare ``ConnectionError``; under ``HF_HUB_OFFLINE=1`` they fail fast, but without saying which id
or what to do. :func:`check_hub_reachable` answers first: offline (the variables are read when called),
an id is usable only if something of it is in the local cache; online, one metadata request with a short
timeout. Used for data sets (``kind="dataset"``) and models (``kind="model"``).

Imports only the light ``huggingface_hub`` client, and that only when online.
"""

from __future__ import annotations

import os
from pathlib import Path

KINDS = ("dataset", "model")
# The variables that switch the hub off for each kind (huggingface_hub reads its own once, at import).
OFFLINE_VARIABLES = {
    "dataset": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"),
    "model": ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"),
}
DEFAULT_TIMEOUT_S = 5.0
_TRUE = {"1", "true", "yes", "on"}


class HubUnreachableError(ValueError, ConnectionError):
    """A hub id that cannot be used now; the message is one line: the id, why, and what to do.

    A ``ValueError`` (a user-input problem, reported in one line by the CLI) and a ``ConnectionError``
    (what ``datasets`` and ``transformers`` raise for the same situation)."""

    def __init__(self, repo_id: str, kind: str, problem: str, fix: str):
        self.repo_id, self.kind, self.problem, self.fix = repo_id, kind, problem, fix
        super().__init__(f"hub {kind} {repo_id!r}: {problem}; {fix}")


def offline_variable(kind: str = "dataset") -> str | None:
    """The name of the first offline variable set for ``kind`` (``HF_HUB_OFFLINE=1``, ...), or None."""
    _check_kind(kind)
    for name in OFFLINE_VARIABLES[kind]:
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return name
    return None


def is_cached(repo_id: str, kind: str = "dataset") -> bool:
    """True when the hub cache or the ``datasets`` cache holds something of ``repo_id``."""
    _check_kind(kind)
    owner, _, name = repo_id.partition("/")
    hub_entry = _hub_cache() / f"{kind}s--{owner}--{name}"
    if hub_entry.is_dir():
        return True
    if kind != "dataset":
        return False
    datasets_cache = _datasets_cache()
    prefix = f"{owner}___{name}".lower()  # datasets' own cache folder for a hub data set
    return datasets_cache.is_dir() and any(
        entry.name.lower() == prefix for entry in datasets_cache.iterdir() if entry.is_dir()
    )


def check_hub_reachable(repo_id: str, kind: str = "dataset", timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Raise :class:`HubUnreachableError` (one line, within ``timeout`` seconds) unless ``repo_id`` can be
    loaded now: offline, from the local cache; online, when the hub answers for it."""
    _check_kind(kind)
    variable = offline_variable(kind)
    if variable is not None:
        if is_cached(repo_id, kind):
            return
        raise HubUnreachableError(
            repo_id, kind, f"{variable} is set and the local cache has no copy of it",
            f"unset {variable} to download it, or use a local path",
        )
    problem = _hub_problem(repo_id, kind, timeout)
    if problem is not None:
        raise HubUnreachableError(repo_id, kind, *problem)


def _hub_problem(repo_id: str, kind: str, timeout: float) -> tuple[str, str] | None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    try:
        HfApi().repo_info(repo_id, repo_type=kind, timeout=timeout)
    except GatedRepoError:
        return "it is gated and this machine is not logged in with access", "run `hf auth login` with an account that has access"
    except RepositoryNotFoundError:
        return "the hub has no such repository (or it is private)", "check the id, or log in with `hf auth login`"
    except OfflineModeIsEnabled:
        # huggingface_hub read HF_HUB_OFFLINE at import; it is off in the environment only now.
        if is_cached(repo_id, kind):
            return None
        return "the hub client is in offline mode and the local cache has no copy of it", "use a local path"
    except Exception as error:  # any transport failure: DNS, refused, timeout, proxy
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return (
            f"the hub cannot be reached ({reason})",
            "check the network, or set HF_HUB_OFFLINE=1 to use the local cache, or use a local path",
        )
    return None


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return _hf_home() / "hub"


def _datasets_cache() -> Path:
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    return _hf_home() / "datasets"


def _hf_home() -> Path:
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "huggingface"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose one of {', '.join(KINDS)}")
