"""The one device decision: CPU or CUDA, and where this process puts its model.

Every entry point (trainer arguments, reward training, pipeline stages, export, trl011) asks here, so
"no CUDA" always means the same thing: ``use_cpu=True`` in ``TrainingArguments`` (which is also what
makes accelerate form a gloo group for CPU data parallelism) and no ``device_map``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def use_cpu() -> bool:
    """True when training must run on the CPU (no CUDA device is visible)."""
    return not cuda_available()


def process_device_map() -> dict[str, Any]:
    """``from_pretrained`` keyword for this process: its whole model on its own GPU; ``{}`` on CPU.

    Each data-parallel process holds the full (possibly quantized) base on its local GPU.
    """
    if not cuda_available():
        return {}
    from accelerate import PartialState

    return {"device_map": {"": PartialState().local_process_index}}


def rng_devices() -> list[int]:
    """CUDA devices whose RNG ``torch.random.fork_rng`` must fork as well (none on CPU)."""
    import torch

    return [torch.cuda.current_device()] if cuda_available() else []


@contextmanager
def isolated_rng(seed: int):
    """Run the body on a torch RNG seeded with ``seed``; the caller's RNG state is left untouched."""
    import torch

    with torch.random.fork_rng(devices=rng_devices()):
        torch.manual_seed(seed)
        yield
