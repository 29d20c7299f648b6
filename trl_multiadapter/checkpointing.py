"""Atomic PPO checkpoints: written to a temporary folder, then renamed into place.

A crash while saving leaves at most a ``.tmp-checkpoint-*`` folder behind, which resume ignores, so
the previous ``checkpoint-<step>`` stays the latest complete one. RNG states are saved per process
(``rng_state_<rank>.pth``): under data parallelism every rank samples its own responses.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_PREFIX = "checkpoint"
TEMPORARY_PREFIX = ".tmp-"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}-{step}"


def write_atomically(
    final_dir: Path,
    write: Callable[[Path], None],
    is_main_process: bool = True,
    wait_for_everyone: Callable[[], None] = lambda: None,
) -> Path:
    """Run ``write(tmp_dir)`` on every process, then move ``tmp_dir`` to ``final_dir`` on the main one.

    An existing ``final_dir`` is replaced only after the new folder is complete.
    """
    final_dir = Path(final_dir)
    tmp_dir = final_dir.parent / f"{TEMPORARY_PREFIX}{final_dir.name}"
    if is_main_process:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
        tmp_dir.mkdir(parents=True)
    wait_for_everyone()
    write(tmp_dir)
    wait_for_everyone()
    if is_main_process:
        _sync_folder(tmp_dir)
        replaced = None
        if final_dir.exists():
            replaced = final_dir.parent / f"{TEMPORARY_PREFIX}old-{final_dir.name}"
            if replaced.exists():
                shutil.rmtree(replaced)
            os.replace(final_dir, replaced)
        os.replace(tmp_dir, final_dir)
        if replaced is not None:
            shutil.rmtree(replaced)
    wait_for_everyone()
    return final_dir


def _sync_folder(folder: Path) -> None:
    # Flush file contents before the rename makes the checkpoint visible (best effort off POSIX).
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-<step>`` folders of ``output_dir``, oldest first (temporary folders excluded)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in output_dir.iterdir()
        if path.is_dir() and (match := _CHECKPOINT_NAME.match(path.name))
    ]
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int | None) -> None:
    """Delete the oldest checkpoints so that at most ``keep`` remain (None or 0 keeps all)."""
    if not keep:
        return
    for path in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.random.set_rng_state_all(state["cuda"])


def rng_file(folder: Path, process_index: int) -> Path:
    return Path(folder) / f"rng_state_{process_index}.pth"
