"""``--accelerate_config NAME|PATH``: find an accelerate config and re-launch the CLI under ``accelerate launch``.

Configs ship as package data in ``trl_multiadapter/accelerate_configs/`` and are found by name
(``g5_12xlarge``, ``single_gpu``, ``multi_node_example``, ``cpu_ddp``), the way TRL's CLI finds its own;
any existing file path works too. The re-launched processes get ``TRL_MULTIADAPTER_LAUNCHED=1`` so they
never launch again.
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CONFIG_PACKAGE = "trl_multiadapter.accelerate_configs"
LAUNCHED_ENV = "TRL_MULTIADAPTER_LAUNCHED"
# Bundled configs that must run on CPU even where CUDA exists (the workers then see no GPU).
CPU_CONFIG_NAMES = ("cpu_ddp",)
# Variables a launcher (accelerate, torchrun) sets in every worker process.
_LAUNCHER_ENV = ("LOCAL_RANK", "ACCELERATE_LAUNCHED", LAUNCHED_ENV)


class AccelerateConfigError(ValueError):
    """An accelerate config that is neither a bundled name nor a readable YAML file."""


@dataclass(frozen=True)
class LaunchConfig:
    """What the plan needs from an accelerate config file."""

    path: Path
    name: str
    distributed_type: str
    num_processes: int  # in total, over all machines
    num_machines: int
    mixed_precision: str
    use_cpu: bool
    content: dict[str, Any]

    @property
    def processes_per_machine(self) -> int:
        return max(1, self.num_processes // max(1, self.num_machines))

    @property
    def uses_gpus(self) -> bool:
        """Whether the launched workers may see GPUs (the bundled CPU configs hide them)."""
        return not (self.use_cpu or self.name in CPU_CONFIG_NAMES)

    @property
    def gpu_requests(self) -> list[str]:
        """What in the config asks for GPUs: GPU ids, or fp16/bf16 mixed precision without a CPU marker.

        Decided from the content, not the distributed type: the bundled ``cpu_ddp`` is MULTI_GPU on purpose
        (that launcher starts N gloo processes on a machine without CUDA)."""
        if self.use_cpu:
            return []
        requests = []
        gpu_ids = self.content.get("gpu_ids")
        if gpu_ids not in (None, "", "none"):
            requests.append(f"gpu_ids: {gpu_ids}")
        if self.mixed_precision in ("fp16", "bf16"):
            requests.append(f"mixed_precision: {self.mixed_precision}")
        return requests

    def describe(self) -> str:
        machines = f" on {self.num_machines} machines" if self.num_machines > 1 else ""
        return (f"{self.name}: {self.distributed_type}, {self.num_processes} processes{machines}, "
                f"mixed precision {self.mixed_precision}")


def missing_gpus(config: LaunchConfig) -> str | None:
    """Why ``config`` cannot launch here (it asks for GPUs and the machine has no CUDA device), or None."""
    from .devices import cuda_available

    if not config.gpu_requests or cuda_available():
        return None
    return (f"accelerate config {config.name!r} asks for GPUs ({', '.join(config.gpu_requests)}) but this machine "
            "has no CUDA device.")


def bundled_config_names() -> list[str]:
    root = importlib.resources.files(CONFIG_PACKAGE)
    return sorted(entry.name.removesuffix(".yaml") for entry in root.iterdir() if entry.name.endswith(".yaml"))


def resolve_accelerate_config(name_or_path: str | os.PathLike) -> Path:
    """The file of a bundled config name (``cpu_ddp``), or ``name_or_path`` itself when it is a file."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = importlib.resources.files(CONFIG_PACKAGE).joinpath(f"{path.name.removesuffix('.yaml')}.yaml")
    if str(name_or_path) == path.name and candidate.is_file():
        return Path(str(candidate))
    known = bundled_config_names()
    close = difflib.get_close_matches(str(name_or_path), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise AccelerateConfigError(
        f"accelerate config {str(name_or_path)!r} is neither a file nor a bundled config.{hint} "
        f"Bundled configs: {', '.join(known)}."
    )


def read_accelerate_config(name_or_path: str | os.PathLike) -> LaunchConfig:
    path = resolve_accelerate_config(name_or_path)
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise AccelerateConfigError(f"accelerate config {path} is not valid YAML: {error}") from None
    if not isinstance(content, dict):
        raise AccelerateConfigError(f"accelerate config {path} must be a mapping of settings.")
    return LaunchConfig(
        path=path,
        name=path.name.removesuffix(".yaml"),
        distributed_type=str(content.get("distributed_type", "NO")),
        num_processes=int(content.get("num_processes", 1) or 1),
        num_machines=int(content.get("num_machines", 1) or 1),
        mixed_precision=str(content.get("mixed_precision", "no")),
        use_cpu=bool(content.get("use_cpu", False)),
        content=content,
    )


def is_launched() -> bool:
    """True inside a process started by accelerate/torchrun (or by ``relaunch``)."""
    return any(os.environ.get(name) for name in _LAUNCHER_ENV)


def launch_command(config: LaunchConfig, cli_args: Sequence[str]) -> list[str]:
    """The ``accelerate launch`` command that runs ``trl-multiadapter <cli_args>`` in every process."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(config.path),
        "--module", "trl_multiadapter", *cli_args,
    ]


def relaunch(config: LaunchConfig, cli_args: Sequence[str]) -> int:
    """Run the CLI under ``accelerate launch`` and return its exit code."""
    env = dict(os.environ, **{LAUNCHED_ENV: "1"})
    if not config.uses_gpus:
        # accelerate's MULTI_GPU launcher starts N processes; with no visible GPU they use gloo on CPU
        # (its use_cpu/MULTI_CPU launchers start one process without mpirun, accelerate 1.15).
        env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.call(launch_command(config, cli_args), env=env)


def without_flag(argv: Sequence[str], flag: str) -> list[str]:
    """``argv`` without ``flag VALUE`` / ``flag=VALUE``."""
    result, skip = [], False
    for index, item in enumerate(argv):
        if skip:
            skip = False
            continue
        if item == flag:
            skip = index + 1 < len(argv)
            continue
        if item.startswith(flag + "="):
            continue
        result.append(item)
    return result
