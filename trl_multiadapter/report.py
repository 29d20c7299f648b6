"""The run report (``report.json`` + ``report.md``): time, throughput and cost of every stage.

Per stage: wall time, samples/s and tokens/s; with ``instance.price_per_hour``, USD per sample and per 1k
tokens, computed as ``price_per_hour * wall_time_s / 3600 / samples`` (and ``/ tokens * 1000``). A stage
skipped in this invocation keeps the numbers of the run that produced it. When the recipe's instance is
the one of the seed article (ml.g5.12xlarge), its published costs are shown beside ours.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .plan import REFERENCE_COSTS, REFERENCE_INSTANCE
from .recipe import Recipe

# Reference figures by stage: (our report key, the article's value, how the article states it).
REFERENCE_BY_STAGE = {
    "reward": [("usd_per_1k_tokens", REFERENCE_COSTS["reward_usd_per_1k_tokens"], "< $0.015 / 1k tokens")],
    "ppo": [
        ("usd_per_sample", REFERENCE_COSTS["ppo_usd_per_sample"], "~$0.0079 / sample"),
        ("usd_per_1k_tokens", REFERENCE_COSTS["ppo_usd_per_1k_tokens"], "< $0.0039 / 1k tokens"),
    ],
}


def stage_costs(wall_time_s: float, samples: int, tokens: int, price_per_hour: float | None) -> dict[str, Any]:
    """Throughput and cost of one stage; rates are None where a count is zero."""
    seconds = max(wall_time_s, 1e-9)
    usd = None if price_per_hour is None else price_per_hour * wall_time_s / 3600.0
    return {
        "wall_time_s": wall_time_s,
        "samples": samples,
        "tokens": tokens,
        "samples_per_s": samples / seconds if samples else None,
        "tokens_per_s": tokens / seconds if tokens else None,
        "usd": usd,
        "usd_per_sample": usd / samples if usd is not None and samples else None,
        "usd_per_1k_tokens": usd / tokens * 1000 if usd is not None and tokens else None,
    }


def build_report(recipe: Recipe, outcomes: list) -> dict[str, Any]:
    price = recipe.instance.price_per_hour
    stages = {}
    for outcome in outcomes:
        result = outcome.result
        entry = {"status": outcome.status, **stage_costs(result.wall_time_s, result.samples, result.tokens, price)}
        entry["metrics"] = result.metrics
        entry["artifacts"] = result.artifacts
        stages[outcome.name] = entry
    total_time = sum(entry["wall_time_s"] for entry in stages.values())
    report = {
        "recipe": recipe.source,
        "output_dir": recipe.output_dir,
        "generated_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "instance": {"name": recipe.instance.name, "num_gpus": recipe.instance.num_gpus,
                     "price_per_hour": price},
        "stages": stages,
        "total": {"wall_time_s": total_time, "usd": None if price is None else price * total_time / 3600.0},
    }
    if recipe.instance.name == REFERENCE_INSTANCE:
        report["reference"] = {
            "source": "seed article: multi-adapter PPO with TRL 0.11 on one ml.g5.12xlarge",
            "stages": {name: {key: value for key, value, _ in rows} for name, rows in REFERENCE_BY_STAGE.items()},
        }
    return report


def write_report(run_dir: Path, report: dict[str, Any]) -> None:
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (run_dir / "report.md").write_text(format_markdown(report))


def _number(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and abs(value) < 0.01:
            return f"{value:.2e}"
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def _money(value: float | None) -> str:
    if value is None:
        return "-"
    return f"${value:.6f}" if value < 0.01 else f"${value:,.4f}"


def format_markdown(report: dict[str, Any]) -> str:
    instance = report["instance"]
    price = instance["price_per_hour"]
    lines = [
        "# Run report",
        "",
        f"- recipe: `{report['recipe']}`",
        f"- output folder: `{report['output_dir']}`",
        f"- instance: {instance['name']} ({instance['num_gpus']} GPUs)"
        + (f", ${price:.2f}/h" if price is not None else ", no price given (cost columns empty)"),
        f"- total wall time: {_number(report['total']['wall_time_s'])} s"
        + (f", ${report['total']['usd']:.4f}" if report["total"]["usd"] is not None else ""),
        "",
        "| stage | status | wall time (s) | samples | tokens | samples/s | tokens/s | $/sample | $/1k tokens |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in report["stages"].items():
        lines.append(
            f"| {name} | {entry['status']} | {_number(entry['wall_time_s'])} | {_number(entry['samples'])} | "
            f"{_number(entry['tokens'])} | {_number(entry['samples_per_s'])} | {_number(entry['tokens_per_s'])} | "
            f"{_money(entry['usd_per_sample'])} | {_money(entry['usd_per_1k_tokens'])} |"
        )
    if "reference" in report:
        lines += ["", "## Beside the seed article (same instance)", "",
                  "| stage | measure | ours | seed article |", "|---|---|---:|---:|"]
        for name, rows in REFERENCE_BY_STAGE.items():
            if name not in report["stages"]:
                continue
            for key, _, stated in rows:
                lines.append(f"| {name} | {key.replace('_', ' ')} | {_money(report['stages'][name][key])} | {stated} |")
    lines += ["", "## Stage metrics", ""]
    for name, entry in report["stages"].items():
        if not entry["metrics"]:
            continue
        lines.append(f"### {name}")
        lines.append("")
        for key, value in entry["metrics"].items():
            if isinstance(value, (dict, list)):
                continue
            lines.append(f"- {key}: {_number(value, 4) if isinstance(value, float) else value}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
