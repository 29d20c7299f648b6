"""The run report: the base vs aligned headline (ground truth first), sample generations and plot links.

Built from hand-written stage results and files, so every number in the report is known in advance.
"""

from __future__ import annotations

import json

from trl_multiadapter import recipe
from trl_multiadapter.pipeline import StageOutcome, StageResult
from trl_multiadapter.report import build_report, format_markdown

SUMMARY = {
    "base_ground_truth_rate": 0.125, "base_helpful_words": 0.25, "base_dismissive_words": 0.5,
    "base_mean_reward": 0.75, "base_kl_full": 0.0, "base_response_length": 8.0, "base_stop_rate": 0.0,
    "base_exact_match": 0.0, "base_f1": 0.0, "base_my_plugin_rate": 0.1,
    "aligned_ground_truth_rate": 0.625, "aligned_helpful_words": 1.5, "aligned_dismissive_words": 0.0,
    "aligned_mean_reward": 1.25, "aligned_kl_full": 2.5, "aligned_response_length": 6.0, "aligned_stop_rate": 1.0,
    "aligned_exact_match": 0.0, "aligned_f1": 0.0, "aligned_my_plugin_rate": 0.9,
    "win_rate": 0.875,
}
ARTIFACTS = {"metrics": "evaluate/metrics.json", "samples": "evaluate/samples.jsonl",
             "reward_histogram": "evaluate/reward_histogram.png", "training_curves": "evaluate/training_curves.png"}


def run_folder(tmp_path, shown: int = 2):
    evaluate_dir = tmp_path / "evaluate"
    evaluate_dir.mkdir()
    records = [{"prompt": f"Question {index}?", "answers": ["a kettle"], "base_response": "" if index == 0 else "meh",
                "aligned_response": f"Gladly `{index}`", "base_reward": 0.5 + index, "aligned_reward": 1.5 + index,
                "base_response_ids": [1], "aligned_response_ids": [2, 4]} for index in range(3)]
    (evaluate_dir / "samples.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (evaluate_dir / "reward_histogram.png").write_bytes(b"\x89PNG")  # training_curves.png is missing
    loaded = recipe.load("tiny_cpu", [f"evaluate.num_shown_samples={shown}"], output_dir=str(tmp_path))
    outcomes = [StageOutcome("ppo", "ran", StageResult(samples=16, tokens=100, wall_time_s=2.0)),
                StageOutcome("evaluate", "ran", StageResult(samples=128, tokens=1000, metrics=SUMMARY,
                                                            artifacts=ARTIFACTS, wall_time_s=1.0))]
    return build_report(loaded, outcomes)


def test_headline_puts_ground_truth_first_then_the_reward(tmp_path):
    report = run_folder(tmp_path)
    keys = [row["key"] for row in report["headline"]["rows"]]
    assert keys[:6] == ["ground_truth_rate", "helpful_words", "dismissive_words", "exact_match", "f1",
                        "my_plugin_rate"]  # a plugin's ground truth joins the ground-truth rows
    assert keys[6:8] == ["mean_reward", "kl_full"]
    rows = {row["key"]: (row["base"], row["aligned"]) for row in report["headline"]["rows"]}
    assert rows["ground_truth_rate"] == (0.125, 0.625) and rows["kl_full"] == (0.0, 2.5)
    markdown = format_markdown(report)
    assert markdown.index("## Base vs aligned policy") < markdown.index("## Time and cost")
    table = markdown[markdown.index("## Base vs aligned policy"):markdown.index("## Time and cost")]
    assert table.index("`ground_truth_rate`") < table.index("`mean_reward`") < table.index("`win_rate`")
    assert "| 0.1250 | 0.6250 |" in table and "| | 0.8750 |" in table


def test_report_shows_num_shown_samples_and_links_existing_plots(tmp_path):
    report = run_folder(tmp_path, shown=2)
    assert [sample["prompt"] for sample in report["samples"]] == ["Question 0?", "Question 1?"]
    assert report["plots"] == {"reward_histogram": "evaluate/reward_histogram.png"}
    markdown = format_markdown(report)
    samples = markdown[markdown.index("## Sample generations (2 held-out prompts)"):]
    assert '1. prompt: `` "Question 0?" `` (reference answers: `` "a kettle" ``)' in samples
    assert '   - base (reward 0.500): `` "" ``' in samples  # an empty answer stays visible
    assert '   - aligned (reward 2.500): `` "Gladly `1`" ``' in samples
    assert "Question 2?" not in markdown
    assert "![reward histogram](evaluate/reward_histogram.png)" in markdown and "training_curves" not in markdown


def test_without_an_evaluate_stage_there_is_no_headline(tmp_path):
    loaded = recipe.load("tiny_cpu", output_dir=str(tmp_path))
    report = build_report(loaded, [StageOutcome("ppo", "ran", StageResult(samples=16, wall_time_s=2.0))])
    assert "headline" not in report and "## Base vs aligned" not in format_markdown(report)
    assert "| ppo | ran |" in format_markdown(report)
