"""benchmarks/: the report math against independent computations, the memory probe against known
allocations, and ``benchmarks/run.py --quick`` end to end with every ratio recomputed from the
stored per-round numbers.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
TRL_VENV_PYTHON = BENCHMARKS / ".venv-trl-0.11.4" / "bin" / "python"
MIB = 1024 * 1024


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load("_report")
protocol = _load("_protocol")


# ----------------------------------------------------------------------------------------------- report math


@settings(max_examples=60, deadline=None)
@given(
    xs=st.lists(st.integers(1, 200), min_size=3, max_size=8, unique=True),
    data=st.data(),
)
def test_linear_fit_matches_numpy_least_squares(xs, data):
    ys = data.draw(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=len(xs), max_size=len(xs)))
    fit = report.linear_fit(xs, ys)
    slope, intercept = np.polyfit(np.array(xs, float), np.array(ys, float), 1)
    residual = np.array(ys) - (intercept + slope * np.array(xs))
    total = np.array(ys) - np.mean(ys)
    assert fit["slope"] == pytest.approx(slope, rel=1e-6, abs=1e-6)
    assert fit["intercept"] == pytest.approx(intercept, rel=1e-6, abs=1e-4)
    if np.sum(total**2) > 1e-6:
        assert fit["r2"] == pytest.approx(1 - np.sum(residual**2) / np.sum(total**2), abs=1e-6)


def test_linear_fit_of_an_exact_line_and_of_a_bent_curve():
    line = report.linear_fit([4, 8, 16], [1.0 + 0.5 * x for x in (4, 8, 16)])
    assert (line["slope"], line["intercept"], line["r2"]) == pytest.approx((0.5, 1.0, 1.0))
    # y = x^2 at 1, 2, 3: slope 4, intercept -10/3, SS_res = 2/3, SS_tot = 98/3 -> R^2 = 48/49
    bent = report.linear_fit([1, 2, 3], [1.0, 4.0, 9.0])
    assert (bent["slope"], bent["intercept"], bent["r2"]) == pytest.approx((4.0, -10 / 3, 48 / 49))
    with pytest.raises(ValueError, match="x are equal"):
        report.linear_fit([2, 2], [1.0, 3.0])


def test_speed_ratio_is_the_median_of_paired_rounds_and_the_headline_the_worst_mini_batch():
    speed = {
        "mini_batches": [1, 8],
        "systems": {
            "trl_0_11_4/mb1": {"seconds": [12.0, 8.0, 12.0]},
            "ours_fp32/mb1": {"seconds": [8.0, 8.0, 6.0], "switch_s": [0.08, 0.04, 0.06]},
            "trl_0_11_4/mb8": {"seconds": [8.0, 6.0, 9.0]},
            "ours_fp32/mb8": {"seconds": [5.0, 5.0, 6.0], "switch_s": [0.01, 0.01, 0.03]},
        },
    }
    summary = report.summarise_speed(speed, "trl_0_11_4")
    # mb1: ratios 1.5, 1.0, 2.0 -> 1.5; mb8: 1.6, 1.2, 1.5 -> 1.5 (the median of per-round ratios,
    # not the ratio of medians 12/8 = 1.5 and 8/5 = 1.6)
    assert summary["ratios"]["mb1"]["fp32"]["median"] == pytest.approx(1.5)
    assert summary["ratios"]["mb8"]["fp32"]["median"] == pytest.approx(1.5)
    assert report.worst_ratio(summary["ratios"], "fp32") == pytest.approx(1.5)
    # switch fraction: mb1 0.01, 0.005, 0.01 -> 0.01; mb8 0.002, 0.002, 0.005 -> 0.002; worst 0.01
    assert report.switch_fraction(summary)["worst"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="unpaired"):
        report.paired_ratios([1.0, 2.0], [1.0])


@pytest.mark.parametrize(
    ("name", "value", "met"),
    [
        ("speed_ratio_vs_trl_0_11_4", 1.3, True),
        ("speed_ratio_vs_trl_0_11_4", 1.2999, False),
        ("memory_ratio_vs_separate", 0.35, True),
        ("memory_ratio_vs_separate", 0.3501, False),
        ("switch_fraction", 0.01, False),
        ("switch_fraction", 0.0099, True),
        ("scaling_r2_min", None, None),
    ],
)
def test_targets_at_their_bounds(name, value, met):
    assert report.target_met(name, value) is met


# ----------------------------------------------------------------------------------------------- memory probe


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_probe_sees_known_allocations():
    torch = pytest.importorskip("torch")

    def build():
        return torch.ones(64 * MIB // 4)  # 64 MiB, every page touched

    def run(resident):
        transient = torch.ones(32 * MIB // 4)  # +32 MiB on top of the resident 64 MiB, then freed
        del transient

    result = protocol.measure_peak(build, run)
    assert 60 <= result["resident_after_build"] <= 72
    assert 92 <= result["peak_rss_above_baseline"] <= 110
    assert result["build_peak_above_baseline"] >= 60
    assert abs(result["rss_file_delta"]) < 16  # nothing memory-mapped


# ----------------------------------------------------------------------------------------------- quick run


def _run_benchmark(tmp_path: Path, *flags: str) -> dict:
    output_dir = tmp_path / "results"
    command = [sys.executable, str(BENCHMARKS / "run.py"), "--quick", "--threads", "1", "--output-dir", str(output_dir),
               "--workdir", str(tmp_path / "work"), *flags]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert not (output_dir / "latest.json").exists(), "only a complete full run may write latest.json"
    return json.loads((output_dir / "quick.json").read_text())


def _recomputed_speed_ratio(speed: dict, baseline: str, variant: str) -> float:
    per_mini_batch = []
    for mini_batch in speed["mini_batches"]:
        base = speed["systems"][f"{baseline}/mb{mini_batch}"]["seconds"]
        ours = speed["systems"][f"ours_{variant}/mb{mini_batch}"]["seconds"]
        per_mini_batch.append(statistics.median(b / o for b, o in zip(base, ours)))
    return min(per_mini_batch)


def _assert_positive_finite(value):
    assert isinstance(value, float) and math.isfinite(value) and value > 0, value


@pytest.mark.slow
def test_quick_run_writes_ratios_recomputable_from_its_stored_numbers(tmp_path):
    results = _run_benchmark(tmp_path)

    for key in ("memory_ratio_vs_separate", "speed_ratio_vs_trl_0_11_4", "speed_ratio_vs_trl_0_11_4_bf16",
                "switch_fraction", "scaling", "scaling_r2_min", "speed_ratio_vs_separate", "parity", "targets"):
        assert key in results, key
    # --quick has no TRL venv: its speed baseline is the four-copies PPO, and the TRL ratios stay empty.
    assert results["speed_ratio_vs_trl_0_11_4"] is None and results["speed_ratio_vs_trl_0_11_4_bf16"] is None
    for key in ("memory_ratio_vs_separate", "switch_fraction", "speed_ratio_vs_separate", "speed_ratio_vs_separate_bf16"):
        _assert_positive_finite(results[key])

    speed = results["speed"]
    assert speed["rounds"] == 2 and all(len(r["seconds"]) == 2 for r in speed["systems"].values())
    for variant, key in (("fp32", "speed_ratio_vs_separate"), ("bf16", "speed_ratio_vs_separate_bf16")):
        assert results[key] == pytest.approx(_recomputed_speed_ratio(speed, "separate_copies", variant), rel=1e-12)

    pair = results["memory"]["mb1"]
    for system in ("multi_adapter", "separate_copies"):
        _assert_positive_finite(pair[system]["peak_rss_above_baseline"])
    assert results["memory_ratio_vs_separate"] == pytest.approx(
        pair["multi_adapter"]["peak_rss_above_baseline"] / pair["separate_copies"]["peak_rss_above_baseline"], rel=1e-12)

    fractions = [statistics.median(s / t for s, t in zip(record["switch_s"], record["seconds"]))
                 for record in speed["systems"].values() if "switch_s" in record]
    assert len(fractions) == 2 * len(speed["mini_batches"])  # ours fp32 and bf16 at each mini-batch
    assert results["switch_fraction"] == pytest.approx(max(fractions), rel=1e-12)

    r2_values = []
    for sweep in results["scaling"]["sweeps"].values():
        x = np.array(sweep["x"], float)
        y = np.array([statistics.median(seconds) for seconds in sweep["seconds"]])
        slope, intercept = np.polyfit(x, y, 1)
        r2 = 1 - np.sum((y - intercept - slope * x) ** 2) / np.sum((y - y.mean()) ** 2)
        assert sweep["fit"]["slope"] == pytest.approx(slope, rel=1e-6)
        assert sweep["fit"]["r2"] == pytest.approx(r2, abs=1e-9)
        r2_values.append(r2)
    assert results["scaling_r2_min"] == pytest.approx(min(r2_values), abs=1e-9)
    assert len(results["scaling"]["sweeps"]["batch_size"]["x"]) == 3

    parity = results["parity"]
    assert parity["passed"] and parity["reference"] == "plain_transformers"
    for key in parity["required_pairs"]:
        assert all(parity["pairs"][key][quantity] <= parity["tolerance"] for quantity in parity["required"])

    # every rollout's first PPO ratio is 1: the policy that sampled is the policy that is scored
    for name, record in speed["systems"].items():
        if name.startswith("ours_fp32"):
            assert record["first_ratio"] == pytest.approx([1.0] * len(record["first_ratio"]), abs=1e-5)

    table = (tmp_path / "results" / "quick.md").read_text()
    assert "| metric | measured | target | met |" in table and "Parity passed" in table
    assert (tmp_path / "results" / "quick.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.skipif(not TRL_VENV_PYTHON.exists(), reason="TRL 0.11.4 venv not created (python benchmarks/run.py makes it)")
def test_quick_run_against_trl_0_11_4_passes_parity(tmp_path):
    results = _run_benchmark(tmp_path, "--baseline", "trl_0_11_4", "--skip", "memory", "scaling",
                             "--rounds", "1", "--warmup", "0")
    parity = results["parity"]
    assert parity["passed"] and parity["reference"] == "trl_0_11_4", parity
    assert set(parity["required_pairs"]) == {f"ours_fp32/mb1 vs trl_0_11_4/mb{mb}" for mb in (1, 4)}
    assert results["speed_ratio_vs_trl_0_11_4"] == pytest.approx(
        _recomputed_speed_ratio(results["speed"], "trl_0_11_4", "fp32"), rel=1e-12)


def test_report_renders_the_estimator_and_shared_prompt_comparisons_run_py_adds():
    """run.py --also estimators shared_prompt: the markdown shows each system's numbers and the ratios the
    scripts computed, row by row (ratios recomputed here from the seconds and memory they stored)."""
    systems = {"gae": {"s_per_iteration": 4.0, "peak_rss_above_baseline": 400.0},
               "rloo": {"s_per_iteration": 3.0, "peak_rss_above_baseline": 380.0}}
    estimators = {"settings": {"size": "small", "batch": 8, "k": 4, "new_tokens": 32, "ppo_epochs": 4, "mini_batch": 4},
                  "systems": systems,
                  "ratios_vs_gae": {name: {"s_per_iteration": row["s_per_iteration"] / 4.0,
                                           "peak_memory": row["peak_rss_above_baseline"] / 400.0}
                                    for name, row in systems.items()}}
    seconds = {"unshared": {"sampling": 6.0, "iteration": 24.0}, "shared": {"sampling": 3.0, "iteration": 8.0}}
    shared = {"rounds": [{}, {}, {}], "seconds": seconds, "speedup": {"sampling": 2.0, "iteration": 3.0}}
    lines = report._estimators_table(estimators) + report._shared_prompt_table(shared)
    assert "| rloo | 3.00 | 0.750 | 380 | 0.950 |" in lines and "| gae | 4.00 | 1.000 | 400 | 1.000 |" in lines
    assert "| iteration | 24.00 | 8.00 | 3.00x |" in lines and "| sampling | 6.00 | 3.00 | 2.00x |" in lines
    assert report._estimators_table(None) == [] and report._shared_prompt_table(None) == []
