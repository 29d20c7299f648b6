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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .devices import cuda_available

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
    if cuda_available():
        state["cuda"] = torch.cuda.random.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and cuda_available():
        torch.cuda.random.set_rng_state_all(state["cuda"])


def rng_file(folder: Path, process_index: int) -> Path:
    return Path(folder) / f"rng_state_{process_index}.pth"


# ---------------------------------------------------------------------------------------------------
# PPO resume state

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
PPO_STATE_FILE = "ppo_state.pt"
TRAINER_STATE_FILE = "trainer_state.json"
ADAPTERS_DIR = "adapters"  # readable adapters (save_adapters layout) beside the resume state


@dataclass
class ResumeState:
    """Everything a PPO run needs to continue as if it had never stopped.

    ``trainable`` holds the policy adapter and value head (or critic) by parameter name; the frozen base
    and reward adapter are not saved (they never change). ``rng`` is this process's RNG state; the rest
    is the same on every process and written by the main one.
    """

    trainable: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict | None
    kl_controller: dict
    score_moments: dict
    sampler: dict | None
    num_processes: int
    trainer_state: Any  # transformers.TrainerState: global_step, epoch, log_history
    rng: dict

    @classmethod
    def capture(cls, trainer) -> ResumeState:
        """The state of a ``MultiAdapterPPOTrainer`` now (tensors copied to the CPU)."""
        names = _parameter_names(trainer.model)
        return cls(
            trainable={names[id(p)]: p.detach().cpu().contiguous() for p in trainer.model.trainable_parameters()},
            optimizer=trainer.optimizer.state_dict(),
            scheduler=trainer.lr_scheduler.state_dict() if trainer.lr_scheduler is not None else None,
            kl_controller=trainer.kl_ctl.state_dict(),
            score_moments=trainer.score_moments.state_dict(),
            sampler=trainer._prompt_order.state_dict() if trainer._prompt_order is not None else None,
            num_processes=trainer.num_processes,
            trainer_state=trainer.state,
            rng=rng_state(),
        )

    def restore(self, trainer) -> None:
        """Put this state back into ``trainer`` (its optimizer and scheduler must exist)."""
        names = _parameter_names(trainer.model)
        with torch.no_grad():
            for parameter in trainer.model.trainable_parameters():
                name = names[id(parameter)]
                if name not in self.trainable:
                    raise ValueError(f"the checkpoint has no tensor {name!r}; was it written by this model?")
                parameter.copy_(self.trainable[name])
        trainer.optimizer.load_state_dict(self.optimizer)
        if trainer.lr_scheduler is not None and self.scheduler is not None:
            trainer.lr_scheduler.load_state_dict(self.scheduler)
        trainer.kl_ctl.load_state_dict(self.kl_controller)
        trainer.score_moments.load_state_dict(self.score_moments)
        if self.sampler is not None and trainer._prompt_order is not None:
            trainer._prompt_order.load_state_dict(self.sampler)
        trainer.state.global_step = self.trainer_state.global_step
        trainer.state.epoch = self.trainer_state.epoch
        trainer.state.log_history = self.trainer_state.log_history
        set_rng_state(self.rng)

    def save(self, folder: Path, process_index: int, is_main_process: bool) -> None:
        from safetensors.torch import save_file

        torch.save(self.rng, rng_file(folder, process_index))
        if not is_main_process:
            return
        save_file(self.trainable, str(folder / TRAINABLE_FILE), metadata={"format": "pt"})
        torch.save(self.optimizer, folder / OPTIMIZER_FILE)
        if self.scheduler is not None:
            torch.save(self.scheduler, folder / SCHEDULER_FILE)
        torch.save({"kl_controller": self.kl_controller, "score_moments": self.score_moments,
                    "sampler": self.sampler, "num_processes": self.num_processes}, folder / PPO_STATE_FILE)
        self.trainer_state.save_to_json(str(folder / TRAINER_STATE_FILE))

    @classmethod
    def load(cls, folder: Path, process_index: int, num_processes: int) -> ResumeState:
        from safetensors.torch import load_file
        from transformers import TrainerState

        ppo_state = torch.load(folder / PPO_STATE_FILE, weights_only=False)
        if ppo_state["num_processes"] != num_processes:
            raise ValueError(
                f"{folder} was written by {ppo_state['num_processes']} processes; resume with the same number "
                f"(this run has {num_processes}) so every rank gets its prompts and RNG state back"
            )
        scheduler_file = folder / SCHEDULER_FILE
        return cls(
            trainable=load_file(str(folder / TRAINABLE_FILE)),
            optimizer=torch.load(folder / OPTIMIZER_FILE, weights_only=False),
            scheduler=torch.load(scheduler_file, weights_only=False) if scheduler_file.is_file() else None,
            kl_controller=ppo_state["kl_controller"],
            score_moments=ppo_state["score_moments"],
            sampler=ppo_state["sampler"],
            num_processes=num_processes,
            trainer_state=TrainerState.load_from_json(str(folder / TRAINER_STATE_FILE)),
            rng=torch.load(rng_file(folder, process_index), weights_only=False),
        )


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: bool | str | None) -> Path | None:
    """The checkpoint ``train(resume_from_checkpoint=...)`` means: None/False none, True the latest, or a path."""
    if resume_from_checkpoint in (None, False):
        return None
    if resume_from_checkpoint is True:
        found = latest_checkpoint(output_dir)
        if found is None:
            raise ValueError(f"resume_from_checkpoint=True but {output_dir} has no complete checkpoint-* folder")
        return found
    path = Path(resume_from_checkpoint)
    if not (path / PPO_STATE_FILE).is_file():
        raise ValueError(f"{path} is not a complete PPO checkpoint (no {PPO_STATE_FILE}); pass a checkpoint-* folder")
    return path


def _parameter_names(model) -> dict[int, str]:
    return {id(parameter): name for name, parameter in model.named_parameters()}


def save_checkpoint(trainer) -> Path:
    """Write ``checkpoint-<global_step>`` of a PPO trainer atomically, then rotate old checkpoints."""
    is_main = trainer.is_world_process_zero()

    def write(folder: Path) -> None:
        ResumeState.capture(trainer).save(folder, trainer.process_index, is_main)
        if is_main:
            trainer.model.save_adapters(folder / ADAPTERS_DIR)
            if trainer.processing_class is not None:
                trainer.processing_class.save_pretrained(folder / ADAPTERS_DIR)

    final_dir = write_atomically(checkpoint_dir(trainer.args.output_dir, trainer.state.global_step), write,
                                 is_main_process=is_main, wait_for_everyone=trainer.accelerator.wait_for_everyone)
    if is_main:
        rotate_checkpoints(trainer.args.output_dir, trainer.args.save_total_limit)
    return final_dir
