"""Ground-truth metrics: how the evaluate stage measures learning without asking the reward model.

A data source supplies its own metric by carrying it: decorate the registered source function with
``supplies_ground_truth(metric)`` (a plugin does the same for its sources)::

    from trl_multiadapter.ground_truth import supplies_ground_truth
    from trl_multiadapter.registry import register_data_source

    def polite_rate(responses, prompts, **kwargs) -> dict[str, float]:
        return {"polite_rate": sum("please" in text.lower() for text in responses) / len(responses)}

    @register_data_source("my_corpus")
    @supplies_ground_truth(polite_rate)
    def load_my_corpus(split="train", **kwargs): ...

The evaluate stage looks up the recipe's preference and prompt sources in the data-source registry and
calls each metric they carry once per policy, with keywords: ``responses`` (decoded answers, cut before
their stop token, special tokens dropped, in prompt order) and ``prompts`` (the held-out prompt rows, same
order). It returns named numbers, reported for base and aligned first in metrics.json and the report.
Real data without such a rule has none (SQuAD's exact match and F1 come from the prompts' answers).

This module imports nothing heavy, so sources (and the CLI's registry lookups) stay cheap to import.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

GroundTruthMetric = Callable[..., dict[str, float]]
GROUND_TRUTH_ATTRIBUTE = "ground_truth_metric"
WORD_PATTERN = re.compile(r"[a-z]+")


def supplies_ground_truth(metric: GroundTruthMetric):
    """Decorator: the data source it wraps supplies ``metric`` (stored as its ``ground_truth_metric``)."""
    if not callable(metric):
        raise TypeError(f"a ground-truth metric must be callable, got {type(metric).__name__}")

    def attach(source):
        setattr(source, GROUND_TRUTH_ATTRIBUTE, metric)
        return source

    return attach


def ground_truth_for(source_names: Sequence[str]) -> GroundTruthMetric | None:
    """The metrics the named registered data sources supply, as one metric (their results merged in
    order), or None when none supplies one."""
    from .registry import data_sources

    metrics = []
    for name in dict.fromkeys(source_names):  # each source once, in order
        metric = getattr(data_sources.get(name), GROUND_TRUTH_ATTRIBUTE, None)
        if metric is not None and metric not in metrics:
            metrics.append(metric)
    if not metrics:
        return None

    def combined(responses: Sequence[str], prompts: Any = None) -> dict[str, float]:
        results: dict[str, float] = {}
        for metric in metrics:
            results.update(metric(responses=responses, prompts=prompts))
        return results

    return combined


def planted_rule_metrics(responses: Sequence[str], **_: Any) -> dict[str, float]:
    """Ground truth of the synthetic hh-rlhf data's planted rule (chosen answers use ``HELPFUL_WORDS``,
    rejected ones ``DISMISSIVE_WORDS``, see ``trl_multiadapter.testing.words``).

    The words of a response are the ``[a-z]+`` runs of its lower-cased text, cut at its first stop token.
    ``ground_truth_rate``: share of responses whose words contain a helpful word and no dismissive word;
    ``helpful_words``, ``dismissive_words``: mean number of such words per response (each occurrence counts).
    """
    from .testing.words import DISMISSIVE_WORDS, HELPFUL_WORDS

    helpful, dismissive = set(HELPFUL_WORDS), set(DISMISSIVE_WORDS)
    follows_rule = helpful_total = dismissive_total = 0
    for response in responses:
        words = WORD_PATTERN.findall(response.lower())
        helpful_count = sum(word in helpful for word in words)
        dismissive_count = sum(word in dismissive for word in words)
        follows_rule += helpful_count > 0 and dismissive_count == 0
        helpful_total += helpful_count
        dismissive_total += dismissive_count
    count = max(len(responses), 1)
    return {"ground_truth_rate": follows_rule / count, "helpful_words": helpful_total / count,
            "dismissive_words": dismissive_total / count}
