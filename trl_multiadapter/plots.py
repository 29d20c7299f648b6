"""PNG plots of a run: PPO training curves and the base vs aligned reward histogram (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# (log key, panel title) of the training-curve panels, TRL's PPO metric names.
TRAINING_CURVES = (
    ("objective/scores", "score"),
    ("objective/kl", "KL to reference, per response"),
    # per token: objective/entropy sums over a response, so it also falls when responses get shorter
    ("policy/entropy_avg", "entropy per token (policy, full vocabulary)"),
    ("loss/policy_avg", "policy loss"),
    ("loss/value_avg", "value loss"),
    ("objective/rlhf_reward", "score - beta * KL"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def curve(log_history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` in a trainer's log history, in logging order."""
    steps, values = [], []
    for entry in log_history:
        if key in entry and "step" in entry:
            steps.append(float(entry["step"]))
            values.append(float(entry[key]))
    return steps, values


def plot_training_curves(log_history: Sequence[dict[str, Any]], path: Path) -> list[str]:
    """One panel per metric of ``TRAINING_CURVES`` that was logged; returns the plotted keys."""
    plt = _pyplot()
    present = [(key, title) for key, title in TRAINING_CURVES if curve(log_history, key)[0]]
    figure, axes = plt.subplots(2, 3, figsize=(13, 7), squeeze=False)
    for axis in axes.flat:
        axis.set_visible(False)
    for axis, (key, title) in zip(axes.flat, present):
        steps, values = curve(log_history, key)
        axis.set_visible(True)
        axis.plot(steps, values, marker="." if len(steps) < 50 else None)
        axis.set_title(title)
        axis.set_xlabel("PPO iteration")
        axis.grid(alpha=0.3)
    figure.suptitle("PPO training curves")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return [key for key, _ in present]


def plot_reward_histogram(scores: dict[str, Sequence[float]], path: Path) -> None:
    """Overlaid histograms of the held-out rewards of each policy (same bins)."""
    plt = _pyplot()
    values = [value for series in scores.values() for value in series]
    low, high = min(values), max(values)
    if high == low:
        high = low + 1.0
    bins = [low + (high - low) * index / 20 for index in range(21)]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, series in scores.items():
        mean = sum(series) / len(series)
        axis.hist(series, bins=bins, alpha=0.55, label=f"{name} (mean {mean:.3f})")
    axis.set_xlabel("reward (reward adapter score)")
    axis.set_ylabel("held-out prompts")
    axis.set_title("Held-out rewards: base vs aligned policy")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
