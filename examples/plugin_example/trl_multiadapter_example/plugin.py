"""A data source, a reward function and a pipeline stage, registered through one entry point.

* data source ``prompt_lines``: a text file with one question per line becomes PPO prompts;
* reward function ``keyword_reward``: counts keywords in each completion (a rule-based reward, usable
  instead of the reward adapter with ``stage_options: {ppo: {reward_funcs: [keyword_reward]}}``);
* stage ``keyword_report``: after ``evaluate``, scores the base and aligned sample answers with the
  keyword reward and writes ``keyword_report/keyword_report.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_KEYWORDS = ("gladly", "certainly", "happy", "helpful", "thanks", "welcome", "sure", "great")


def prompt_lines(path_or_hub_id: str, split: str = "train", system_prompt: str | None = None):
    """One prompt per non-empty line of a local text file (the split name is not used)."""
    from datasets import Dataset

    lines = [line.strip() for line in Path(path_or_hub_id).read_text(encoding="utf-8").splitlines()]
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    prompts = [system + [{"role": "user", "content": line}] for line in lines if line]
    if not prompts:
        raise ValueError(f"{path_or_hub_id}: no prompts (the file has no non-empty line)")
    return Dataset.from_dict({"prompt": prompts})


def keyword_count(text: str, keywords=DEFAULT_KEYWORDS) -> float:
    words = [word.strip(".,!?;:").lower() for word in text.split()]
    return float(sum(word in keywords for word in words))


def keyword_reward(completions, keywords=DEFAULT_KEYWORDS, **kwargs) -> list[float]:
    """TRL's reward-function form: one float per completion (plain text or chat messages)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [keyword_count(text, keywords) for text in texts]


def keyword_report(context):
    """Pipeline stage: mean keyword reward of the evaluate stage's base and aligned answers."""
    from trl_multiadapter.pipeline import StageResult

    keywords = tuple(context.options.get("keywords", DEFAULT_KEYWORDS))
    samples_file = context.path("evaluate") / "samples.jsonl"
    if not samples_file.is_file():
        raise FileNotFoundError(f"{samples_file} is missing: put keyword_report after the evaluate stage")
    records = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    report = {
        policy: sum(keyword_count(r[f"{policy}_response"], keywords) for r in records) / len(records)
        for policy in ("base", "aligned")
    }
    report["num_samples"] = len(records)
    if context.is_main_process:
        (context.stage_dir / "keyword_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return StageResult(samples=len(records), metrics=report,
                       artifacts={"keyword_report": f"{context.name}/keyword_report.json"})


def register(registries) -> None:
    """The entry point: trl-multiadapter calls it once with its registries."""
    registries.data_sources.register("prompt_lines", prompt_lines)
    registries.reward_functions.register("keyword_reward", keyword_reward)
    registries.stages.register("keyword_report", keyword_report)
