"""What ``trl-multiadapter env`` reports: package versions, devices, bf16 and 4-bit support.

Versions come from the installed distributions' metadata, so a package is reported even when it
fails to import. Torch is imported only for the device facts.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata

NOT_INSTALLED = "not installed"

# Distributions whose versions matter for a bug report, in the order they are printed.
REPORTED_PACKAGES = (
    "trl-multiadapter",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "bitsandbytes",
)


@dataclass
class CudaDevice:
    index: int
    name: str
    total_memory_gib: float
    compute_capability: str
    bf16: bool


@dataclass
class EnvInfo:
    python: str
    platform: str
    packages: dict[str, str]
    cpu_cores: int  # logical cores this process may run on
    torch_threads: int | None
    cpu_capability: str | None  # torch's SIMD level, e.g. "AVX2", "AVX512"
    cuda_devices: list[CudaDevice] = field(default_factory=list)
    cuda_version: str | None = None
    bf16: str = ""
    four_bit: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def package_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return NOT_INSTALLED


def usable_cpu_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # honours taskset / container CPU sets; absent on macOS
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def collect_env_info() -> EnvInfo:
    packages = {name: package_version(name) for name in REPORTED_PACKAGES}
    info = EnvInfo(
        python=f"{platform.python_version()} ({sys.executable})",
        platform=platform.platform(),
        packages=packages,
        cpu_cores=usable_cpu_cores(),
        torch_threads=None,
        cpu_capability=None,
    )
    if packages["torch"] == NOT_INSTALLED:
        info.bf16 = "unknown: torch is not installed"
        info.four_bit = "no: torch is not installed"
        return info
    _add_torch_facts(info)
    return info


def _add_torch_facts(info: EnvInfo) -> None:
    import torch

    info.torch_threads = torch.get_num_threads()
    info.cpu_capability = torch.backends.cpu.get_cpu_capability()
    if torch.cuda.is_available():
        info.cuda_version = torch.version.cuda
        info.cuda_devices = [_cuda_device(torch, index) for index in range(torch.cuda.device_count())]
    info.bf16 = _bf16_support(info.cuda_devices)
    info.four_bit = _four_bit_support(bool(info.cuda_devices), info.packages["bitsandbytes"])


def _cuda_device(torch, index: int) -> CudaDevice:
    properties = torch.cuda.get_device_properties(index)
    return CudaDevice(
        index=index,
        name=properties.name,
        total_memory_gib=round(properties.total_memory / 2**30, 1),
        compute_capability=f"{properties.major}.{properties.minor}",
        bf16=properties.major >= 8,  # bf16 tensor cores arrived with Ampere (sm_80)
    )


def _bf16_support(cuda_devices: list[CudaDevice]) -> str:
    if cuda_devices:
        supported = [f"cuda:{d.index}" for d in cuda_devices if d.bf16]
        if len(supported) == len(cuda_devices):
            return "yes (all CUDA devices)"
        return f"partial: {', '.join(supported) or 'no CUDA device'} (needs compute capability >= 8.0)"
    # CPUs run bf16 through torch on every x86/ARM build; speed depends on AVX512-BF16/AMX.
    return "yes (CPU; slower than fp32 without AVX512-BF16/AMX)"


def _four_bit_support(has_cuda: bool, bitsandbytes_version: str) -> str:
    if bitsandbytes_version == NOT_INSTALLED:
        return "no: bitsandbytes is not installed (pip install 'trl-multiadapter[quant]')"
    if not has_cuda:
        return "no: 4-bit NF4 needs a CUDA GPU (bitsandbytes is installed)"
    return "yes (CUDA + bitsandbytes)"


def format_env_info(info: EnvInfo) -> str:
    width = max(len(name) for name in [*info.packages, "4-bit (NF4)"]) + 1
    lines = [f"{'python':<{width}} {info.python}", f"{'platform':<{width}} {info.platform}"]
    lines += [f"{name:<{width}} {version}" for name, version in info.packages.items()]
    cpu = f"{info.cpu_cores} cores"
    if info.torch_threads is not None:
        cpu += f", torch threads {info.torch_threads}, SIMD {info.cpu_capability}"
    lines.append(f"{'cpu':<{width}} {cpu}")
    if info.cuda_devices:
        lines.append(f"{'cuda':<{width}} {info.cuda_version}, {len(info.cuda_devices)} device(s)")
        for device in info.cuda_devices:
            lines.append(
                f"{f'  cuda:{device.index}':<{width}} {device.name}, {device.total_memory_gib} GiB, "
                f"compute capability {device.compute_capability}"
            )
    else:
        lines.append(f"{'cuda':<{width}} no CUDA device")
    lines.append(f"{'bf16':<{width}} {info.bf16}")
    lines.append(f"{'4-bit (NF4)':<{width}} {info.four_bit}")
    return "\n".join(lines)
