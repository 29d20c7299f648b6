"""Turn raw benchmark measurements into ratios, fits, a markdown table and a PNG (pure functions + plotting).

Every headline number is computed here from the raw per-round times stored next to it in the JSON,
so anyone can recompute it from the file:

- speed ratio (per mini-batch): median over rounds of baseline_seconds[r] / ours_seconds[r]; rounds
  are paired because single-sequence passes on a shared CPU switch between speeds from one round to
  the next, and both systems of a round see the same state. The headline is the worst mini-batch.
- memory ratio: peak_rss_above_baseline(multi-adapter) / peak_rss_above_baseline(separate copies).
- switch fraction: median over rounds of switch_seconds[r] / seconds[r], worst of our systems.
- scaling: least-squares line through (x, median seconds) and its coefficient of determination R^2.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

TARGETS = {
    "speed_ratio_vs_trl_0_11_4": (">=", 1.3),
    "speed_ratio_vs_trl_0_11_4_bf16": (">=", 1.7),
    "memory_ratio_vs_separate": ("<=", 0.35),
    "switch_fraction": ("<", 0.01),
    "scaling_r2_min": (">=", 0.95),
}


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values: the phase recorded no rounds")
    return float(statistics.median(values))


def paired_ratios(baseline_seconds: Sequence[float], ours_seconds: Sequence[float]) -> list[float]:
    """baseline[r] / ours[r] for each round r (> 1: ours is faster)."""
    if len(baseline_seconds) != len(ours_seconds):
        raise ValueError(f"unpaired rounds: {len(baseline_seconds)} baseline vs {len(ours_seconds)} ours")
    return [base / ours for base, ours in zip(baseline_seconds, ours_seconds)]


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Ordinary least squares y = intercept + slope * x, with R^2 = 1 - SS_res / SS_tot."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"a line needs at least two (x, y) pairs, got {len(x)} x and {len(y)} y")
    mean_x, mean_y = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((xi - mean_x) ** 2 for xi in x)
    if sxx == 0:
        raise ValueError("all x are equal: no slope to fit")
    slope = sum((xi - mean_x) * (yi - mean_y) for xi, yi in zip(x, y)) / sxx
    intercept = mean_y - slope * mean_x
    ss_res = sum((yi - (intercept + slope * xi)) ** 2 for xi, yi in zip(x, y))
    ss_tot = sum((yi - mean_y) ** 2 for yi in y)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"slope": slope, "intercept": intercept, "r2": r2}


def target_met(name: str, value: float | None) -> bool | None:
    if value is None or name not in TARGETS:
        return None
    op, bound = TARGETS[name]
    return {">=": value >= bound, "<=": value <= bound, "<": value < bound}[op]


# --------------------------------------------------------------------------------------------- summaries


def summarise_speed(speed: dict, baseline: str) -> dict:
    """Per-system medians and per-mini-batch paired ratios of ours (fp32, bf16) against ``baseline``."""
    for record in speed["systems"].values():
        record["median_s"] = median(record["seconds"])
        for part in ("generate_s", "reward_s", "step_s", "switch_s"):
            if part in record:
                record[f"median_{part}"] = median(record[part])
        # the trainers' own timers (TRL's "time/ppo/*", ours "time/rollout/*", ...): where the time goes
        record["median_timers"] = {key: median(values) for key, values in record.items() if key.startswith("time/")}
    ratios = {}
    for mini_batch in speed["mini_batches"]:
        base = speed["systems"].get(f"{baseline}/mb{mini_batch}")
        if base is None:
            continue
        per_variant = {}
        for variant in ("fp32", "bf16"):
            ours = speed["systems"].get(f"ours_{variant}/mb{mini_batch}")
            if ours is not None:
                paired = paired_ratios(base["seconds"], ours["seconds"])
                per_variant[variant] = {"paired": paired, "median": median(paired)}
        ratios[f"mb{mini_batch}"] = per_variant
    speed["ratios"] = ratios
    speed["baseline"] = baseline
    return speed


def worst_ratio(ratios: dict, variant: str) -> float | None:
    values = [per_variant[variant]["median"] for per_variant in ratios.values() if variant in per_variant]
    return min(values) if values else None


def switch_fraction(speed: dict) -> dict:
    per_system = {}
    for name, record in speed["systems"].items():
        if "switch_s" in record:
            fractions = [switch / total for switch, total in zip(record["switch_s"], record["seconds"])]
            per_system[name] = median(fractions)
    return {"per_system": per_system, "worst": max(per_system.values()) if per_system else None}


def summarise_memory(memory: dict) -> dict:
    for key, pair in memory.items():
        ours, separate = pair["multi_adapter"], pair["separate_copies"]
        pair["ratio"] = ours["peak_rss_above_baseline"] / separate["peak_rss_above_baseline"]
        memory[key] = pair
    return memory


def summarise_scaling(scaling: dict) -> dict:
    for sweep in scaling["sweeps"].values():
        sweep["median_s"] = [median(seconds) for seconds in sweep["seconds"]]
        sweep["fit"] = linear_fit(sweep["x"], sweep["median_s"])
    r2_values = [sweep["fit"]["r2"] for sweep in scaling["sweeps"].values()]
    scaling["r2_min"] = min(r2_values) if r2_values else None
    return scaling


def headline(results: dict) -> dict:
    """The top-level keys of the JSON, computed from the summaries."""
    speed, memory, scaling = results.get("speed"), results.get("memory"), results.get("scaling")
    trl_baseline = speed is not None and speed.get("baseline") == "trl_0_11_4"
    values = {
        "speed_ratio_vs_trl_0_11_4": worst_ratio(speed["ratios"], "fp32") if trl_baseline else None,
        "speed_ratio_vs_trl_0_11_4_bf16": worst_ratio(speed["ratios"], "bf16") if trl_baseline else None,
        "speed_ratio_vs_separate": worst_ratio(speed["ratios"], "fp32") if speed and not trl_baseline else None,
        "speed_ratio_vs_separate_bf16": worst_ratio(speed["ratios"], "bf16") if speed and not trl_baseline else None,
        "memory_ratio_vs_separate": memory[f"mb{results['settings']['memory_mini_batch']}"]["ratio"] if memory else None,
        "switch_fraction": switch_fraction(speed)["worst"] if speed else None,
        "scaling_r2_min": scaling["r2_min"] if scaling else None,
    }
    values["targets"] = {name: {"target": f"{op} {bound}", "met": target_met(name, values[name])}
                         for name, (op, bound) in TARGETS.items()}
    return values


# --------------------------------------------------------------------------------------------- markdown


def _number(value, digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def render_markdown(summary: dict) -> str:
    lines = [f"Benchmark ({summary['mode']} run, {summary['created']}): `{summary['command']}`", ""]
    machine = summary["machine"]
    lines += [f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads; "
              f"torch {machine['torch']}. Model: {summary['settings']['model_description']}.", ""]
    lines += ["| metric | measured | target | met |", "|---|---|---|---|"]
    labels = {
        "speed_ratio_vs_trl_0_11_4": "speed vs TRL 0.11.4, fp32 (worst mini-batch)",
        "speed_ratio_vs_trl_0_11_4_bf16": "speed vs TRL 0.11.4, bf16 frozen base (worst mini-batch)",
        "memory_ratio_vs_separate": "peak memory vs four separate copies",
        "switch_fraction": "adapter switching / iteration time",
        "scaling_r2_min": "linear scaling R^2 (worst sweep)",
    }
    for name, label in labels.items():
        target = summary["targets"][name]
        met = {True: "yes", False: "**no**", None: "n/a"}[target["met"]]
        digits = 4 if name == "switch_fraction" else 3
        lines.append(f"| {label} | {_number(summary[name], digits)} | {target['target']} | {met} |")
    if summary.get("speed_ratio_vs_separate") is not None:
        lines.append(f"| speed vs separate copies, fp32 (quick run's baseline) | "
                     f"{_number(summary['speed_ratio_vs_separate'], 3)} | - | - |")
    lines += ["", *_speed_table(summary.get("speed")), *_memory_table(summary.get("memory")),
              *_scaling_table(summary.get("scaling")), *_parity_lines(summary.get("parity")),
              *_estimators_table(summary.get("estimators")), *_shared_prompt_table(summary.get("shared_prompt"))]
    return "\n".join(lines) + "\n"


def _estimators_table(estimators: dict | None) -> list[str]:
    """benchmarks/estimators.py's systems (run.py --also estimators), ratios to gae from the same run."""
    if not estimators:
        return []
    settings = estimators["settings"]
    lines = ["", f"Advantage estimators ({settings['size']} model, {settings['batch']} rows = "
                 f"{settings['batch'] // settings['k']} prompts x {settings['k']}, {settings['new_tokens']} new tokens, "
                 f"{settings['ppo_epochs']} PPO epochs, mini-batch {settings['mini_batch']}):", "",
             "| system | s/iteration | x gae | peak RSS above baseline (MiB) | x gae |", "|---|---|---|---|---|"]
    for name, row in estimators["systems"].items():
        ratio = estimators["ratios_vs_gae"][name]
        lines.append(f"| {name} | {row['s_per_iteration']:.2f} | {ratio['s_per_iteration']:.3f} | "
                     f"{row['peak_rss_above_baseline']:.0f} | {ratio['peak_memory']:.3f} |")
    return lines


def _shared_prompt_table(shared: dict | None) -> list[str]:
    """benchmarks/shared_prompt.py's phases (run.py --also shared_prompt): unshared / shared, same run."""
    if not shared:
        return []
    lines = ["", "One prompt, k samples: each prompt computed once (shared) vs per row (unshared), median of "
                 f"{len(shared['rounds'])} paired rounds:", "",
             "| phase | unshared s | shared s | speed-up |", "|---|---|---|---|"]
    for phase, speedup in shared["speedup"].items():
        lines.append(f"| {phase} | {shared['seconds']['unshared'][phase]:.2f} | {shared['seconds']['shared'][phase]:.2f} "
                     f"| {speedup:.2f}x |")
    return lines


def _speed_table(speed: dict | None) -> list[str]:
    if not speed:
        return []
    lines = [f"Seconds per iteration (median of {speed['rounds']} paired rounds after {speed['warmup']} warm-up):", "",
             "| system | mini-batch | s/iteration | generate | reward | step | switching |", "|---|---|---|---|---|---|---|"]
    for name, record in speed["systems"].items():
        system, _, mini_batch = name.partition("/mb")
        lines.append(
            f"| {system} | {mini_batch} | {_number(record['median_s'])} | {_number(record.get('median_generate_s'))} | "
            f"{_number(record.get('median_reward_s'))} | {_number(record.get('median_step_s'))} | "
            f"{_number(record.get('median_switch_s'), 4)} |"
        )
    lines += ["", "Where the time goes (the trainers' own timers, median seconds):", ""]
    for name, record in speed["systems"].items():
        timers = ", ".join(f"{key.removeprefix('time/')} {value:.2f}" for key, value in record["median_timers"].items())
        lines.append(f"- {name}: {timers or 'n/a'}")
    return lines + [""]


def _memory_table(memory: dict | None) -> list[str]:
    if not memory:
        return []
    lines = ["Peak memory above the post-import baseline (MiB, kernel peak RSS with materialised weights):", "",
             "| mini-batch | multi-adapter | four separate copies | ratio |", "|---|---|---|---|"]
    for key, pair in memory.items():
        lines.append(f"| {key[2:]} | {_number(pair['multi_adapter']['peak_rss_above_baseline'], 0)} | "
                     f"{_number(pair['separate_copies']['peak_rss_above_baseline'], 0)} | {_number(pair['ratio'], 3)} |")
    return lines + [""]


def _scaling_table(scaling: dict | None) -> list[str]:
    if not scaling:
        return []
    lines = ["Scaling of our trainer (fp32, mini-batch "
             f"{scaling['mini_batch_size']}; median seconds per iteration):", "",
             "| sweep | x | s/iteration | fit | R^2 |", "|---|---|---|---|---|"]
    for name, sweep in scaling["sweeps"].items():
        points = ", ".join(f"{x}: {_number(y)}" for x, y in zip(sweep["x"], sweep["median_s"]))
        fit = sweep["fit"]
        lines.append(f"| {name} | {', '.join(map(str, sweep['x']))} | {points} | "
                     f"{_number(fit['intercept'], 3)} + {_number(fit['slope'], 4)}·x | {_number(fit['r2'], 4)} |")
    return lines + [""]


def _parity_lines(parity: dict | None) -> list[str]:
    if not parity:
        return []
    lines = [f"Parity on fixed ids against {parity['reference']} (max |difference|, tolerance {parity['tolerance']:g}):", "",
             "| pair | logprobs | ref logprobs | values | scores |", "|---|---|---|---|---|"]
    for name, diffs in parity["pairs"].items():
        lines.append(f"| {name} | " + " | ".join(f"{diffs[k]:.1e}" for k in ("logprobs", "ref_logprobs", "values", "scores"))
                     + " |")
    verdict = "passed" if parity["passed"] else f"FAILED: {parity['failure']}"
    return lines + ["", f"Parity {verdict}.", ""]


# --------------------------------------------------------------------------------------------- PNG


def render_png(summary: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in ("speed", "memory", "scaling") if summary.get(name)]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        {"speed": _plot_speed, "memory": _plot_memory, "scaling": _plot_scaling}[panel](axis, summary[panel])
    figure.suptitle(f"trl-multiadapter benchmark ({summary['mode']}): {summary['settings']['model_description']}",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_speed(axis, speed: dict) -> None:
    names = list(speed["systems"])
    medians = [speed["systems"][name]["median_s"] for name in names]
    lows = [m - min(speed["systems"][name]["seconds"]) for name, m in zip(names, medians)]
    highs = [max(speed["systems"][name]["seconds"]) - m for name, m in zip(names, medians)]
    axis.bar(range(len(names)), medians, yerr=[lows, highs], capsize=3,
             color=["tab:gray" if name.startswith(speed["baseline"]) else "tab:blue" for name in names])
    axis.set_xticks(range(len(names)), [name.replace("/", "\n") for name in names], fontsize=7)
    axis.set_ylabel("seconds per iteration (median, min-max)")
    axis.set_title("speed")


def _plot_memory(axis, memory: dict) -> None:
    keys = list(memory)
    width = 0.38
    for offset, (system, color) in enumerate((("multi_adapter", "tab:blue"), ("separate_copies", "tab:gray"))):
        axis.bar([i + offset * width for i in range(len(keys))],
                 [memory[key][system]["peak_rss_above_baseline"] for key in keys], width, label=system, color=color)
    axis.set_xticks([i + width / 2 for i in range(len(keys))], [f"mini-batch {key[2:]}" for key in keys])
    axis.set_ylabel("peak MiB above baseline")
    axis.set_title("memory")
    axis.legend(fontsize=8)


def _plot_scaling(axis, scaling: dict) -> None:
    for name, sweep in scaling["sweeps"].items():
        fit = sweep["fit"]
        (points,) = axis.plot(sweep["x"], sweep["median_s"], "o", label=f"{name} (R^2 {fit['r2']:.3f})")
        axis.plot(sweep["x"], [fit["intercept"] + fit["slope"] * x for x in sweep["x"]], "-", alpha=0.6,
                  color=points.get_color())
    axis.set_xlabel("batch size / response length")
    axis.set_ylabel("seconds per iteration")
    axis.set_title("scaling")
    axis.legend(fontsize=8)
