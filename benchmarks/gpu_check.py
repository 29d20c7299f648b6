"""GPU check of the flagship path (issue 16): 4-bit NF4 and bf16 at Llama-3.1-8B size, timed and measured.

One script answers, on any single CUDA machine, whether ``recipes/hh_squad.yaml``'s path trains
correctly, how fast, and in how much memory. No hub access: the architecture is built from its config
with random weights, saved once in bf16 under ``--work-dir``, and loaded as a user would
(``MultiAdapterModel.from_pretrained`` with the recipe's ``BitsAndBytesConfig``, or plain bf16).

Checks (each prints one line and is written to ``<output-dir>/gpu_<device>[_<size>].json`` + ``.md`` as
soon as it ends, so a run killed by a time limit still leaves what it measured):

1. ``lora_gradients``: LoRA gradients of the 4-bit model after a no-grad generation (what PPO does:
   generate, then train) against a float32 copy holding the dequantized weights, run under the same
   bf16 autocast. Pass: every LoRA tensor's relative error <= ``GRADIENT_BOUND``, and the gradient
   after the no-grad pass equals the one before it (bitsandbytes' CPU backend breaks exactly this).
2. ``ppo_iterations``: ``MultiAdapterPPOTrainer.step()`` at hh_squad's shapes for 4-bit and bf16:
   s/iteration split into generation / score / old logprobs / reference / optimisation, tokens/s,
   peak memory beside the ``--dry_run`` plan (``trl_multiadapter.plan.make_plan``) and A10G's 24 GiB.
3. ``nccl``: with two or more GPUs, a 2-process NCCL run keeps adapters identical.
4. ``projection``: time and cost per 100 PPO samples on ml.g5.12xlarge, scaled from the measured
   phases to A10G's published figures with a roofline model, beside the seed article's figures.

    python benchmarks/gpu_check.py --device cpu --size tiny --output-dir /tmp/gpu_check   # CI, seconds
    bash benchmarks/gpu_check.sh                                                         # one CUDA GPU

The output format is documented in benchmarks/README.md ("GPU check").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROCESS_START = time.perf_counter()  # the time limit counts from here: imports are part of the run
# Set when the script runs (main), not on import: a test importing this module must not change the
# environment that later subprocesses inherit (TRANSFORMERS_VERBOSITY=error turns their progress off).
SCRIPT_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                      "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SCHEMA = "trl-multiadapter/gpu_check/1"
GIB = 1024**3
RECIPE = "hh_squad"
GRADIENT_BOUND = 0.05  # max relative error of any LoRA gradient tensor (the CPU bug gives 0.38-1.5)
FIRST_ORDINARY_TOKEN_ID = 6  # ids 0-5 are the tiny tokenizer's special tokens
ASSET_VERSION = 1

# Published dense (no sparsity) bf16 tensor rates and memory bandwidths. Sources: NVIDIA's H100/H200 and
# A100 datasheets; for the A10G (AWS's variant of the A10, not on NVIDIA's site) the spec comparison
# in Baseten's "NVIDIA A10 vs A10G for ML model inference": 70 TFLOPS bf16 tensor, 35 TFLOPS fp32,
# 24 GB GDDR6 at 600 GB/s. (31.2 TFLOPS is the A10's fp32 rate, 125 TFLOPS its bf16 tensor rate.)
PUBLISHED_FIGURES = {
    "H200 NVL": {"bf16_flops": 835e12, "bandwidth": 4.8e12},
    "H200": {"bf16_flops": 989e12, "bandwidth": 4.8e12},
    "H100 PCIe": {"bf16_flops": 756e12, "bandwidth": 2.0e12},
    "H100": {"bf16_flops": 989e12, "bandwidth": 3.35e12},
    "A100-SXM4-80GB": {"bf16_flops": 312e12, "bandwidth": 2.039e12},
    "A100": {"bf16_flops": 312e12, "bandwidth": 1.555e12},
    "L40S": {"bf16_flops": 362e12, "bandwidth": 0.864e12},
    "A10G": {"bf16_flops": 70e12, "bandwidth": 600e9},
}
A10G_SOURCE = ("AWS A10G via Baseten's A10 vs A10G spec comparison: 70 TFLOPS bf16 dense tensor, "
               "600 GB/s GDDR6, 24 GB")
A10G_MEMORY_GIB = 24.0
# ml.g5.12xlarge has no NVLink: gradients of the data-parallel all-reduce cross PCIe Gen4 x16. An
# assumed effective ring bandwidth, not a measurement (the all-reduce is a small part of an iteration).
G5_ALLREDUCE_BYTES_PER_S = 12e9
# Seed article (TRL 0.11 multi-adapter PPO, Llama-3.1-8B-Instruct in 4-bit on one ml.g5.12xlarge).
SEED_SECONDS_PER_100_SAMPLES = 400.0

# Bytes moved per parameter each time a weight takes part in a forward or backward pass (traffic model
# of the projection). NF4 linears in a multi-token pass: bitsandbytes dequantizes to bf16 (read the
# packed weight, write bf16) and runs a bf16 GEMM (read bf16) = 4 + bits/8. After
# prepare_model_for_kbit_training the LM head is float32, cast to bf16 by autocast (read 4, write 2,
# read 2). LoRA adapters are float32, cast the same way.
BF16_BYTES_PER_PARAM = 2.0
FP32_UNDER_AUTOCAST_BYTES_PER_PARAM = 8.0

# Seconds a part needs at least before it is started (a load of the 8B model alone takes ~15-30 s).
MIN_SECONDS = {"arm": {"tiny": 5, "1b": 30, "8b": 60}, "gradients": {"tiny": 5, "1b": 20, "8b": 40},
               "ppo": {"tiny": 5, "1b": 15, "8b": 25}, "nccl": 60}

PHASES = ("generation", "score", "old_logprobs", "reference", "optimisation")
PHASE_KEYS = {name: f"time/rollout/{name}" for name in ("generation", "score", "old_logprobs", "reference")}
PHASE_KEYS["optimisation"] = "time/optimisation"
SUBPHASE_KEYS = {"forward": "time/optimisation/forward", "backward": "time/optimisation/backward",
                 "step": "time/optimisation/step"}


# ====================================================================================================
# model sizes


def llama_config(size: str, vocab_size: int):
    """The Llama config of a size: ``8b`` is Llama-3.1-8B, ``1b`` Llama-3.2-1B, ``tiny`` the test model.

    ``tiny`` keeps the tiny tokenizer's vocabulary; the others keep Llama-3's 128256 (the tiny
    tokenizer's ids are all in range; sampled ids above its vocabulary are never decoded).
    """
    from transformers import LlamaConfig

    from trl_multiadapter.testing import tiny_llama_config

    if size == "tiny":
        return tiny_llama_config("tiny", vocab_size=vocab_size)
    special = tiny_llama_config("tiny")
    shapes = {
        "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, tie_word_embeddings=False),
        "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    }[size]
    return LlamaConfig(
        vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, attention_dropout=0.0,
        # The legacy names: transformers 5 maps them to `rope_parameters` (every 5.x release takes them).
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0 if size == "8b" else 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=special.bos_token_id, eos_token_id=special.eos_token_id, pad_token_id=special.pad_token_id,
        **shapes,
    )


# ====================================================================================================
# pure cost model: FLOPs and bytes per phase, roofline projection (no torch, no I/O)


@dataclass(frozen=True)
class IterationShapes:
    """One PPO iteration on one process, as hh_squad runs it."""

    batch_size: int
    mini_batch_size: int
    gradient_accumulation_steps: int
    ppo_epochs: int
    prompt_length: int  # padded prompt length (the longest prompt of the batch)
    new_tokens: int
    policy_lora_params: int
    reward_lora_params: int
    activation_checkpointing: bool

    @property
    def sequence_length(self) -> int:
        return self.prompt_length + self.new_tokens

    @property
    def minibatches(self) -> int:
        return self.ppo_epochs * self.batch_size // self.mini_batch_size

    @property
    def optimizer_steps(self) -> int:
        return self.ppo_epochs * self.batch_size // (self.mini_batch_size * self.gradient_accumulation_steps)


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def scaled(self, factor: float) -> Cost:
        return Cost(self.flops * factor, self.bytes * factor)


def linear_bytes_per_param(quantized: bool, nf4_bits: float) -> float:
    return 4.0 + nf4_bits / 8 if quantized else BF16_BYTES_PER_PARAM


def head_bytes_per_param(quantized: bool) -> float:
    return FP32_UNDER_AUTOCAST_BYTES_PER_PARAM if quantized else BF16_BYTES_PER_PARAM


def attention_flops(dims, rows: int, query_tokens: int, context: int) -> float:
    """QK^T and AV of ``query_tokens`` new positions per row attending to ``context`` earlier ones (causal
    within the new block): 4 * layers * q_dim * (sum of attended positions)."""
    q_dim = dims.num_heads * dims.head_dim
    attended = query_tokens * context + query_tokens * (query_tokens + 1) / 2
    return 4.0 * dims.num_layers * q_dim * attended * rows


def forward_cost(dims, rows: int, tokens: int, context: int, head_tokens: int, adapter_params: int,
                 quantized: bool, nf4_bits: float) -> Cost:
    """One forward pass of the decoder (+ LM head on ``head_tokens`` per row): 2 FLOPs per weight and
    token, attention, and one read of every weight taking part."""
    head_params = dims.vocab_size * dims.hidden_size if head_tokens else 0
    flops = (2.0 * (dims.linear_params + adapter_params) * rows * tokens
             + 2.0 * head_params * rows * head_tokens
             + attention_flops(dims, rows, tokens, context))
    traffic = (dims.linear_params * linear_bytes_per_param(quantized, nf4_bits)
               + head_params * head_bytes_per_param(quantized)
               + adapter_params * FP32_UNDER_AUTOCAST_BYTES_PER_PARAM)
    return Cost(flops, traffic)


def kv_cache_bytes(dims, rows: int, positions: int) -> float:
    return rows * positions * dims.num_layers * 2 * dims.num_kv_heads * dims.head_dim * 2.0  # bf16 K and V


def phase_costs(dims, shapes: IterationShapes, quantized: bool, nf4_bits: float) -> dict[str, Cost]:
    """FLOPs and bytes of each phase of one PPO iteration on one process.

    generation: prefill of the padded prompts, then ``new_tokens - 1`` decode steps (each reads every
    weight and the KV cache); score: one reward-adapter pass over prompt + response (no LM head);
    reference: one adapter-free pass with the LM head on the response; old_logprobs: nothing (the
    sampler keeps them); optimisation: per mini-batch a forward, the checkpointing recompute and a
    backward of about the forward's cost (input gradients only: the base is frozen) plus twice the LoRA
    FLOPs for its weight gradients; Adam reads and writes 32 bytes per trainable parameter per step.
    """
    B, P, R, T = shapes.batch_size, shapes.prompt_length, shapes.new_tokens, shapes.sequence_length
    policy, reward = shapes.policy_lora_params, shapes.reward_lora_params
    generation = forward_cost(dims, B, P, 0, 1, policy, quantized, nf4_bits)
    for step in range(1, R):
        decode = forward_cost(dims, B, 1, P + step - 1, 1, policy, quantized, nf4_bits)
        generation = generation + decode + Cost(0.0, kv_cache_bytes(dims, B, P + step - 1))
    score = forward_cost(dims, B, T, 0, 0, reward, quantized, nf4_bits)
    reference = forward_cost(dims, B, T, 0, R, 0, quantized, nf4_bits)
    mb = shapes.mini_batch_size
    forward = forward_cost(dims, mb, T, 0, R, policy, quantized, nf4_bits)
    recompute = forward_cost(dims, mb, T, 0, 0, policy, quantized, nf4_bits) if shapes.activation_checkpointing \
        else Cost(0.0, 0.0)
    backward = forward_cost(dims, mb, T, 0, R, policy, quantized, nf4_bits) + Cost(
        attention_flops(dims, mb, T, 0) + 4.0 * policy * mb * T, 0.0)  # attention's two backward GEMMs; LoRA dW
    adam = Cost(0.0, 32.0 * policy).scaled(shapes.optimizer_steps)
    optimisation = (forward + recompute + backward).scaled(shapes.minibatches) + adam
    return {"generation": generation, "score": score, "old_logprobs": Cost(0.0, 0.0), "reference": reference,
            "optimisation": optimisation}


def roofline_seconds(cost: Cost, bf16_flops: float, bandwidth: float) -> float:
    """Lower bound on a phase's time: the larger of its arithmetic time and its memory time."""
    return max(cost.flops / bf16_flops, cost.bytes / bandwidth)


def project_phase(measured_s: float, cost: Cost, device: dict, target: dict, attainable: dict) -> dict[str, Any]:
    """A measured phase moved to another GPU, two ways that bracket it:

    - proportional (``projected_a10g_s``): the phase keeps its efficiency, roofline(device) / measured, on
      the target: projected = measured * roofline(target) / roofline(device). Host and launch overhead
      is scaled with the GPU too, so for a slower target this is the high end.
    - additive (``projected_a10g_additive_s``): everything above the attainable roofline is overhead that
      does not depend on the GPU: projected = measured - attainable(device) + attainable(target), with
      attainable figures = published * ``attainable`` fractions (the device's measured matmul rate and
      copy bandwidth over its published ones, assumed for the target too): the low end for a slower target.
    """
    device_floor = roofline_seconds(cost, device["bf16_flops"], device["bandwidth"])
    target_floor = roofline_seconds(cost, target["bf16_flops"], target["bandwidth"])
    efficiency = device_floor / measured_s if measured_s > 0 else None
    proportional = target_floor / efficiency if efficiency else 0.0
    device_attainable = roofline_seconds(cost, device["bf16_flops"] * attainable["compute"],
                                         device["bandwidth"] * attainable["memory"])
    target_attainable = roofline_seconds(cost, target["bf16_flops"] * attainable["compute"],
                                         target["bandwidth"] * attainable["memory"])
    additive = max(measured_s - device_attainable, 0.0) + target_attainable
    bound = "memory" if cost.bytes / target["bandwidth"] > cost.flops / target["bf16_flops"] else "compute"
    return {
        "measured_s": measured_s, "flops": cost.flops, "bytes": cost.bytes,
        "achieved_tflops": cost.flops / measured_s / 1e12 if measured_s > 0 else None,
        "achieved_gb_per_s": cost.bytes / measured_s / 1e9 if measured_s > 0 else None,
        "roofline_device_s": device_floor, "roofline_a10g_s": target_floor, "efficiency": efficiency,
        "a10g_bound": bound, "projected_a10g_s": proportional, "projected_a10g_additive_s": additive,
    }


def project_iteration(phase_seconds: dict[str, float], other_s: float, costs: dict[str, Cost], device: dict,
                      target: dict, attainable: dict, allreduce_s: float, samples_per_iteration: int,
                      usd_per_hour: float) -> dict:
    """Seconds and dollars per 100 PPO samples on the target instance, proportional (headline, upper) and
    additive (lower) models of :func:`project_phase`. Every process runs its own iteration in parallel;
    ``other_s`` is host time outside the phases, carried over unscaled; ``allreduce_s`` is added."""
    phases = {name: project_phase(phase_seconds[name], costs[name], device, target, attainable) for name in costs}
    out: dict[str, Any] = {"phases": phases, "other_s": other_s, "allreduce_s": allreduce_s}
    for suffix, key in (("", "projected_a10g_s"), ("_additive", "projected_a10g_additive_s")):
        iteration = sum(p[key] for p in phases.values()) + other_s + allreduce_s
        usd_per_sample = iteration * usd_per_hour / 3600.0 / samples_per_iteration
        out[f"iteration_s{suffix}"] = iteration
        out[f"seconds_per_100_samples{suffix}"] = 100.0 / samples_per_iteration * iteration
        out[f"usd_per_sample{suffix}"] = usd_per_sample
        out[f"usd_per_100_samples{suffix}"] = 100 * usd_per_sample
    for key in ("iteration_s", "seconds_per_100_samples", "usd_per_sample"):
        out[f"{key}_range"] = sorted([out[key], out[f"{key}_additive"]])
    return out


def allreduce_seconds(trainable_params: int, optimizer_steps: int, processes: int, bus_bytes_per_s: float) -> float:
    """Ring all-reduce of the fp32 trainable gradients before every optimizer step: each process sends
    and receives 2 (N - 1) / N of the buffer."""
    if processes <= 1:
        return 0.0
    return optimizer_steps * 2 * (processes - 1) / processes * 4.0 * trainable_params / bus_bytes_per_s


def relative_error(value, reference) -> float:
    """||value - reference|| / ||reference|| (inf when the reference is zero and value is not)."""
    diff = float((value - reference).norm())
    norm = float(reference.norm())
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def published_figures(device_name: str) -> tuple[str, dict] | None:
    for key, figures in PUBLISHED_FIGURES.items():  # specific names first (dict order)
        if key.lower() in device_name.lower():
            return key, figures
    return None


# ====================================================================================================
# the results file: JSON + markdown, rewritten after every check


class Report:
    def __init__(self, output_dir: Path, stem: str, data: dict):
        output_dir.mkdir(parents=True, exist_ok=True)
        self.json_path = output_dir / f"{stem}.json"
        self.md_path = output_dir / f"{stem}.md"
        self.data = data
        self.started = PROCESS_START

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.data["lines"].append(line)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def part(self, name: str, seconds: float) -> None:
        self.data["timeline"].append({"part": name, "seconds": round(seconds, 3), "at_s": round(self.elapsed(), 3)})

    def write(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 3)
        for path, text in ((self.json_path, json.dumps(self.data, indent=1, default=_json_default) + "\n"),
                           (self.md_path, render_markdown(self.data))):
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _gib(value) -> str:
    if value is None:
        return "n/a"
    return f"{value / GIB:.2f} GiB" if abs(value) >= GIB / 10 else f"{value / 1024**2:.1f} MiB"


def _range(pair, fmt: str) -> str:
    return f"{fmt.format(pair[0])} - {fmt.format(pair[1])}"


def render_markdown(data: dict) -> str:
    env, checks = data.get("env", {}), data.get("checks", {})
    out = [f"# GPU check: {env.get('device_name', '?')}, size {data.get('config', {}).get('size')}", ""]
    out.append(f"Status: **{data.get('status')}** after {data.get('elapsed_s', 0):.0f} s. "
               f"torch {env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}, "
               f"bitsandbytes {env.get('bitsandbytes')}.")
    out += ["", "| check | status | summary |", "|---|---|---|"]
    for name in ("lora_gradients", "ppo_iterations", "nccl", "projection"):
        check = checks.get(name, {})
        out.append(f"| {name} | {check.get('status', 'not run')} | {check.get('summary', '')} |")
    arms = checks.get("ppo_iterations", {}).get("arms", {})
    if arms:
        out += ["", "PPO iterations (median of the timed iterations, one process):", "",
                "| arm | s/iteration | generation | score | reference | optimisation | other | tokens/s "
                "| peak allocated | peak reserved | plan estimate | fits 24 GiB A10G |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for arm, result in arms.items():
            if result.get("status") != "measured":
                out.append(f"| {arm} | {result.get('status')}: {result.get('reason', result.get('error', ''))} "
                           "|||||||||||")
                continue
            t, memory = result["seconds"], result["memory"]
            out.append(
                f"| {arm} | {t['iteration']:.2f} | {t['generation']:.2f} | {t['score']:.2f} | {t['reference']:.2f} "
                f"| {t['optimisation']:.2f} | {t['other']:.2f} | {result['tokens_per_s']['processed']:.0f} "
                f"| {_gib(memory.get('peak_allocated_bytes'))} | {_gib(memory.get('peak_reserved_bytes'))} "
                f"| {_gib(result['plan']['total_bytes'])} | {memory.get('fits_a10g')} |")
    projection = checks.get("projection", {})
    if projection.get("arms"):
        out += ["", "PROJECTION (not a measurement) to ml.g5.12xlarge, 4 x A10G "
                f"({projection.get('a10g_figures', {}).get('source', '')}):", "",
                "| arm | projected s/iteration | s per 100 samples | $ per sample | seed article |",
                "|---|---|---|---|---|"]
        for arm, result in projection["arms"].items():
            out.append(f"| {arm} | {_range(result['iteration_s_range'], '{:.3g}')} "
                       f"| {_range(result['seconds_per_100_samples_range'], '{:.3g}')} "
                       f"| {_range(result['usd_per_sample_range'], '{:.2g}')} "
                       f"| ~{SEED_SECONDS_PER_100_SAMPLES:.0f} s, ${projection['seed_usd_per_sample']} |")
        out += ["", "Each range: additive model (GPU-independent overhead) and proportional model (same "
                "efficiency), see benchmarks/README.md."]
    out += ["", "Lines printed:", "", "```", *data.get("lines", []), "```", ""]
    return "\n".join(out)


# ====================================================================================================
# environment, timing, memory


def environment(device: str) -> dict[str, Any]:
    import importlib.metadata as metadata

    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env = {"python": sys.version.split()[0], **versions, "device": device, "cuda_available": torch.cuda.is_available()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, device_count=torch.cuda.device_count(),
                   device_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                   capability=f"{props.major}.{props.minor}")
    else:
        env.update(device_name="cpu", device_count=0, threads=torch.get_num_threads())
    return env


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_ceilings(device: str) -> dict[str, float]:
    """This device's bf16 matrix rate and copy bandwidth (large on CUDA, small on CPU: a code-path check)."""
    import torch

    n, copy_bytes, repeats = (8192, 2 * GIB, 10) if device == "cuda" else (256, 64 * 1024**2, 3)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    src = torch.randn(copy_bytes // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(2):
        a @ b
        dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    matmul_s = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    synchronize(device)
    copy_s = (time.perf_counter() - start) / repeats
    return {"bf16_flops": 2.0 * n**3 / matmul_s, "bandwidth": 2.0 * copy_bytes / copy_s,  # read + write
            "matmul_n": n, "copy_bytes": copy_bytes}


class PhaseProbe:
    """CUDA-synchronised phase boundaries and per-phase peak memory for the trainer's ``time/...`` timers.

    The trainer times phases with host clocks; on a GPU kernels run asynchronously, so a phase's time
    would land in whichever later phase synchronises. The probe synchronises at every boundary and
    resets the peak-memory counter at each top-level phase, keeping the running overall peak itself.
    """

    def __init__(self, device: str):
        self.device = device
        self.depth = 0
        self.phase_peaks: dict[str, int] = {}
        self.overall_allocated = 0
        self.overall_reserved = 0

    def _fold_peaks(self) -> None:
        import torch

        self.overall_allocated = max(self.overall_allocated, torch.cuda.max_memory_allocated())
        self.overall_reserved = max(self.overall_reserved, torch.cuda.max_memory_reserved())

    def reset(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.overall_allocated = self.overall_reserved = 0
        self.phase_peaks = {}

    def enter(self) -> None:
        self.depth += 1
        if self.device != "cuda":
            return
        import torch

        torch.cuda.synchronize()
        if self.depth == 1:
            self._fold_peaks()
            torch.cuda.reset_peak_memory_stats()

    def leave(self, name: str) -> None:
        self.depth -= 1
        if self.device != "cuda":
            return
        import torch

        torch.cuda.synchronize()
        if self.depth == 0:
            self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), torch.cuda.max_memory_allocated())
            self._fold_peaks()

    def peaks(self) -> tuple[int, int]:
        if self.device == "cuda":
            self._fold_peaks()
        return self.overall_allocated, self.overall_reserved


def instrument_phase_timers(trainer, probe: PhaseProbe) -> bool:
    """Route the trainer's ``time/...`` phase timers through ``probe`` (an instance attribute shadows the
    timer's method, so the trainer's own calls go through it). False when the trainer has no known timer
    hook (``timings.measure``, or ``_timed`` in older versions): phases are then timed unsynchronised and
    the JSON says so; the CPU test fails on it, so the hook is found again before a GPU run."""
    timings = getattr(trainer, "timings", None)
    if timings is not None and callable(getattr(timings, "measure", None)):
        timings.measure = _probed(timings.measure, probe)
        return True
    if callable(getattr(trainer, "_timed", None)):
        trainer._timed = _probed(trainer._timed, probe)
        return True
    return False


def _probed(measure, probe: PhaseProbe):
    @contextlib.contextmanager
    def probed(name: str):
        probe.enter()
        try:
            with measure(name):
                try:
                    yield
                finally:
                    synchronize(probe.device)  # inside the timer: the phase's kernels count for the phase
        finally:
            probe.leave(name.removeprefix("time/rollout/").removeprefix("time/"))

    return probed


# ====================================================================================================
# assets: the base model in bf16, the tokenizer, a random reward adapter (built once per size)


def asset_manifest(size: str, config) -> dict:
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"version": ASSET_VERSION, "size": size, "config_sha": digest}


def ensure_assets(size: str, work_dir: Path, device: str, reward_lora, report: Report) -> Path:
    """``work_dir/<size>``: base model (bf16 safetensors) + tokenizer, ``reward_adapter/`` (``reward_lora``:
    its peft ``LoraConfig``); reused when built for the same config."""
    import torch

    from trl_multiadapter.testing import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = llama_config(size, vocab_size=len(tokenizer))
    folder = work_dir / size
    manifest = {**asset_manifest(size, config),
                "reward_lora": {"r": reward_lora.r, "alpha": reward_lora.lora_alpha,
                                "targets": sorted(reward_lora.target_modules) if not isinstance(
                                    reward_lora.target_modules, str) else reward_lora.target_modules}}
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest:
        report.say(f"setup: reusing the saved {size} model in {folder}")
        return folder
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds for 8B, against minutes on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_reward_adapter(model, folder / "reward_adapter", reward_lora, seed=1)
    params = sum(p.numel() for p in model.parameters())
    del model
    free_memory(device)
    manifest_path.write_text(json.dumps(manifest, indent=1))
    seconds = time.perf_counter() - start
    report.say(f"setup: built and saved the {size} model ({params / 1e6:,.1f}M parameters, bf16) in {seconds:.1f} s")
    return folder


def write_reward_adapter(model, folder: Path, lora_config, seed: int) -> None:
    """A PEFT SEQ_CLS LoRA adapter (``lora_config``, from the recipe's reward section) with its 1-label score
    head and random weights, in the layout ``trl.RewardTrainer`` saves (what
    ``MultiAdapterModel.from_pretrained(reward_adapter=)`` reads). Targets are resolved to module names, as
    peft writes them after training."""
    import copy

    import torch
    from safetensors.torch import save_file

    wanted = lora_config.target_modules
    rank = lora_config.r
    generator = torch.Generator().manual_seed(seed)
    state, targets = {}, set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is model.get_output_embeddings():
            continue
        short = name.rsplit(".", 1)[-1]
        if wanted != "all-linear" and short not in wanted:
            continue
        targets.add(short)
        n_in, n_out = module.in_features, module.out_features
        state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, n_in, generator=generator) / n_in**0.5
        state[f"base_model.model.{name}.lora_B.weight"] = 0.02 * torch.randn(n_out, rank, generator=generator)
    hidden = model.config.hidden_size
    state["base_model.model.score.weight"] = torch.randn(1, hidden, generator=generator) / hidden**0.5
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    config = copy.deepcopy(lora_config)
    config.target_modules = sorted(targets)
    config.save_pretrained(str(folder))


# ====================================================================================================
# recipe, plan, model loading


def recipe_overrides(prompt_length: int, model_dir: Path, quantized: bool) -> list[str]:
    return [f"data.prompts.max_prompt_length={prompt_length}", f"model.name_or_path={model_dir}",
            f"quantization.load_in_4bit={'true' if quantized else 'false'}"]


def load_recipe(prompt_length: int, model_dir: Path, quantized: bool):
    from trl_multiadapter.recipe import load

    return load(RECIPE, recipe_overrides(prompt_length, model_dir, quantized))


def plan_estimate(recipe) -> dict[str, Any]:
    """The ``--dry_run`` estimate (``plan.make_plan``, exactly what ``trl-multiadapter run hh_squad --dry_run``
    prints) for this recipe: memory per device by part, in bytes."""
    from trl_multiadapter import plan

    made = plan.make_plan(recipe)
    memory = made.to_dict()["memory_per_device_bytes"]
    parts = {k: v for k, v in memory.items() if k != "total"}
    # What loading alone should take: base weights, the frozen reward adapter, and the policy LoRA + value
    # head's fp32 weights (4 of the part's 16 bytes per parameter; gradients and Adam come with training).
    weights = (parts["base weights"] + parts["reward LoRA + score head"]
               + parts["policy LoRA + value head (+ grads, Adam)"] // 4)
    return {"parts_bytes": parts, "total_bytes": memory["total"], "weights_bytes": weights,
            "num_processes": made.num_processes, "dims": dataclasses.asdict(made.dims),
            "model_parameters": made.dims.total_params}


def load_model(arm: str, recipe, model_dir: Path, device: str):
    """``MultiAdapterModel.from_pretrained`` as the pipeline's PPO stage builds it, from the recipe."""
    import torch

    from trl_multiadapter import MultiAdapterModel
    from trl_multiadapter.recipe import ppo_lora_config

    ppo = recipe.ppo
    return MultiAdapterModel.from_pretrained(
        str(model_dir),
        policy_config=ppo_lora_config(ppo),
        reward_adapter=str(model_dir / "reward_adapter"),
        quantization_config=recipe.quantization.bitsandbytes_config() if arm == "nf4" else None,
        dtype=getattr(torch, recipe.model.dtype),
        gradient_checkpointing=bool(getattr(ppo, "activation_checkpointing", False)
                                    or getattr(ppo, "gradient_checkpointing", False)),
        **({"device_map": {"": 0}} if device == "cuda" else {}),
    )


def lora_targets(section) -> str | list[str]:
    """A recipe section's LoRA target modules (``lora_target_modules``; ``target_modules`` in older recipes)."""
    targets = getattr(section, "lora_target_modules", None) or getattr(section, "target_modules", None)
    return targets or "all-linear"


def iteration_shapes(recipe, prompt_length: int, dims) -> IterationShapes:
    ppo = recipe.ppo
    return IterationShapes(
        batch_size=ppo.batch_size, mini_batch_size=ppo.mini_batch_size,
        gradient_accumulation_steps=ppo.gradient_accumulation_steps, ppo_epochs=ppo.ppo_epochs,
        prompt_length=prompt_length, new_tokens=ppo.max_new_tokens,
        policy_lora_params=dims.lora_params(ppo.lora_r, lora_targets(ppo)),
        reward_lora_params=dims.lora_params(recipe.reward.lora_r, lora_targets(recipe.reward)),
        activation_checkpointing=bool(getattr(ppo, "activation_checkpointing", False)),
    )


def random_prompts(count: int, max_length: int, vocab: int, bos: int, seed: int) -> list:
    """Token-id prompts of lengths in [max_length - 16, max_length], one of them exactly max_length."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(2, max_length - 16), max_length + 1, (count,), generator=generator).tolist()
    lengths[0] = max_length
    return [torch.cat([torch.tensor([bos]), torch.randint(FIRST_ORDINARY_TOKEN_ID, vocab, (n - 1,), generator=generator)])
            for n in lengths]


# ====================================================================================================
# check 1: 4-bit LoRA gradients after a no-grad forward


def trainable_by_name(model) -> dict[str, Any]:
    ids = {id(p) for p in model.trainable_parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) in ids}


def lora_gradients(model, ids, device: str, autocast: bool) -> dict[str, Any]:
    """Gradients of every trainable tensor for a PPO-like loss (token log-likelihood + value regression)."""
    import torch

    model.train(True)
    trainable = trainable_by_name(model)
    for p in trainable.values():
        p.grad = None
    context = torch.autocast(device_type=device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        logits, values = model.policy_forward(ids)
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    loss = -logprobs.mean() + 0.1 * values.float().pow(2).mean()
    loss.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in trainable.items() if p.grad is not None}
    for p in trainable.values():
        p.grad = None
    model.train(False)
    return grads


def no_grad_passes(model, ids, device: str, tokens: int = 4) -> None:
    """The passes a PPO iteration runs before its first backward: sampling with the trainer's sampler
    (inference mode, KV cache), the reward score and the reference logits (no grad)."""
    import torch

    from trl_multiadapter.rollout import SamplingSettings, sample_rollout

    mask = torch.ones_like(ids)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        sample_rollout(model, ids, mask, SamplingSettings(max_new_tokens=tokens, pad_token_id=0))
        if "reward" in model.roles:
            model.score(ids, mask)
        model.reference_logits(ids, mask)


def effective_weight(causal_lm, name: str):
    """The weight a base parameter ``name`` really computes with: NF4 weights dequantized by bitsandbytes."""
    path, attribute = name.rsplit(".", 1)
    module = causal_lm.get_submodule(path)
    module = getattr(module, "base_layer", module)  # a peft LoRA wrapper: the frozen layer underneath
    tensor = getattr(module, attribute)
    if type(tensor).__name__ == "Params4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(tensor.data, tensor.quant_state)
    return tensor.data


def reference_precision(config, device: str):
    """float32 when a float32 copy of the model fits in free GPU memory (with room for its pass), else bf16."""
    import torch

    if device != "cuda":
        return torch.float32
    from trl_multiadapter import plan

    free, _ = torch.cuda.mem_get_info()
    return torch.float32 if 4 * plan.dims_from_config(config).total_params * 1.25 < free else torch.bfloat16


def dequantized_reference(model, config, device: str, dtype):
    """A plain transformers model (``dtype``) holding ``model``'s effective base weights."""
    import torch
    from transformers import AutoModelForCausalLM

    causal_lm = model.peft_model.get_base_model()
    with torch.device(device):
        reference = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            weight = effective_weight(causal_lm, name)
            if tuple(weight.shape) != tuple(parameter.shape):
                raise RuntimeError(f"reference {name}: shape {tuple(parameter.shape)} but the model has "
                                   f"{tuple(weight.shape)}")
            parameter.copy_(weight.to(dtype))
    return reference.eval()


def error_summary(values: dict, references: dict) -> dict[str, Any]:
    errors = {name: relative_error(values[name], references[name]) for name in references}
    worst = max(errors, key=errors.get)
    finite = [e for e in errors.values() if math.isfinite(e)]
    return {"max": errors[worst], "median": statistics.median(finite) if finite else math.inf,
            "worst_tensor": worst, "tensors": len(errors),
            "all_tensors": float(relative_error(_flat(values, references), _flat(references, references)))}


def _flat(tensors: dict, order: dict):
    import torch

    return torch.cat([tensors[name].flatten() for name in order])


def check_lora_gradients(model, arm: str, config, lora_config, device: str, seed: int) -> dict[str, Any]:
    """Check 1 on ``model`` (its adapters are restored afterwards). ``lora_config``: a fresh ``LoraConfig``
    equal to the one the model's policy adapter was built with."""
    import torch

    from trl_multiadapter import MultiAdapterModel

    trainable = trainable_by_name(model)
    saved = {name: p.detach().clone() for name, p in trainable.items()}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B = 0 (peft's init) gives A no gradient at all; small random B gives both
        for name, p in trainable.items():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    ids = torch.randint(FIRST_ORDINARY_TOKEN_ID, min(1024, config.vocab_size), (2, 64), generator=generator).to(device)
    try:
        fresh = lora_gradients(model, ids, device, autocast=True)
        no_grad_passes(model, ids, device)
        after = lora_gradients(model, ids, device, autocast=True)
        start = time.perf_counter()
        reference_dtype = reference_precision(config, device)
        reference_base = dequantized_reference(model, config, device, reference_dtype)
        reference = MultiAdapterModel.from_pretrained(reference_base, policy_config=lora_config)
        with torch.no_grad():
            reference_trainable = trainable_by_name(reference)
            missing = set(trainable) ^ set(reference_trainable)
            if missing:
                raise RuntimeError(f"reference adapters differ from the model's: {sorted(missing)[:4]}")
            for name, p in trainable.items():
                reference_trainable[name].copy_(p.to(reference_trainable[name].dtype))
        build_s = time.perf_counter() - start
        same_precision = lora_gradients(reference, ids, device, autocast=True)
        full_precision = lora_gradients(reference, ids, device, autocast=False)
        reference_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
        del reference, reference_base
    finally:
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(saved[name])
                p.grad = None
        free_memory(device)
    result = {
        "arm": arm, "bound": GRADIENT_BOUND, "input_shape": list(ids.shape),
        "no_grad_passes": "sample_rollout (4 tokens), score, reference_logits",
        "reference": f"{reference_dtype} transformers model with the dequantized base weights, same LoRA weights",
        "reference_build_s": build_s, "reference_parameter_bytes": reference_bytes,
        "after_no_grad_vs_reference": error_summary(after, same_precision),
        "before_no_grad_vs_reference": error_summary(fresh, same_precision),
        "after_vs_before_no_grad": error_summary(after, fresh),
        "after_no_grad_vs_fp32_reference": error_summary(after, full_precision),
        "bf16_autocast_floor": error_summary(same_precision, full_precision),
    }
    worst = max(result["after_no_grad_vs_reference"]["max"], result["after_vs_before_no_grad"]["max"])
    result["max_error"] = worst
    result["passed"] = bool(worst <= GRADIENT_BOUND)  # NaN compares False: a NaN fails
    return result


# ====================================================================================================
# check 2: PPO iterations


def run_ppo_arm(model, arm: str, recipe, tokenizer, shapes: IterationShapes, device: str, warmup: int,
                iterations: int, time_box_s: float, work_dir: Path) -> dict[str, Any]:

    from trl_multiadapter import MultiAdapterPPOTrainer
    from trl_multiadapter.recipe import build_ppo_config

    probe = PhaseProbe(device)
    # The recipe's PPO settings; fixed-length responses (no stop token) so every iteration does the same work.
    config = build_ppo_config(
        recipe.ppo, output_dir=str(work_dir / f"ppo_{arm}"), use_cpu=device == "cpu", max_steps=warmup + iterations,
        stop_token=None, save_strategy="no", report_to="none", disable_tqdm=True,
    )
    trainer = MultiAdapterPPOTrainer(model=model, args=config, processing_class=tokenizer)
    instrumented = instrument_phase_timers(trainer, probe)  # on CPU the synchronisation is a no-op: same path
    records, started = [], time.perf_counter()
    for index in range(warmup + iterations):
        if index == warmup:
            probe.reset()  # steady state: Adam's moments exist, kernels are compiled
        prompts = random_prompts(shapes.batch_size, shapes.prompt_length, len(tokenizer), tokenizer.bos_token_id,
                                 seed=1000 + index)
        synchronize(device)
        start = time.perf_counter()
        stats = trainer.step(prompts)
        synchronize(device)
        wall = time.perf_counter() - start
        if index >= warmup:
            records.append(_iteration_record(stats, wall, prompts))
            if time.perf_counter() - started > time_box_s:
                break
    peak_allocated, peak_reserved = probe.peaks()
    # Means, not medians: a mean of sums is the sum of means, so the split still adds up to the iteration.
    seconds = {name: statistics.fmean(r["seconds"][name] for r in records) for name in records[0]["seconds"]}
    mean_prompt = statistics.mean(r["mean_prompt_tokens"] for r in records)
    result = {
        "status": "measured", "timed_iterations": len(records), "warmup_iterations": warmup,
        "phase_timers_instrumented": instrumented,
        "phase_timing": "host clock" if device == "cpu" else (
            "cuda-synchronised" if instrumented else "host clock, NOT synchronised (no timer hook found)"),
        "seconds": seconds,
        "tokens_per_s": {
            "generated": shapes.batch_size * shapes.new_tokens / seconds["generation"],
            "processed": shapes.batch_size * (mean_prompt + shapes.new_tokens) / seconds["iteration"],
        },
        "samples_per_s": shapes.batch_size / seconds["iteration"],
        "iterations": records,
        "memory": {"peak_allocated_bytes": peak_allocated if device == "cuda" else None,
                   "peak_reserved_bytes": peak_reserved if device == "cuda" else None,
                   "phase_peak_allocated_bytes": dict(probe.phase_peaks) if device == "cuda" else None},
    }
    del trainer
    return result


def _iteration_record(stats: dict, wall: float, prompts) -> dict[str, Any]:
    seconds = {name: float(stats.get(key, 0.0)) for name, key in PHASE_KEYS.items()}
    seconds.update({f"optimisation/{name}": float(stats.get(key, 0.0)) for name, key in SUBPHASE_KEYS.items()})
    seconds["iteration"] = float(stats["time/iteration"])
    seconds["other"] = seconds["iteration"] - sum(seconds[name] for name in PHASES)
    seconds["wall"] = wall
    keys = ("objective/kl", "objective/scores", "loss/policy_avg", "loss/value_avg", "policy/first_ratio",
            "policy/optimizer_steps", "policy/skipped_minibatches", "policy/grad_norm")
    return {"seconds": seconds, "mean_prompt_tokens": statistics.mean(len(p) for p in prompts),
            "metrics": {key: float(stats[key]) for key in keys if key in stats}}


def memory_verdict(result: dict, plan: dict, device: str, context_bytes: int | None) -> None:
    memory = result["memory"]
    if device != "cuda":
        memory["peak_rss_bytes"] = peak_rss_bytes()
        memory["fits_a10g"] = None
        return
    # What a 24 GiB card must hold: the allocator's peak plus the CUDA context. The reserved peak (cached
    # blocks) is an upper bound: on a roomy H200 the caching allocator keeps more than it would under pressure.
    context = context_bytes or 0
    needed = memory["peak_allocated_bytes"] + context
    memory["cuda_context_bytes"] = context_bytes
    memory["peak_device_bytes"] = needed
    memory["peak_device_bytes_reserved"] = memory["peak_reserved_bytes"] + context
    memory["measured_over_plan"] = needed / plan["total_bytes"]
    memory["a10g_margin_bytes"] = A10G_MEMORY_GIB * GIB - needed
    memory["fits_a10g"] = bool(needed <= A10G_MEMORY_GIB * GIB)
    memory["fits_a10g_with_reserved"] = bool(memory["peak_device_bytes_reserved"] <= A10G_MEMORY_GIB * GIB)
    if memory.get("after_load_allocated_bytes") is not None:
        memory["after_load_over_plan_weights"] = memory["after_load_allocated_bytes"] / plan["weights_bytes"]


# ====================================================================================================
# check 3: two-process NCCL run


def nccl_worker(output_dir: Path) -> None:
    """One rank of the 2-process check: ranks start from different adapters, train 2 steps on their own
    prompts, and must end bit-identical (the trainer broadcasts, then all-reduces gradients)."""
    import torch
    import torch.distributed as dist
    from peft import LoraConfig

    from trl_multiadapter import MultiAdapterModel, MultiAdapterPPOConfig, MultiAdapterPPOTrainer
    from trl_multiadapter.testing import build_tiny_model, build_tiny_tokenizer

    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() and os.environ.get("GPU_CHECK_DDP_CPU") != "1"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    torch.manual_seed(rank)  # different initial adapters per rank on purpose
    model = MultiAdapterModel.from_pretrained(
        build_tiny_model("tiny"), device_map=f"cuda:{local_rank}" if use_cuda else None,
        policy_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    args = MultiAdapterPPOConfig(output_dir=str(output_dir / f"rank{rank}"), use_cpu=not use_cuda, batch_size=4,
                                 mini_batch_size=2, ppo_epochs=2, max_steps=2, max_new_tokens=6, learning_rate=3e-3,
                                 save_strategy="no", report_to="none", disable_tqdm=True, seed=0, stop_token=None)
    tokenizer = build_tiny_tokenizer()

    def reward(prompts, completions, completion_ids, **kwargs):
        return [float(sum(100 <= t < 164 for t in ids)) for ids in completion_ids]

    trainer = MultiAdapterPPOTrainer(model=model, args=args, processing_class=tokenizer, reward_funcs=[reward])
    for step in range(2):
        trainer.step(random_prompts(4, 12, len(tokenizer), tokenizer.bos_token_id, seed=100 * rank + step))
    digest = hashlib.sha256()
    for parameter in model.trainable_parameters():
        digest.update(parameter.detach().float().cpu().contiguous().numpy().tobytes())
    record = {"rank": rank, "world_size": dist.get_world_size(), "backend": dist.get_backend(),
              "num_processes": trainer.num_processes, "digest": digest.hexdigest()}
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if rank == 0:
        (output_dir / "nccl.json").write_text(json.dumps(records))
    dist.barrier()
    dist.destroy_process_group()


def check_nccl(force_cpu: bool, timeout_s: float) -> dict[str, Any]:
    """torchrun --nproc_per_node 2 of this file's worker: NCCL on two GPUs, or gloo on CPU (``force_cpu``)."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(_free_port()), str(Path(__file__).resolve()),
                   "--nccl-worker", folder]
        leaked = ("ACCELERATE_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(leaked)}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        if force_cpu:
            env["GPU_CHECK_DDP_CPU"] = "1"
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
        if completed.returncode != 0:
            return {"status": "error", "summary": "the 2-process run failed", "stderr_tail": completed.stderr[-3000:]}
        records = json.loads(Path(folder, "nccl.json").read_text())
    identical = len({r["digest"] for r in records}) == 1
    backend = records[0]["backend"]
    expected = "gloo" if force_cpu else "nccl"
    passed = identical and backend == expected and all(r["num_processes"] == 2 for r in records)
    return {"status": "pass" if passed else "fail", "passed": passed, "records": records,
            "summary": f"{len(records)} ranks on {backend}: adapters {'identical' if identical else 'DIFFER'}"}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ====================================================================================================
# check 4: projection to ml.g5.12xlarge


def check_projection(arms: dict, costs_by_arm: dict, device_figures: dict, attainable: dict, recipe,
                     shapes: IterationShapes, num_processes: int, a10g: dict) -> dict[str, Any]:
    from trl_multiadapter import plan

    price = recipe.instance.price_per_hour
    samples = shapes.batch_size * num_processes
    allreduce = allreduce_seconds(shapes.policy_lora_params, shapes.optimizer_steps, num_processes,
                                  G5_ALLREDUCE_BYTES_PER_S)
    out = {}
    for arm, result in arms.items():
        if result.get("status") != "measured":
            continue
        seconds = result["seconds"]
        out[arm] = project_iteration({name: seconds[name] for name in PHASES}, max(seconds["other"], 0.0),
                                     costs_by_arm[arm], device_figures, a10g, attainable, allreduce, samples, price)
        out[arm]["vs_seed_article_time"] = out[arm]["seconds_per_100_samples"] / SEED_SECONDS_PER_100_SAMPLES
    return {
        "status": "projection" if out else "skipped", "arms": out,
        "label": "PROJECTION, not a measurement: measured phases scaled by a roofline model to A10G's published figures",
        "instance": recipe.instance.name, "processes": num_processes, "usd_per_hour": price,
        "samples_per_iteration": samples, "device_figures": device_figures, "attainable_fractions": attainable,
        "a10g_figures": a10g, "allreduce_bus_bytes_per_s_assumed": G5_ALLREDUCE_BYTES_PER_S,
        "seed_seconds_per_100_samples": SEED_SECONDS_PER_100_SAMPLES,
        "seed_usd_per_sample": plan.REFERENCE_COSTS["ppo_usd_per_sample"],
    }


# ====================================================================================================
# orchestration


@dataclass
class Options:
    device: str
    size: str
    output_dir: Path
    work_dir: Path
    prompt_length: int
    warmup: int
    iterations: int
    time_limit_s: float
    arms: tuple[str, ...]
    ddp_on_cpu: bool
    a10g_tflops: float
    a10g_bandwidth_gbs: float


class TimeLimitReached(BaseException):
    """SIGTERM (the wrapper's timeout) or the time limit: a BaseException, so no check's error handler
    swallows it; ``main`` writes the partial results."""


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    if options is None:
        return 0
    for name, value in SCRIPT_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()

    if options.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device (torch "
              f"{torch.__version__}); use --device cpu, or run on a GPU machine.", file=sys.stderr)
        return 2
    stem = "gpu_" + ("cpu" if options.device == "cpu" else _slug(torch.cuda.get_device_name(0)))
    if options.size != "8b":
        stem += f"_{options.size}"
    report = Report(options.output_dir, stem, {
        "schema": SCHEMA, "status": "running", "env": environment(options.device),
        "config": {"size": options.size, "recipe": RECIPE, "prompt_length": options.prompt_length,
                   "warmup_iterations": options.warmup, "timed_iterations": options.iterations,
                   "time_limit_s": options.time_limit_s, "arms": list(options.arms),
                   "gradient_bound": GRADIENT_BOUND},
        "checks": {}, "timeline": [], "lines": [],
    })

    def on_term(signum, frame):
        raise TimeLimitReached(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    status = "complete"
    try:
        run_checks(options, report)
    except TimeLimitReached as stop:
        status = "partial"
        report.say(f"stopped: {stop}; the results so far are in {report.json_path}")
    except Exception as error:  # noqa: BLE001 - record the crash in the results, then fail
        status = "error"
        report.data["error"] = traceback.format_exc()[-4000:]
        report.say(f"error: {type(error).__name__}: {error}")
    checks = report.data["checks"].values()
    if status == "complete" and any(c.get("status") in ("fail", "error") for c in checks):
        status = "failed"
    report.data["status"] = status
    report.say(f"gpu_check: {status} in {report.elapsed():.0f} s -> {report.json_path}")
    report.write()
    return 0 if status == "complete" else 1


def parse_args(argv) -> Options | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--size", choices=("tiny", "1b", "8b"), default=None,
                        help="model size (default: 8b on cuda, tiny on cpu)")
    parser.add_argument("--output-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--work-dir", type=Path, default=REPO / "benchmarks" / ".work" / "gpu_check",
                        help="where the random base model is saved once per size (8b: 16 GB)")
    parser.add_argument("--prompt-length", type=int, default=256, help="longest prompt in tokens (hh_squad: ~256)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed PPO iterations per arm")
    parser.add_argument("--iterations", type=int, default=2, help="timed PPO iterations per arm")
    parser.add_argument("--time-limit", type=float, default=260.0,
                        help="seconds for the whole script (from its start); parts that would not fit are skipped")
    parser.add_argument("--arms", default="nf4,bf16", help="comma-separated: nf4 (4-bit, CUDA only), bf16")
    parser.add_argument("--ddp-on-cpu", action="store_true",
                        help="run check 3 as 2 CPU processes on gloo (to test the worker without GPUs)")
    parser.add_argument("--a10g-tflops", type=float, default=PUBLISHED_FIGURES["A10G"]["bf16_flops"] / 1e12)
    parser.add_argument("--a10g-bandwidth-gbs", type=float, default=PUBLISHED_FIGURES["A10G"]["bandwidth"] / 1e9)
    parser.add_argument("--nccl-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nccl_worker is not None:
        nccl_worker(args.nccl_worker)
        return None
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    unknown = [a for a in arms if a not in ("nf4", "bf16")]
    if unknown or not arms:
        parser.error(f"--arms {args.arms!r}: use a comma-separated list of nf4 and bf16")
    for name in ("prompt_length", "iterations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return Options(
        device=args.device, size=args.size or ("8b" if args.device == "cuda" else "tiny"),
        output_dir=args.output_dir, work_dir=args.work_dir, prompt_length=args.prompt_length,
        warmup=max(0, args.warmup), iterations=args.iterations, time_limit_s=args.time_limit, arms=arms,
        ddp_on_cpu=args.ddp_on_cpu, a10g_tflops=args.a10g_tflops, a10g_bandwidth_gbs=args.a10g_bandwidth_gbs,
    )


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower().removeprefix("nvidia ")).strip("_")


@dataclass
class Session:
    """What the parts of one run share."""

    options: Options
    report: Report
    deadline: float
    ceilings: dict
    context_bytes: int | None
    model_dir: Path
    config: Any
    tokenizer: Any
    quantizable: bool
    costs_by_arm: dict = dataclasses.field(default_factory=dict)

    @property
    def device(self) -> str:
        return self.options.device

    @property
    def checks(self) -> dict:
        return self.report.data["checks"]

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def has_time_for(self, part: str) -> bool:
        needed = MIN_SECONDS[part]
        return self.remaining() >= (needed[self.options.size] if isinstance(needed, dict) else needed)


def run_checks(options: Options, report: Report) -> None:
    """The run's timeline: ceilings, assets, then per arm (4-bit first) load, check 1, check 2 and the
    projection (check 4) from what is measured so far; check 3 last. Results are written after each part."""
    import torch

    from trl_multiadapter.model_quant import bitsandbytes_installed
    from trl_multiadapter.recipe import load

    device = options.device
    deadline = PROCESS_START + options.time_limit_s
    context_bytes = None
    if device == "cuda":
        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        context_bytes = total - free - torch.cuda.memory_reserved()
        report.data["env"]["cuda_context_bytes"] = context_bytes
    report.say(f"gpu_check: {report.data['env']['device_name']}, size {options.size}, arms {','.join(options.arms)}, "
               f"time limit {options.time_limit_s:.0f} s")

    start = time.perf_counter()
    ceilings = measure_ceilings(device)
    free_memory(device)
    report.data["env"]["measured_ceilings"] = ceilings
    report.part("ceilings", time.perf_counter() - start)
    report.say(f"device ceilings (measured): {ceilings['bf16_flops'] / 1e12:.1f} TFLOP/s bf16 matmul, "
               f"{ceilings['bandwidth'] / 1e9:.0f} GB/s copy")

    start = time.perf_counter()
    from trl_multiadapter.lora import reward_lora_config

    model_dir = ensure_assets(options.size, options.work_dir, device, reward_lora_config(load(RECIPE).reward), report)
    report.part("setup", time.perf_counter() - start)
    from transformers import AutoConfig, AutoTokenizer

    session = Session(options, report, deadline, ceilings, context_bytes, model_dir,
                      AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir),
                      quantizable=device == "cuda" and bitsandbytes_installed())
    checks = session.checks
    checks["lora_gradients"] = {"status": "pending"}
    checks["ppo_iterations"] = {"status": "pending", "arms": {}}
    for arm in options.arms:
        run_arm(session, arm)
        summarise_ppo(checks["ppo_iterations"], device)
        projection_step(session)
        report.write()
    if checks["lora_gradients"]["status"] == "pending":
        checks["lora_gradients"] = {"status": "skipped", "summary": "no arm was loaded"}
    checks.setdefault("projection", {"status": "skipped", "summary": "no measured arm"})
    report.write()

    start = time.perf_counter()
    count = report.data["env"].get("device_count", 0)
    if not options.ddp_on_cpu and (device != "cuda" or count < 2):
        checks["nccl"] = {"status": "skipped", "summary": f"needs 2 CUDA GPUs, found {count}"}
    elif not session.has_time_for("nccl"):
        checks["nccl"] = {"status": "skipped", "summary": "time limit"}
    else:
        try:
            checks["nccl"] = check_nccl(options.ddp_on_cpu, timeout_s=max(30.0, min(180.0, session.remaining())))
        except Exception as error:  # noqa: BLE001 - recorded, the run goes on
            checks["nccl"] = {"status": "error", "summary": f"{type(error).__name__}: {error}"}
    report.part("nccl", time.perf_counter() - start)
    report.say(f"nccl: {checks['nccl']['status']}: {checks['nccl']['summary']}")
    report.write()


def run_arm(session: Session, arm: str) -> None:
    """Load one arm as a user would, run check 1 on it when it is the gradient arm, then check 2."""
    import torch

    from trl_multiadapter import plan

    options, report, device = session.options, session.report, session.device
    arms = session.checks["ppo_iterations"]["arms"]
    quantized = arm == "nf4"
    if quantized and not session.quantizable:
        why = ("bitsandbytes 4-bit training needs CUDA: its CPU backend computes wrong LoRA gradients after a "
               "no-grad forward (trl_multiadapter/model_quant.py), and the library refuses it"
               if device == "cpu" else "bitsandbytes is not installed (run benchmarks/gpu_check.sh)")
        arms[arm] = {"status": "skipped", "reason": why}
        report.say(f"ppo_iterations[{arm}]: skipped: {why}")
        return
    if not session.has_time_for("arm"):
        arms[arm] = {"status": "skipped", "reason": "time limit"}
        report.say(f"ppo_iterations[{arm}]: skipped: {session.remaining():.0f} s left of the time limit")
        return
    recipe = load_recipe(options.prompt_length, session.model_dir, quantized)
    estimate = plan_estimate(recipe)
    dims = plan.dims_from_config(session.config)
    shapes = iteration_shapes(recipe, options.prompt_length, dims)
    nf4_bits = plan.NF4_BITS_DOUBLE_QUANT if recipe.quantization.bnb_4bit_use_double_quant else plan.NF4_BITS
    session.costs_by_arm[arm] = (phase_costs(dims, shapes, quantized, nf4_bits), recipe, shapes,
                                 estimate["num_processes"])
    model = None
    try:
        free_memory(device)
        baseline = load_peak = loaded = None
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
        start = time.perf_counter()
        model = load_model(arm, recipe, session.model_dir, device)
        load_s = time.perf_counter() - start
        report.part(f"load {arm}", load_s)
        if device == "cuda":
            loaded = torch.cuda.memory_allocated() - baseline
            load_peak = torch.cuda.max_memory_allocated() - baseline
        parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        report.say(f"load[{arm}]: {load_s:.1f} s, {_gib(loaded if loaded is not None else parameter_bytes)} of "
                   f"weights and adapters (plan: {_gib(estimate['weights_bytes'])}, of which base weights "
                   f"{_gib(estimate['parts_bytes']['base weights'])})")
        # Check 1 runs on the 4-bit arm; without one (CPU, no bitsandbytes, --arms bf16) the first arm runs
        # it as a stand-in that exercises the code path.
        four_bit_coming = session.quantizable and "nf4" in options.arms
        if quantized or (session.checks["lora_gradients"]["status"] == "pending" and not four_bit_coming):
            run_gradient_check(model, arm, recipe, session, is_4bit=quantized)
            report.write()
        if not session.has_time_for("ppo"):
            arms[arm] = {"status": "skipped", "reason": "time limit (after loading)"}
            report.say(f"ppo_iterations[{arm}]: skipped: {session.remaining():.0f} s left of the time limit")
            return
        start = time.perf_counter()
        result = run_ppo_arm(model, arm, recipe, session.tokenizer, shapes, device, options.warmup,
                             options.iterations, time_box_s=max(10.0, min(90.0, session.remaining() - 30)),
                             work_dir=options.work_dir)
        report.part(f"ppo {arm}", time.perf_counter() - start)
        result["load_s"] = load_s
        result["memory"].update(baseline_allocated_bytes=baseline, after_load_allocated_bytes=loaded,
                                load_peak_allocated_bytes=load_peak, parameter_bytes=parameter_bytes)
        result["plan"] = estimate
        result["shapes"] = dataclasses.asdict(shapes)
        result["costs"] = {name: dataclasses.asdict(cost) for name, cost in session.costs_by_arm[arm][0].items()}
        memory_verdict(result, estimate, device, session.context_bytes)
        arms[arm] = result
        report.say(ppo_line(arm, result, estimate, device))
    except Exception as error:  # noqa: BLE001 - a crash is a finding: record it and go on
        arms[arm] = {"status": "error", "error": f"{type(error).__name__}: {error}",
                     "traceback": traceback.format_exc()[-3000:]}
        report.say(f"ppo_iterations[{arm}]: ERROR {type(error).__name__}: {error}")
    finally:
        model = None
        free_memory(device)
        if device == "cuda" and arm in arms:
            arms[arm]["allocated_after_free_bytes"] = torch.cuda.memory_allocated()


def ppo_line(arm: str, result: dict, estimate: dict, device: str) -> str:
    t, memory = result["seconds"], result["memory"]
    peak = memory["peak_allocated_bytes"] if device == "cuda" else memory["peak_rss_bytes"]
    line = (f"ppo_iterations[{arm}]: {t['iteration']:.2f} s/iteration (generation {t['generation']:.2f}, score "
            f"{t['score']:.2f}, reference {t['reference']:.2f}, optimisation {t['optimisation']:.2f}, other "
            f"{t['other']:.2f}); {result['tokens_per_s']['processed']:.0f} tokens/s; peak "
            f"{'allocated' if device == 'cuda' else 'process RSS'} {_gib(peak)}")
    if device == "cuda":
        line += (f" (+ CUDA context {_gib(memory['cuda_context_bytes'])}), reserved "
                 f"{_gib(memory['peak_reserved_bytes'])}; plan {_gib(estimate['total_bytes'])}; fits a 24 GiB "
                 f"A10G: {memory['fits_a10g']} (margin {_gib(memory['a10g_margin_bytes'])})")
    else:
        line += f"; plan {_gib(estimate['total_bytes'])} (a GPU estimate)"
    return line


def run_gradient_check(model, arm: str, recipe, session: Session, is_4bit: bool) -> None:
    from trl_multiadapter.recipe import ppo_lora_config

    checks, report, device = session.checks, session.report, session.device
    config = session.config
    start = time.perf_counter()
    why = None
    if not is_4bit:
        why = ("4-bit skipped: bitsandbytes' CPU backward is known wrong after a no-grad forward and the library "
               "refuses k-bit training on CPU" if device == "cpu" else "4-bit skipped: no nf4 arm or no bitsandbytes")
    if not session.has_time_for("gradients"):
        checks["lora_gradients"] = {"status": "skipped", "summary": "time limit"}
        report.say("lora_gradients: skipped: time limit")
        return
    try:
        result = check_lora_gradients(model, arm, config, ppo_lora_config(recipe.ppo), device, seed=7)
    except Exception as error:  # noqa: BLE001
        checks["lora_gradients"] = {"status": "error", "summary": f"{type(error).__name__}: {error}",
                                    "traceback": traceback.format_exc()[-3000:]}
        report.say(f"lora_gradients: ERROR {type(error).__name__}: {error}")
        return
    report.part("lora_gradients", time.perf_counter() - start)
    numbers = (f"max relative error {result['after_no_grad_vs_reference']['max']:.2e} vs the dequantized reference "
               f"after the no-grad passes, {result['after_vs_before_no_grad']['max']:.2e} vs before it "
               f"(bound {GRADIENT_BOUND}); bf16-vs-fp32 floor {result['bf16_autocast_floor']['max']:.2e}")
    if is_4bit:
        result["status"] = "pass" if result["passed"] else "fail"
        result["summary"] = numbers
        report.say(f"lora_gradients[{arm}]: {result['status'].upper()}: {numbers}")
    else:
        # The same code path on the unquantized base: it proves the check runs, not that 4-bit is right.
        result = {"status": "skipped", "summary": why, "stand_in": {**result, "note": f"{arm} base, not 4-bit"}}
        report.say(f"lora_gradients: skipped: {why}")
        report.say(f"lora_gradients stand-in on the {arm} base (code path only): {numbers}")
    checks["lora_gradients"] = result


def summarise_ppo(check: dict, device: str) -> None:
    arms = check["arms"]
    measured = {a: r for a, r in arms.items() if r.get("status") == "measured"}
    errors = [a for a, r in arms.items() if r.get("status") == "error"]
    parts = [f"{a}: {r['seconds']['iteration']:.2f} s/it, peak "
             f"{_gib(r['memory']['peak_allocated_bytes'] if device == 'cuda' else r['memory']['peak_rss_bytes'])}"
             for a, r in measured.items()]
    check["summary"] = "; ".join(parts + [f"{a}: error" for a in errors]) or "no arm ran"
    if errors:
        check["status"] = "error"
    elif not measured:
        check["status"] = "skipped"
    elif device == "cuda" and "nf4" in measured and measured["nf4"]["memory"]["fits_a10g"] is False:
        check["status"] = "fail"
        check["summary"] += "; the 4-bit arm does not fit a 24 GiB A10G"
    else:
        check["status"] = "measured"


def projection_step(session: Session) -> None:
    options, report, checks = session.options, session.report, session.checks
    if not session.costs_by_arm:
        return
    _, recipe, shapes, num_processes = next(iter(session.costs_by_arm.values()))
    env, ceilings = report.data["env"], session.ceilings
    known = published_figures(env["device_name"]) if options.device == "cuda" else None
    if known:
        device_figures = {**known[1], "source": f"published ({known[0]})"}
    else:
        device_figures = {"bf16_flops": ceilings["bf16_flops"], "bandwidth": ceilings["bandwidth"],
                          "source": "measured on this device (no published figures known for it)"}
    attainable = {"compute": min(1.0, ceilings["bf16_flops"] / device_figures["bf16_flops"]),
                  "memory": min(1.0, ceilings["bandwidth"] / device_figures["bandwidth"])}
    a10g = {"bf16_flops": options.a10g_tflops * 1e12, "bandwidth": options.a10g_bandwidth_gbs * 1e9,
            "source": A10G_SOURCE}
    costs = {arm: value[0] for arm, value in session.costs_by_arm.items()}
    result = check_projection(checks["ppo_iterations"]["arms"], costs, device_figures, attainable, recipe,
                              shapes, num_processes, a10g)
    if options.device == "cpu":
        result["note"] = "CPU mode: the projection code ran; the numbers mean nothing for a GPU"
    parts = [f"{arm}: {_range(r['seconds_per_100_samples_range'], '{:.3g}')} s per 100 samples, "
             f"${_range(r['usd_per_sample_range'], '{:.2g}')} per sample" for arm, r in result["arms"].items()]
    result["summary"] = ("PROJECTION " + "; ".join(parts)
                         + f" (seed article: ~{SEED_SECONDS_PER_100_SAMPLES:.0f} s, ${result['seed_usd_per_sample']}"
                         " per sample)") if parts else "no measured arm"
    previous = checks.get("projection", {}).get("summary")
    checks["projection"] = result
    if result["summary"] != previous:
        report.say(f"projection to {result['instance']} ({num_processes} x A10G): {result['summary']}")


if __name__ == "__main__":
    sys.exit(main())
