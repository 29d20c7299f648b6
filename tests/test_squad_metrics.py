"""trl_multiadapter.data.squad_metrics: SQuAD exact match and F1.

Expected values are hand-computed, or come from a second implementation written in this file.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_multiadapter.data import squad_exact_match, squad_f1, squad_scores


@pytest.mark.parametrize(
    ("prediction", "references", "exact", "f1"),
    [
        ("The Harbor!", ["harbor"], 1.0, 1.0),
        ("an apple", ["Apple."], 1.0, 1.0),
        ("a silver canyon today", ["silver canyon"], 0.0, 0.8),  # P=2/3, R=1
        ("green green lantern", ["the green lantern", "tower"], 0.0, 0.8),  # overlap 2 of 3 and of 2
        ("tower", ["river"], 0.0, 0.0),
        ("", [], 1.0, 1.0),  # SQuAD v2: an unanswerable question answered with nothing
        ("something", [], 0.0, 0.0),
    ],
)
def test_squad_metrics_on_hand_computed_cases(prediction, references, exact, f1):
    assert squad_exact_match(prediction, references) == exact
    assert squad_f1(prediction, references) == pytest.approx(f1)


def _f1_by_removal(prediction: str, reference: str) -> float:
    """Second implementation: count overlap by removing matched tokens from a list."""

    def tokens(text):
        kept = "".join(ch for ch in text.lower() if ch.isalnum() or ch.isspace())
        return [word for word in kept.split() if word not in ("a", "an", "the")]

    predicted, remaining = tokens(prediction), tokens(reference)
    if not predicted or not remaining:
        return float(predicted == remaining)
    overlap = 0
    for word in predicted:
        if word in remaining:
            remaining.remove(word)
            overlap += 1
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(tokens(reference))
    return 2 * precision * recall / (precision + recall)


_ANSWER_WORDS = ["the", "a", "An", "harbor", "Harbor!", "green", "lantern,", "12", "U.S.", "river"]
_ANSWER_TEXT = st.lists(st.sampled_from(_ANSWER_WORDS), max_size=6).map(" ".join)


@settings(max_examples=200, deadline=None)
@given(prediction=_ANSWER_TEXT, reference=_ANSWER_TEXT)
def test_f1_matches_a_second_implementation(prediction, reference):
    assert squad_f1(prediction, [reference]) == pytest.approx(_f1_by_removal(prediction, reference))
    assert squad_exact_match(prediction, [reference]) <= squad_f1(prediction, [reference])


def test_squad_scores_skip_unanswerable_questions():
    scores = squad_scores(["harbor", "tower", "anything"], [["the harbor"], ["river", "tower x"], []])
    assert scores["scored"] == 2 and scores["skipped_unanswerable"] == 1
    assert scores["exact_match"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx((1.0 + 2 / 3) / 2)  # "tower" vs "tower x": P=1, R=1/2
