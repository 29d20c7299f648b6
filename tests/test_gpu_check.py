"""benchmarks/gpu_check.py (issue 16) in CPU mode, so the GPU check never rots.

The script runs end to end in a subprocess (``--device cpu --size tiny``); its JSON must be complete and
internally consistent, its plan estimate must be the ``--dry_run`` one for the same shapes (recomputed
here from the recipe, and two parts by hand), and its pure cost and projection math must match
hand-computed cases. Check 1's dequantization path, which only runs in earnest on a GPU, is checked on a
4-bit CPU model (inference only, which the library allows) against bitsandbytes' own forward.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
CHECKS = ("lora_gradients", "ppo_iterations", "nccl", "projection")
PHASES = ("generation", "score", "old_logprobs", "reference", "optimisation")


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return load_gpu_check()


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--size", "tiny", "--output-dir", str(root / "out"),
               "--work-dir", str(root / "work")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=root)
    json_path = root / "out" / "gpu_cpu_tiny.json"
    data = json.loads(json_path.read_text()) if json_path.is_file() else None
    return SimpleNamespace(completed=completed, data=data, root=root, md=root / "out" / "gpu_cpu_tiny.md")


def measured_arm(cpu_run) -> dict:
    return cpu_run.data["checks"]["ppo_iterations"]["arms"]["bf16"]


# ------------------------------------------------------------------------------------------------ the CPU run


def test_cpu_mode_runs_every_check_and_says_what_it_skipped(cpu_run):
    completed, data = cpu_run.completed, cpu_run.data
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert data["schema"] == "trl-multiadapter/gpu_check/1" and data["status"] == "complete"
    checks = data["checks"]
    assert set(CHECKS) <= set(checks)
    statuses = {name: checks[name]["status"] for name in CHECKS}
    assert statuses == {"lora_gradients": "skipped", "ppo_iterations": "measured", "nccl": "skipped",
                        "projection": "projection"}
    nf4 = checks["ppo_iterations"]["arms"]["nf4"]
    assert nf4["status"] == "skipped" and "CPU" in nf4["reason"] and "gradients" in nf4["reason"]
    assert "bitsandbytes" in checks["lora_gradients"]["summary"]
    assert "2 CUDA GPUs" in checks["nccl"]["summary"]
    assert "PROJECTION" in checks["projection"]["summary"]
    # one printed line per check (and per arm), the same lines in the JSON and the markdown
    stdout = completed.stdout.splitlines()
    for prefix in ("lora_gradients: skipped", "ppo_iterations[nf4]: skipped", "ppo_iterations[bf16]:", "nccl: skipped",
                   "projection to ml.g5.12xlarge"):
        assert any(line.startswith(prefix) for line in stdout), prefix
    assert all(line in stdout for line in data["lines"])
    markdown = cpu_run.md.read_text()
    assert "| ppo_iterations | measured |" in markdown and "PROJECTION (not a measurement)" in markdown
    assert data["env"]["device"] == "cpu" and data["config"]["size"] == "tiny"
    assert [part["part"] for part in data["timeline"]][:2] == ["ceilings", "setup"]


def test_gradient_check_code_path_runs_on_the_cpu_stand_in(cpu_run):
    """On CPU check 1 runs on the bf16 base: it is no 4-bit verdict, but it proves the reference copy is
    right (a wrong weight or adapter copy would give errors far above the bf16 rounding floor)."""
    stand_in = cpu_run.data["checks"]["lora_gradients"]["stand_in"]
    assert stand_in["arm"] == "bf16" and stand_in["bound"] == 0.05
    tensors = stand_in["after_no_grad_vs_reference"]["tensors"]
    assert tensors == 2 * 7 * 2 + 2  # LoRA A and B on 7 linears x 2 layers, value head weight + bias
    assert stand_in["after_vs_before_no_grad"]["max"] == 0.0  # deterministic CPU: no-grad passes change nothing
    for key in ("after_no_grad_vs_reference", "after_no_grad_vs_fp32_reference", "bf16_autocast_floor"):
        assert 0.0 < stand_in[key]["max"] < stand_in["bound"], key
    assert stand_in["passed"] is True and stand_in["max_error"] == stand_in["after_no_grad_vs_reference"]["max"]


def test_phase_split_adds_up_to_the_iteration(cpu_run):
    arm = measured_arm(cpu_run)
    shapes = arm["shapes"]
    records = arm["iterations"]
    assert arm["timed_iterations"] == len(records) == 2 and arm["warmup_iterations"] == 1
    # the hook that CUDA-synchronises phases on a GPU was found (else a GPU run would time phases unsynchronised)
    assert arm["phase_timers_instrumented"] is True and arm["phase_timing"] == "host clock"
    for record in records:
        seconds = record["seconds"]
        assert all(seconds[name] >= 0 for name in PHASES)
        split = sum(seconds[name] for name in PHASES)
        assert split <= seconds["iteration"] <= seconds["wall"] + 1e-6
        assert seconds["other"] == pytest.approx(seconds["iteration"] - split, abs=1e-9)
        inner = sum(seconds[f"optimisation/{name}"] for name in ("forward", "backward", "step"))
        assert inner <= seconds["optimisation"]
        metrics = record["metrics"]
        assert all(math.isfinite(value) for value in metrics.values())
        expected_steps = shapes["ppo_epochs"] * shapes["batch_size"] // (
            shapes["mini_batch_size"] * shapes["gradient_accumulation_steps"])
        assert metrics["policy/optimizer_steps"] == expected_steps == 4
        assert metrics["policy/first_ratio"] == pytest.approx(1.0, abs=0.05)
    mean = arm["seconds"]
    for name in (*PHASES, "iteration", "other"):
        assert mean[name] == pytest.approx(sum(r["seconds"][name] for r in records) / len(records))
    assert sum(mean[name] for name in PHASES) <= mean["iteration"] + 1e-9
    batch, new_tokens = shapes["batch_size"], shapes["new_tokens"]
    prompt_tokens = sum(r["mean_prompt_tokens"] for r in records) / len(records)
    assert 240 <= prompt_tokens <= shapes["prompt_length"] == 256
    assert arm["tokens_per_s"]["generated"] == pytest.approx(batch * new_tokens / mean["generation"])
    assert arm["tokens_per_s"]["processed"] == pytest.approx(batch * (prompt_tokens + new_tokens) / mean["iteration"])
    assert arm["samples_per_s"] == pytest.approx(batch / mean["iteration"])


def test_memory_is_measured_and_the_loaded_weights_match_the_plan(cpu_run):
    arm = measured_arm(cpu_run)
    memory, plan = arm["memory"], arm["plan"]
    assert memory["peak_rss_bytes"] > memory["parameter_bytes"] > 0
    assert memory["peak_allocated_bytes"] is None and memory["fits_a10g"] is None  # CUDA-only numbers
    # bf16 base: every base parameter in 2 bytes; LoRA adapters, value head and score head in float32
    dims = plan["dims"]
    hidden = dims["hidden_size"]
    base = plan["model_parameters"] * 2
    adapters = (arm["shapes"]["policy_lora_params"] + hidden + 1 + arm["shapes"]["reward_lora_params"] + hidden) * 4
    assert memory["parameter_bytes"] == base + adapters == plan["weights_bytes"]


def test_plan_estimate_is_the_dry_run_estimate_for_the_same_shapes(cpu_run):
    from trl_multiadapter import plan
    from trl_multiadapter.recipe import load

    arm = measured_arm(cpu_run)
    model_dir = cpu_run.root / "work" / "tiny"
    recipe = load("hh_squad", ["data.prompts.max_prompt_length=256", f"model.name_or_path={model_dir}",
                               "quantization.load_in_4bit=false"])
    expected = plan.make_plan(recipe).to_dict()["memory_per_device_bytes"]
    assert arm["plan"]["total_bytes"] == expected["total"]
    assert arm["plan"]["parts_bytes"] == {k: v for k, v in expected.items() if k != "total"}
    assert arm["plan"]["num_processes"] == 4  # the recipe's g5_12xlarge launch config
    # two parts by hand: bf16 KV cache of the generation batch, fp32 logits (+ log-softmax, grad) of a mini-batch
    dims, shapes = arm["plan"]["dims"], arm["shapes"]
    length = 256 + shapes["new_tokens"]
    kv = shapes["batch_size"] * length * dims["num_layers"] * 2 * dims["num_kv_heads"] * dims["head_dim"] * 2
    logits = shapes["mini_batch_size"] * (shapes["new_tokens"] + 1) * dims["vocab_size"] * 4 * 3
    assert arm["plan"]["parts_bytes"]["KV cache (generation batch)"] == kv
    assert arm["plan"]["parts_bytes"]["logits (training mini-batch)"] == logits


def test_projection_is_consistent_with_its_inputs(cpu_run):
    projection = cpu_run.data["checks"]["projection"]
    arm = measured_arm(cpu_run)
    result = projection["arms"]["bf16"]
    assert projection["label"].startswith("PROJECTION") and projection["seed_usd_per_sample"] == 0.0079
    assert projection["samples_per_iteration"] == arm["shapes"]["batch_size"] * projection["processes"] == 16
    for suffix in ("", "_additive"):
        iteration = result[f"iteration_s{suffix}"]
        phases = sum(p[f"projected_a10g{suffix}_s"] for p in result["phases"].values())
        assert iteration == pytest.approx(phases + result["other_s"] + result["allreduce_s"])
        assert result[f"seconds_per_100_samples{suffix}"] == pytest.approx(100 / 16 * iteration)
        assert result[f"usd_per_sample{suffix}"] == pytest.approx(iteration * 7.09 / 3600 / 16)
    for name, phase in result["phases"].items():
        assert phase["measured_s"] == pytest.approx(arm["seconds"][name])
        assert phase["flops"] == arm["costs"][name]["flops"] and phase["bytes"] == arm["costs"][name]["bytes"]
    assert result["iteration_s_range"] == sorted([result["iteration_s"], result["iteration_s_additive"]])


# ------------------------------------------------------------------------------------------------ pure math


def test_phase_costs_of_a_hand_computed_model(gpu_check):
    """hidden 4, one layer, 2 heads of 2 with one KV head, FFN 8, vocab 10: linear weights q 16, k 8,
    v 8, o 16, gate 32, up 32, down 32 = 144; LM head 40."""
    from trl_multiadapter.plan import ModelDims

    dims = ModelDims(vocab_size=10, hidden_size=4, intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                     head_dim=2)
    assert dims.linear_params == 144
    shapes = gpu_check.IterationShapes(batch_size=1, mini_batch_size=1, gradient_accumulation_steps=1, ppo_epochs=1,
                                       prompt_length=1, new_tokens=1, policy_lora_params=0, reward_lora_params=0,
                                       activation_checkpointing=False)
    costs = gpu_check.phase_costs(dims, shapes, quantized=False, nf4_bits=4.0)
    # generation = one prefill token: 2*144 + 2*40 (head) + attention 4 * 1 layer * q_dim 4 * 1 position
    assert costs["generation"].flops == 2 * 144 + 2 * 40 + 16
    assert costs["generation"].bytes == 2 * 144 + 2 * 40  # every bf16 weight read once
    # reference: 2 tokens, head on the last one; attention over 1 + 2 positions
    assert costs["reference"].flops == 2 * 144 * 2 + 2 * 40 + 4 * 4 * 3
    # score: no LM head
    assert costs["score"].flops == 2 * 144 * 2 + 4 * 4 * 3 and costs["score"].bytes == 2 * 144
    # NF4 with 4 bits: read 0.5 byte, write and read 2 bf16 bytes per weight; float32 head under autocast 8
    assert gpu_check.phase_costs(dims, shapes, quantized=True, nf4_bits=4.0)["score"].bytes == 4.5 * 144
    assert gpu_check.phase_costs(dims, shapes, quantized=True, nf4_bits=4.0)["reference"].bytes == 4.5 * 144 + 8 * 40


def test_phase_costs_scale_with_the_batch(gpu_check):
    from trl_multiadapter.plan import KNOWN_MODEL_DIMS

    dims = KNOWN_MODEL_DIMS["meta-llama/Llama-3.1-8B-Instruct"]
    common = dict(mini_batch_size=1, gradient_accumulation_steps=4, ppo_epochs=4, prompt_length=256, new_tokens=32,
                  policy_lora_params=dims.lora_params(16, "all-linear"), reward_lora_params=0,
                  activation_checkpointing=True)
    four = gpu_check.phase_costs(dims, gpu_check.IterationShapes(batch_size=4, **common), True, 4.127)
    eight = gpu_check.phase_costs(dims, gpu_check.IterationShapes(batch_size=8, **common), True, 4.127)
    for name in ("generation", "score", "reference", "optimisation"):
        assert eight[name].flops == pytest.approx(2 * four[name].flops)
    assert eight["score"].bytes == four["score"].bytes  # one pass over the weights either way
    assert eight["optimisation"].bytes == pytest.approx(2 * four["optimisation"].bytes)  # twice the mini-batches
    # the optimisation of one iteration: 16 mini-batches of ~6 * parameters * tokens (forward, recompute, backward)
    tokens = 256 + 32
    assert four["optimisation"].flops == pytest.approx(16 * 6 * dims.linear_params * tokens, rel=0.15)


def test_projection_models_on_hand_computed_devices(gpu_check):
    cost = gpu_check.Cost(flops=100e12, bytes=10e9)  # compute-bound on both devices below
    device = {"bf16_flops": 1000e12, "bandwidth": 4e12}
    slower = {"bf16_flops": 100e12, "bandwidth": 1e12}
    whole = {"compute": 1.0, "memory": 1.0}
    same = gpu_check.project_phase(0.5, cost, device, device, whole)
    assert same["projected_a10g_s"] == pytest.approx(0.5) and same["projected_a10g_additive_s"] == pytest.approx(0.5)
    moved = gpu_check.project_phase(0.5, cost, device, slower, whole)
    assert moved["roofline_device_s"] == pytest.approx(0.1) and moved["roofline_a10g_s"] == pytest.approx(1.0)
    assert moved["efficiency"] == pytest.approx(0.2)
    assert moved["projected_a10g_s"] == pytest.approx(5.0)  # 1.0 s of roofline at 20% efficiency
    assert moved["projected_a10g_additive_s"] == pytest.approx(0.5 - 0.1 + 1.0)  # 0.4 s overhead carried over
    assert moved["a10g_bound"] == "compute"
    half = gpu_check.project_phase(0.5, cost, device, slower, {"compute": 0.5, "memory": 0.5})
    assert half["projected_a10g_additive_s"] == pytest.approx(0.5 - 0.2 + 2.0)
    # ring all-reduce: 4 steps x (2 * 3/4 of 4 MB = 6 MB) at 1 GB/s
    assert gpu_check.allreduce_seconds(1_000_000, 4, 4, 1e9) == pytest.approx(0.024)
    assert gpu_check.allreduce_seconds(1_000_000, 4, 1, 1e9) == 0.0


def test_relative_error_and_published_figures(gpu_check):
    import torch

    assert gpu_check.relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert gpu_check.relative_error(torch.tensor([3.0, 5.0]), torch.tensor([3.0, 4.0])) == pytest.approx(0.2)
    assert gpu_check.relative_error(torch.tensor([1.0]), torch.tensor([0.0])) == math.inf
    assert gpu_check.published_figures("NVIDIA H200")[0] == "H200"
    assert gpu_check.published_figures("NVIDIA H200 NVL")[0] == "H200 NVL"
    assert gpu_check.published_figures("NVIDIA H100 PCIe")[0] == "H100 PCIe"
    assert gpu_check.published_figures("NVIDIA A10G")[1] == {"bf16_flops": 70e12, "bandwidth": 600e9}
    assert gpu_check.published_figures("Some Future GPU") is None


def test_sizes_are_the_llama_architectures(gpu_check):
    from trl_multiadapter.plan import KNOWN_MODEL_DIMS, dims_from_config

    assert dims_from_config(gpu_check.llama_config("8b", 1024)) == KNOWN_MODEL_DIMS["meta-llama/Llama-3.1-8B-Instruct"]
    assert dims_from_config(gpu_check.llama_config("1b", 1024)) == KNOWN_MODEL_DIMS["meta-llama/Llama-3.2-1B-Instruct"]
    config = gpu_check.llama_config("8b", 1024)
    assert config.rope_parameters["rope_theta"] == 500000.0 and config.rope_parameters["rope_type"] == "llama3"


def test_bad_arguments_are_one_line_errors():
    completed = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--arms", "fp8"], capture_output=True,
                               text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert completed.returncode == 2 and "--arms 'fp8'" in completed.stderr


# ------------------------------------------------------------------------------------------------ check 1 on 4-bit


def test_dequantized_reference_reproduces_the_4bit_model(gpu_check, tiny_model_dir):
    """Check 1's reference (effective_weight + dequantized_reference) on a real NF4 model, on CPU where
    bitsandbytes runs inference correctly: its logits equal the 4-bit model's own reference logits."""
    bnb = pytest.importorskip("bitsandbytes")
    import warnings

    import torch
    from transformers import AutoConfig, BitsAndBytesConfig

    from trl_multiadapter import MultiAdapterModel

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library's CPU k-bit training warning: inference only here
        model = MultiAdapterModel.from_pretrained(str(tiny_model_dir), quantization_config=quantization)
    causal_lm = model.peft_model.get_base_model()
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in causal_lm.modules()) == 2 * 7
    reference = gpu_check.dequantized_reference(model, AutoConfig.from_pretrained(tiny_model_dir), "cpu",
                                                torch.float32)
    ids = torch.randint(6, 1024, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.reference_logits(ids)
        got = reference(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=5e-3, rtol=0)
    # and the reference really holds dequantized weights, not the original float ones
    original = AutoConfig.from_pretrained(tiny_model_dir)
    assert original.num_hidden_layers == 2
    q_proj = reference.model.layers[0].self_attn.q_proj.weight
    assert len(torch.unique(q_proj[0, :64])) <= 16  # one NF4 block: at most 16 distinct codes times its scale


def test_importing_the_script_leaves_the_environment_alone():
    """The script's offline/verbosity variables are set by main(), not on import (an import in this test
    process used to leak TRANSFORMERS_VERBOSITY=error into later subprocesses and hide their progress)."""
    code = ("import os, sys; sys.path.insert(0, 'benchmarks'); before = dict(os.environ); import gpu_check; "
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
