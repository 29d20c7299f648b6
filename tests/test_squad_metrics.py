"""trl_multiadapter.data.squad_metrics: SQuAD exact match and F1, as the official v1.1 and v2.0 scripts.

Expected values are hand-computed (each edge case of the two scripts written out), or come from a second
implementation written in this file.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_multiadapter.data import squad_exact_match, squad_f1, squad_scores


@pytest.mark.parametrize("version", ["v1.1", "v2.0"])
@pytest.mark.parametrize(
    ("prediction", "references", "exact", "f1"),
    [
        ("The Harbor!", ["harbor"], 1.0, 1.0),
        ("an apple", ["Apple."], 1.0, 1.0),
        ("a silver canyon today", ["silver canyon"], 0.0, 0.8),  # P=2/3, R=1
        ("green green lantern", ["the green lantern", "tower"], 0.0, 0.8),  # overlap 2 of 3 and of 2
        ("tower", ["river"], 0.0, 0.0),
        ("", ["river"], 0.0, 0.0),
    ],
)
def test_both_versions_agree_on_ordinary_answers(prediction, references, exact, f1, version):
    assert squad_exact_match(prediction, references, version) == exact
    assert squad_f1(prediction, references, version) == pytest.approx(f1)


@pytest.mark.parametrize(
    ("prediction", "references", "v1", "v2"),
    [
        # Both normalise to "": v1.1 has EM 1 but F1 0 (no shared token); v2.0 treats "" as the answer.
        ("the", ["a"], (1.0, 0.0), (1.0, 1.0)),
        ("", ["."], (1.0, 0.0), (1.0, 1.0)),
        # v2.0 ignores references that normalise to "": here only "harbor" counts, so "" is wrong.
        ("", ["The", "harbor"], (1.0, 0.0), (0.0, 0.0)),
        ("an", ["the", "harbor"], (1.0, 0.0), (0.0, 0.0)),
        ("harbor", ["the", "harbor"], (1.0, 1.0), (1.0, 1.0)),
        # Only empty-normalising references: v2.0 scores the question as unanswerable.
        ("river", ["the"], (0.0, 0.0), (0.0, 0.0)),
    ],
)
def test_the_edges_where_the_official_scripts_differ(prediction, references, v1, v2):
    assert (squad_exact_match(prediction, references, "v1.1"), squad_f1(prediction, references, "v1.1")) == v1
    assert (squad_exact_match(prediction, references, "v2.0"), squad_f1(prediction, references, "v2.0")) == v2


def test_unanswerable_questions_are_v2_only():
    assert (squad_exact_match("", [], "v2.0"), squad_f1("", [], "v2.0")) == (1.0, 1.0)
    assert (squad_exact_match("something", [], "v2.0"), squad_f1("something", [], "v2.0")) == (0.0, 0.0)
    with pytest.raises(ValueError, match="v1.1 needs at least one reference answer.*version='v2.0'"):
        squad_f1("", [])
    with pytest.raises(ValueError, match="choose one of v1.1, v2.0"):
        squad_f1("x", ["x"], version="2")


def _f1_by_removal(prediction: str, reference: str, version: str) -> float:
    """Second implementation: count overlap by removing matched tokens from a list."""

    def tokens(text):
        kept = "".join(ch for ch in text.lower() if ch.isalnum() or ch.isspace())
        return [word for word in kept.split() if word not in ("a", "an", "the")]

    predicted, remaining = tokens(prediction), tokens(reference)
    if version == "v2.0" and (not predicted or not remaining):
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


_ANSWER_WORDS = ["the", "a", "An", "harbor", "Harbor!", "green", "lantern,", "12", "U.S.", "river", "."]
_ANSWER_TEXT = st.lists(st.sampled_from(_ANSWER_WORDS), max_size=6).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(prediction=_ANSWER_TEXT, reference=_ANSWER_TEXT, version=st.sampled_from(["v1.1", "v2.0"]))
def test_f1_matches_a_second_implementation(prediction, reference, version):
    if version == "v2.0" and not _f1_by_removal(reference, reference, "v1.1"):
        reference_used = ""  # v2.0 drops a reference that normalises to ""; none left means ""
    else:
        reference_used = reference
    expected = _f1_by_removal(prediction, reference_used, version)
    assert squad_f1(prediction, [reference], version) == pytest.approx(expected)
    if version == "v2.0":  # v1.1 breaks this on purpose: ("the", ["a"]) has EM 1 and F1 0
        assert squad_exact_match(prediction, [reference], version) <= squad_f1(prediction, [reference], version)


def test_v1_scores_skip_unanswerable_questions_and_say_so():
    scores = squad_scores(["harbor", "tower", "anything"], [["the harbor"], ["river", "tower x"], []], "v1.1")
    assert scores["version"] == "v1.1" and scores["scored"] == 2 and scores["skipped_unanswerable"] == 1
    assert scores["exact_match"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx((1.0 + 2 / 3) / 2)  # "tower" vs "tower x": P=1, R=1/2


def test_v2_scores_report_overall_has_answer_and_no_answer():
    predictions = ["harbor", "tower", "", "anything", ""]
    answers = [["the harbor"], ["river", "tower x"], [], [], ["the"]]
    # Per question (EM, F1): (1, 1), (0, 2/3), (1, 1) abstained on an unanswerable one, (0, 0),
    # and (1, 1): "the" normalises to "", so the empty prediction is right; the question still lists
    # an answer, so it counts under has_answer, as in the v2.0 script.
    scores = squad_scores(predictions, answers)  # a question without answers: v2.0 is chosen
    assert scores["version"] == "v2.0" and scores["scored"] == 5 and scores["skipped_unanswerable"] == 0
    assert scores["exact_match"] == pytest.approx(3 / 5)
    assert scores["f1"] == pytest.approx((1 + 2 / 3 + 1 + 0 + 1) / 5)
    assert (scores["has_answer_total"], scores["no_answer_total"]) == (3, 2)
    assert scores["has_answer_exact_match"] == pytest.approx(2 / 3)
    assert scores["has_answer_f1"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert (scores["no_answer_exact_match"], scores["no_answer_f1"]) == (0.5, 0.5)


def test_answerable_only_sets_are_scored_as_v1_and_v2_has_no_empty_group():
    scores = squad_scores(["harbor"], [["harbor"]])
    assert scores["version"] == "v1.1" and "has_answer_total" not in scores
    v2 = squad_scores(["harbor"], [["harbor"]], version="v2.0")
    assert v2["has_answer_total"] == 1 and "no_answer_total" not in v2
    assert math.isnan(squad_scores(["x"], [[]], "v1.1")["exact_match"])


def test_dataset_answer_dicts_are_read_by_their_text():
    from datasets import Dataset

    dataset = Dataset.from_list([
        {"answers": {"text": ["the harbor", "harbor"], "answer_start": [13, 17]}},
        {"answers": {"text": ["12"], "answer_start": [66]}},
    ])
    assert squad_scores(["Harbor", "12"], dataset["answers"])["exact_match"] == 1.0
    assert squad_exact_match("text", {"text": ["harbor"], "answer_start": [0]}) == 0.0
    assert squad_exact_match("harbor", {"text": ["harbor"], "answer_start": [0]}) == 1.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: squad_exact_match("text", {"answer_start": [0]}), "answers dict has a 'text' list"),
        (lambda: squad_f1("x", [3]), "reference answers must be strings, got int"),
        (lambda: squad_f1(None, ["x"]), "a prediction must be a string, got NoneType"),
        (lambda: squad_f1("x", 3), "references must be a string, a list of strings or a SQuAD answers dict"),
        (lambda: squad_scores("harbor", [["harbor"]]), "predictions must be a list of answer strings"),
        (lambda: squad_scores(["harbor"], {"text": [["harbor"]]}), "answers must hold one entry per question"),
        (lambda: squad_scores(["harbor"], [[["harbor"]]]), "reference answers must be strings, got list"),
    ],
)
def test_argument_types_are_checked(call, message):
    with pytest.raises(TypeError, match=message):
        call()


def test_counts_must_match():
    with pytest.raises(ValueError, match="2 predictions for 1 answer lists"):
        squad_scores(["a", "b"], [["a"]])


def test_coverage_says_what_is_scored_and_why_the_rest_is_skipped():
    from trl_multiadapter.data import squad_coverage

    answers = [["harbor"], [], {"text": ["river"], "answer_start": [3]}, {"text": [], "answer_start": []}]
    assert squad_coverage(answers, "v1.1") == {"version": "v1.1", "scored": 2, "skipped_unanswerable": 2}
    assert squad_coverage(answers) == {"version": "v2.0", "scored": 4, "skipped_unanswerable": 0,
                                       "has_answer_total": 2, "no_answer_total": 2}
    assert squad_coverage([["a"], ["b"]]) == {"version": "v1.1", "scored": 2, "skipped_unanswerable": 0}
    scores = squad_scores(["harbor", "", "x", ""], answers, "v1.1")
    assert (scores["scored"], scores["skipped_unanswerable"]) == (2, 2)
