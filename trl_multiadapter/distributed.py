"""The few collectives data-parallel PPO needs, over the process group accelerate formed.

Why not ``DistributedDataParallel``: PPO calls the shared model through role methods
(``policy_forward``, ``reference_logits``, ``score``) that bypass DDP's gradient hooks, and it switches
adapters in place between them. So the trainer averages the gradients of the trainable parameters
itself, once per optimizer step, in flattened buckets; every rank then applies the same update and
holds identical adapters. With one process every function here is the identity.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

BUCKET_ELEMENTS = 1 << 24  # elements per flattened gradient bucket (64 MiB in float32)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_parameters(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Copy rank 0's values into every rank (fresh LoRA / head inits differ per process)."""
    if _world_size() == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for parameter in parameters:
            dist.broadcast(parameter.data, src=0)


def sum_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over processes (a new tensor; the input is left as it is)."""
    if _world_size() == 1:
        return tensor
    import torch.distributed as dist

    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any: a shared verdict, so all ranks stop together."""
    return bool(sum_across_processes(torch.tensor([float(flag)], device=device)).item() > 0)


def mean_across_processes(stats: dict[str, float], device: torch.device) -> dict[str, float]:
    """Mean of each scalar metric over processes (keys sorted, so every rank reduces the same vector)."""
    world = _world_size()
    if world == 1:
        return stats
    keys = sorted(stats)
    values = torch.tensor([stats[key] for key in keys], dtype=torch.float64, device=device)
    return dict(zip(keys, (sum_across_processes(values) / world).tolist()))


def all_reduce_gradients(parameters: Sequence[torch.nn.Parameter], contributed: int, device: torch.device) -> int:
    """Sum the gradients of ``parameters`` and the count of contributing mini-batches over processes.

    A rank whose mini-batches were all skipped still joins with zero gradients. Returns the total count.
    """
    if _world_size() == 1:
        return contributed
    import torch.distributed as dist

    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    count = torch.tensor([float(contributed)], device=device)
    dist.all_reduce(count)
    for bucket in _buckets(parameters, BUCKET_ELEMENTS):
        flat = torch.cat([parameter.grad.flatten() for parameter in bucket])
        dist.all_reduce(flat)
        offset = 0
        for parameter in bucket:
            parameter.grad.copy_(flat[offset : offset + parameter.numel()].view_as(parameter))
            offset += parameter.numel()
    return int(count.item())


def _buckets(parameters: Sequence[torch.nn.Parameter], max_elements: int) -> Iterator[list[torch.nn.Parameter]]:
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for parameter in parameters:
        if bucket and size + parameter.numel() > max_elements:
            yield bucket
            bucket, size = [], 0
        bucket.append(parameter)
        size += parameter.numel()
    if bucket:
        yield bucket
