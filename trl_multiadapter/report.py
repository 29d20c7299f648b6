"""The run report (``report.json`` + ``report.md``): what was learned, then time, throughput and cost.

The headline is the evaluate stage's base vs aligned comparison on held-out prompts, ground truth
first (the data's own rule, or SQuAD's exact match / F1: numbers the reward model does not decide),
then the reward model's view (mean reward, win rate), the KL to the reference and response lengths;
below it the sample generations of ``evaluate/samples.jsonl`` (``evaluate.num_shown_samples``) and
links to the plots.

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


# The evaluate stage's per-policy metrics, in headline order: (key, label). Ground truth first.
METRIC_ROWS = (
    ("ground_truth_rate", "ground truth: share of responses following the data's rule"),
    ("helpful_words", "ground truth: helpful words per response"),
    ("dismissive_words", "ground truth: dismissive words per response"),
    ("exact_match", "SQuAD exact match"),
    ("f1", "SQuAD F1"),
    ("mean_reward", "reward adapter score (mean)"),
    ("kl_full", "KL to the reference (full vocabulary, summed over the response)"),
    ("response_length", "response length, tokens (mean)"),
    ("response_length_median", "response length (median)"),
    ("response_length_p10", "response length (10th percentile)"),
    ("response_length_p90", "response length (90th percentile)"),
    ("stop_rate", "share of responses that stopped"),
)
POLICY_NAMES = ("base", "aligned")


def headline(evaluate_metrics: dict[str, Any]) -> dict[str, Any]:
    """Base vs aligned rows from the evaluate stage's summary (``base_<key>``, ``aligned_<key>``, ``win_rate``)."""
    rows = [{"key": key, "label": label, "base": evaluate_metrics[f"base_{key}"],
             "aligned": evaluate_metrics[f"aligned_{key}"]}
            for key, label in METRIC_ROWS if f"base_{key}" in evaluate_metrics and f"aligned_{key}" in evaluate_metrics]
    known = {f"{policy}_{key}" for policy in POLICY_NAMES for key, _ in METRIC_ROWS} | {"win_rate"}
    for name in sorted(evaluate_metrics):  # a plugin's ground-truth metric: shown too, after the known ones
        if name.startswith("base_") and name not in known and f"aligned_{name[5:]}" in evaluate_metrics:
            rows.insert(_ground_truth_rows(rows), {"key": name[5:], "label": name[5:], "base": evaluate_metrics[name],
                                                   "aligned": evaluate_metrics[f"aligned_{name[5:]}"]})
    return {"rows": rows, "win_rate": evaluate_metrics.get("win_rate")}


def _ground_truth_rows(rows: list[dict[str, Any]]) -> int:
    """Where another ground-truth row goes: after the known ground-truth rows, before the reward rows."""
    return sum(1 for row in rows if row["key"] in ("ground_truth_rate", "helpful_words", "dismissive_words",
                                                   "exact_match", "f1"))


def shown_samples(run_dir: Path, artifacts: dict[str, str], count: int) -> list[dict[str, Any]]:
    """The first ``count`` records of the evaluate stage's samples file (prompt, responses, rewards)."""
    path = run_dir / artifacts.get("samples", "")
    if count <= 0 or "samples" not in artifacts or not path.is_file():
        return []
    records = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if len(records) == count:
                break
            record = json.loads(line)
            records.append({key: record.get(key) for key in ("prompt", "answers", *(
                f"{policy}_{field}" for policy in POLICY_NAMES for field in ("response", "reward")))})
    return records


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
    evaluation = stages.get("evaluate")
    if evaluation is not None and evaluation["metrics"]:
        run_dir = Path(recipe.output_dir)
        report["headline"] = headline(evaluation["metrics"])
        report["samples"] = shown_samples(run_dir, evaluation["artifacts"], recipe.evaluate.num_shown_samples)
        report["plots"] = {name: path for name, path in evaluation["artifacts"].items()
                           if path.endswith(".png") and (run_dir / path).is_file()}
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
    ]
    lines += _headline_lines(report)
    lines += [
        "## Time and cost",
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
    lines += _samples_lines(report)
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


def _headline_lines(report: dict[str, Any]) -> list[str]:
    if "headline" not in report:
        return []
    headline_rows = report["headline"]
    lines = ["## Base vs aligned policy on held-out prompts", "",
             "Sampled as in PPO (same sampler and settings, same seed for both). Ground truth first: it does not "
             "ask the reward model.", "",
             "| metric | base | aligned |", "|---|---:|---:|"]
    for row in headline_rows["rows"]:
        lines.append(f"| {row['label']} (`{row['key']}`) | {_number(row['base'], 4)} | {_number(row['aligned'], 4)} |")
    if headline_rows.get("win_rate") is not None:
        lines.append(f"| reward win rate of aligned over base (`win_rate`) | | {_number(headline_rows['win_rate'], 4)} |")
    plots = report.get("plots") or {}
    if plots:
        lines += ["", "Plots: " + ", ".join(f"[{name.replace('_', ' ')}]({path})" for name, path in plots.items())]
        lines += [""] + [f"![{name.replace('_', ' ')}]({path})" for name, path in plots.items()]
    return lines + [""]


def _samples_lines(report: dict[str, Any]) -> list[str]:
    samples = report.get("samples") or []
    if not samples:
        return []
    lines = ["", f"## Sample generations ({len(samples)} held-out prompts)", ""]
    for index, sample in enumerate(samples, start=1):
        lines.append(f"{index}. prompt: {_quoted(sample['prompt'])}"
                     + (f" (reference answers: {', '.join(map(_quoted, sample['answers']))})" if sample.get("answers")
                        else ""))
        for policy in POLICY_NAMES:
            lines.append(f"   - {policy} (reward {_number(sample[f'{policy}_reward'], 3)}): "
                         f"{_quoted(sample[f'{policy}_response'])}")
    return lines


def _quoted(text: Any) -> str:
    """Text as a JSON string in a code span: empty answers and odd characters stay visible."""
    return f"`` {json.dumps(str(text), ensure_ascii=False)} ``"
