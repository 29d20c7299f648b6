"""The ``--dry_run`` plan: stages, launch, a GPU memory estimate per device and a cost projection.

Everything here works from the recipe alone (no download, no GPU), so ``trl-multiadapter run hh_squad
--dry_run`` answers "will it fit on the recipe's instance, and what will it cost" on a CPU laptop.

Memory per device (every data-parallel process holds the whole model), in bytes; ``P_x`` are parameter
counts from the model's architecture, ``T = max_prompt_length + max_new_tokens``:

====================  ==========================================================================
base weights          4-bit: P_linear * b4 / 8 + (P_embed + P_lm_head + P_norm) * 4, with
                      b4 = 4.127 bits (NF4 with double quantization) or 4.5 bits (without); the
                      unquantized parameters are float32 because peft's prepare_model_for_kbit_training
                      upcasts them; otherwise P_base * d. ``d`` is the base dtype's size.
policy LoRA + value   (P_policy_lora + P_value_head) * 16: fp32 weights, gradients, Adam m and v
reward LoRA + head    (P_reward_lora + P_score_head) * 4 (fp32, frozen)
activations           L * mini_batch_size * T * 34 * hidden * a / 2 (Korthikanti et al. 2022, with
                      memory-efficient attention); with gradient checkpointing
                      L * mini_batch_size * T * hidden * a + one layer's full activations
logits                mini_batch_size * (max_new_tokens + 1) * vocab * 4 * 3 (fp32 logits,
                      log-softmax, gradient)
KV cache              batch_size * T * L * 2 * kv_heads * head_dim * a (generation)
runtime overhead      1 GiB on GPU (CUDA context, allocator slack)
====================  ==========================================================================

``a`` is the activation dtype size (2 for bf16/fp16 compute, 4 for fp32). It is an estimate to catch
recipes that cannot fit, not a promise: fragmentation and kernel workspaces vary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .recipe import DEFAULT_STAGES, Recipe

GIB = 1024**3
GPU_RUNTIME_OVERHEAD_BYTES = 1 * GIB
ADAM_BYTES_PER_TRAINABLE_PARAM = 16  # fp32 weight + gradient + Adam first and second moments
FROZEN_ADAPTER_BYTES_PER_PARAM = 4
NF4_BITS_DOUBLE_QUANT = 4 + 32 / 64 / 4 + 32 / (64 * 256)  # 4 bits + 8-bit absmax per 64 + fp32 per 256 blocks
NF4_BITS = 4 + 32 / 64  # 4 bits + an fp32 absmax per block of 64
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The seed article (multi-adapter PPO with TRL 0.11 on one ml.g5.12xlarge, Llama-3.1-8B-Instruct in
# 4-bit, hh-rlhf reward adapter, SQuAD prompts) reports these costs; shown beside ours when the
# instance matches.
REFERENCE_INSTANCE = "ml.g5.12xlarge"
REFERENCE_COSTS = {
    "ppo_usd_per_sample": 0.0079,
    "reward_usd_per_1k_tokens": 0.015,  # reported as an upper bound ("< $0.015")
    "ppo_usd_per_1k_tokens": 0.0039,  # reported as an upper bound ("< $0.0039")
}


@dataclass(frozen=True)
class ModelDims:
    """The architecture numbers the estimate needs (Llama-style decoder)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder block."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, (
            self.intermediate_size
        )
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.num_layers * sum(n_in * n_out for n_in, n_out in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    @property
    def total_params(self) -> int:
        return self.linear_params + self.embedding_params + self.lm_head_params + self.norm_params

    def lora_params(self, rank: int, target_modules: str | list[str]) -> int:
        """LoRA A (r x in) + B (out x r) on every targeted linear layer of every block."""
        shapes = self.linear_shapes()
        targets = LINEAR_MODULES if target_modules == "all-linear" else [
            name for name in shapes if name in target_modules
        ]
        per_block = self.num_layers * sum(rank * (shapes[name][0] + shapes[name][1]) for name in targets)
        # peft's "all-linear" leaves the output layer out; naming lm_head puts LoRA on it too.
        on_lm_head = target_modules != "all-linear" and "lm_head" in target_modules
        return per_block + (rank * (self.hidden_size + self.vocab_size) if on_lm_head else 0)


# Architectures of hub models the bundled recipes use, so the estimate works offline.
KNOWN_MODEL_DIMS = {
    "meta-llama/Llama-3.1-8B-Instruct": ModelDims(128256, 4096, 14336, 32, 32, 8, 128),
    "meta-llama/Meta-Llama-3.1-8B-Instruct": ModelDims(128256, 4096, 14336, 32, 32, 8, 128),
    "meta-llama/Llama-3.1-8B": ModelDims(128256, 4096, 14336, 32, 32, 8, 128),
    "meta-llama/Llama-3.2-1B-Instruct": ModelDims(128256, 2048, 8192, 16, 32, 8, 64, tie_word_embeddings=True),
    "meta-llama/Llama-3.2-3B-Instruct": ModelDims(128256, 3072, 8192, 28, 24, 8, 128, tie_word_embeddings=True),
}
# Sizes of the public splits the bundled recipes use (for the cost projection only).
KNOWN_SPLIT_SIZES = {
    ("rajpurkar/squad", "train"): 87599,
    ("rajpurkar/squad", "validation"): 10570,
    ("Anthropic/hh-rlhf", "helpful-base", "train"): 43835,
    ("Anthropic/hh-rlhf", "helpful-base", "test"): 2354,
}


def model_dims(recipe: Recipe) -> ModelDims | None:
    """The base model's architecture: builtin configs, the table above, or a config found locally."""
    model = recipe.model
    if model.is_builtin:
        from .testing import tiny_llama_config

        return dims_from_config(tiny_llama_config(model.builtin_size))
    if model.name_or_path in KNOWN_MODEL_DIMS:
        return KNOWN_MODEL_DIMS[model.name_or_path]
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model.name_or_path, revision=model.revision, local_files_only=True,
                                            trust_remote_code=model.trust_remote_code)
    except Exception:  # noqa: BLE001 - not cached locally, or not a transformers model: no estimate
        return None
    return dims_from_config(config)


def dims_from_config(config: Any) -> ModelDims:
    heads = config.num_attention_heads
    return ModelDims(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, int]  # bytes per device, by component (the rows of the module docstring's table)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def _dtype_bytes(name: str) -> int:
    return DTYPE_BYTES.get(name, 2)  # "auto": hub checkpoints of this size are 16-bit


def estimate_memory(recipe: Recipe, dims: ModelDims, on_gpu: bool = True) -> MemoryEstimate:
    """Peak memory per device of the PPO stage (the largest stage), by component."""
    ppo, quant = recipe.ppo, recipe.quantization
    compute = quant.bnb_4bit_compute_dtype if quant.load_in_4bit else recipe.model.dtype
    activation_bytes = _dtype_bytes(compute)
    if getattr(ppo, "bf16", False) or getattr(ppo, "fp16", False):
        activation_bytes = 2
    if quant.load_in_4bit:
        bits = NF4_BITS_DOUBLE_QUANT if quant.bnb_4bit_use_double_quant else NF4_BITS
        unquantized = dims.embedding_params + dims.lm_head_params + dims.norm_params
        base = dims.linear_params * bits / 8 + unquantized * 4  # upcast to float32 for k-bit training
    else:
        base = dims.total_params * _dtype_bytes(recipe.model.dtype)
    policy = dims.lora_params(ppo.lora_r, ppo.lora_target_modules) + dims.hidden_size + 1
    reward = dims.lora_params(recipe.reward.lora_r, recipe.reward.lora_target_modules) + dims.hidden_size
    length = recipe.data.prompts.max_prompt_length + ppo.max_new_tokens
    tokens = ppo.mini_batch_size * length
    layer_activations = 34 * tokens * dims.hidden_size * activation_bytes / 2
    if getattr(ppo, "activation_checkpointing", False) or getattr(ppo, "gradient_checkpointing", False):
        activations = dims.num_layers * tokens * dims.hidden_size * activation_bytes + layer_activations
    else:
        activations = dims.num_layers * layer_activations
    logits = ppo.mini_batch_size * (ppo.max_new_tokens + 1) * dims.vocab_size * 4 * 3
    kv_cache = ppo.batch_size * length * dims.num_layers * 2 * dims.num_kv_heads * dims.head_dim * activation_bytes
    parts = {
        "base weights": int(base),
        "policy LoRA + value head (+ grads, Adam)": int(policy * ADAM_BYTES_PER_TRAINABLE_PARAM),
        "reward LoRA + score head": int(reward * FROZEN_ADAPTER_BYTES_PER_PARAM),
        "activations (training mini-batch)": int(activations),
        "logits (training mini-batch)": int(logits),
        "KV cache (generation batch)": int(kv_cache),
    }
    if on_gpu:
        parts["runtime overhead"] = GPU_RUNTIME_OVERHEAD_BYTES
    return MemoryEstimate(parts)


@dataclass(frozen=True)
class CostProjection:
    ppo_samples: int | None  # prompts PPO will process in total (all processes), when known
    usd_per_hour: float | None
    reference_usd: float | None  # ppo_samples at the seed article's cost per sample, when the instance matches


def project_cost(recipe: Recipe, num_processes: int) -> CostProjection:
    ppo = recipe.ppo
    per_iteration = ppo.batch_size * num_processes
    samples = None
    if ppo.max_steps and ppo.max_steps > 0:
        samples = ppo.max_steps * per_iteration
    else:
        prompts = recipe.data.prompts
        size = prompts.max_train_samples or KNOWN_SPLIT_SIZES.get((prompts.path, prompts.train_split))
        if size is not None:
            samples = int(size * ppo.num_train_epochs) // per_iteration * per_iteration
    reference = None
    if samples is not None and recipe.instance.name == REFERENCE_INSTANCE:
        reference = samples * REFERENCE_COSTS["ppo_usd_per_sample"]
    return CostProjection(samples, recipe.instance.price_per_hour, reference)


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    launch: Any  # launch.LaunchConfig or None (one process)
    num_processes: int
    dims: ModelDims | None
    memory: MemoryEstimate | None
    cost: CostProjection

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": list(self.recipe.stages),
            "output_dir": self.recipe.output_dir,
            "instance": dataclasses.asdict(self.recipe.instance),
            "num_processes": self.num_processes,
            "accelerate_config": None if self.launch is None else {
                "path": str(self.launch.path), **self.launch.content},
            "model_parameters": None if self.dims is None else self.dims.total_params,
            "memory_per_device_bytes": None if self.memory is None else {
                **self.memory.parts, "total": self.memory.total},
            "cost": dataclasses.asdict(self.cost),
        }


def make_plan(recipe: Recipe, accelerate_config: str | None = None) -> Plan:
    """The plan for the recipe's own instance (not this machine)."""
    from .launch import read_accelerate_config

    name = accelerate_config or recipe.instance.accelerate_config
    launch = read_accelerate_config(name) if name else None
    num_processes = launch.num_processes if launch else 1
    dims = model_dims(recipe)
    on_gpu = recipe.instance.num_gpus > 0
    memory = estimate_memory(recipe, dims, on_gpu=on_gpu) if dims else None
    return Plan(recipe, launch, num_processes, dims, memory, project_cost(recipe, num_processes))


def format_plan(plan: Plan) -> str:
    recipe, lines = plan.recipe, []
    instance = recipe.instance
    gpus = f"{instance.num_gpus} x {instance.gpu_type or 'GPU'}" if instance.num_gpus else "CPU only"
    lines.append(f"Recipe: {recipe.source or '<in memory>'}")
    lines.append(f"Instance: {instance.name} ({gpus}"
                 + (f", {instance.gpu_memory_gib:g} GiB each" if instance.gpu_memory_gib else "") + ")")
    lines.append(f"Output folder: {recipe.output_dir}")
    lines.append(f"Stages: {' -> '.join(recipe.stages)} -> report")
    lines.append(f"Processes: {plan.num_processes}")
    if plan.launch is None:
        lines.append("Accelerate config: none (one process)")
    else:
        lines.append(f"Accelerate config: {plan.launch.describe()}  [{plan.launch.path}]")
        for key, value in plan.launch.content.items():
            lines.append(f"    {key}: {value}")
    ppo = recipe.ppo
    lines.append(
        f"PPO: batch_size {ppo.batch_size} x {plan.num_processes} processes = "
        f"{ppo.batch_size * plan.num_processes} prompts per iteration; mini_batch_size {ppo.mini_batch_size}, "
        f"gradient_accumulation_steps {ppo.gradient_accumulation_steps} -> "
        f"{ppo.batch_size // (ppo.mini_batch_size * ppo.gradient_accumulation_steps)} optimizer steps per "
        f"epoch, {ppo.ppo_epochs} PPO epochs"
    )
    lines.extend(_memory_lines(plan))
    lines.extend(_cost_lines(plan))
    return "\n".join(lines)


def _memory_lines(plan: Plan) -> list[str]:
    if plan.dims is None:
        return ["Memory estimate: unknown architecture (model config not available offline)."]
    lines = [f"Model: {plan.recipe.model.name_or_path}, {plan.dims.total_params / 1e9:.2f}B parameters"]
    device = "GPU" if plan.recipe.instance.num_gpus else "process"
    lines.append(f"Estimated peak memory per {device} (PPO stage; formula in docs/recipes.md):")
    for name, size in plan.memory.parts.items():
        lines.append(f"    {name:<44} {size / GIB:8.2f} GiB")
    lines.append(f"    {'total':<44} {plan.memory.total / GIB:8.2f} GiB")
    capacity = plan.recipe.instance.gpu_memory_gib
    if capacity:
        verdict = "fits" if plan.memory.total <= capacity * GIB else "DOES NOT FIT"
        lines.append(f"    {verdict} in {capacity:g} GiB per GPU")
    return lines


def _cost_lines(plan: Plan) -> list[str]:
    cost, instance = plan.cost, plan.recipe.instance
    if cost.usd_per_hour is None:
        return ["Cost: no instance.price_per_hour in the recipe."]
    lines = [f"Cost: {instance.name} at ${cost.usd_per_hour:.2f}/h"
             + (f" (${cost.usd_per_hour / instance.num_gpus:.2f} per GPU-hour)" if instance.num_gpus else "")]
    if cost.ppo_samples is not None:
        lines.append(f"    PPO prompts to process: {cost.ppo_samples:,}")
    if cost.reference_usd is not None:
        lines.append(
            f"    projection at the seed article's ${REFERENCE_COSTS['ppo_usd_per_sample']}/sample "
            f"(same instance): ~${cost.reference_usd:,.0f} for PPO "
            f"(~{cost.reference_usd / cost.usd_per_hour:,.1f} h)"
        )
    lines.append("    the run report measures samples/s, tokens/s, $/sample and $/1k tokens per stage.")
    return lines


__all__ = ["DEFAULT_STAGES", "KNOWN_MODEL_DIMS", "ModelDims", "Plan", "estimate_memory", "format_plan", "make_plan"]
