"""SQuAD exact match and F1, as the official evaluation scripts compute them (v1.1 and v2.0).

Both scripts normalise answers the same way (lower case, ASCII punctuation removed, the articles a / an /
the removed, white space collapsed) and take the best score over the reference answers. They differ at
the edges, and each version here follows its own script exactly:

* v1.1: a prediction and a reference that both normalise to the empty string have exact match 1 and F1
  0 (no shared token); every question needs at least one reference.
* v2.0: references that normalise to the empty string are ignored; a question left without references
  (unanswerable, or only such references) has the single reference ``""``; F1 is 1 when prediction and
  reference are both empty, 0 when only one is. Scores are reported overall and for the questions with
  answers (``has_answer_*``) and without (``no_answer_*``), as the v2.0 script does.

Scores are fractions (0 to 1); the scripts print 100 times these.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

SQUAD_VERSIONS = ("v1.1", "v2.0")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_squad_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    without_punctuation = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", without_punctuation).split())


def squad_exact_match(prediction: str, ground_truths: Any, version: str = "v1.1") -> float:
    """1.0 if the normalised prediction equals a normalised reference answer, else 0.0.

    ``ground_truths``: one answer string, a list of them, or a SQuAD ``answers`` dict
    (``{"text": [...], "answer_start": [...]}``).
    """
    predicted = normalize_squad_answer(_checked_prediction(prediction, "squad_exact_match"))
    references = _references(ground_truths, version, "squad_exact_match")
    return float(any(predicted == normalize_squad_answer(reference) for reference in references))


def squad_f1(prediction: str, ground_truths: Any, version: str = "v1.1") -> float:
    """The best token-overlap F1 between the normalised prediction and a reference answer (0 to 1)."""
    predicted = normalize_squad_answer(_checked_prediction(prediction, "squad_f1")).split()
    references = _references(ground_truths, version, "squad_f1")
    token_f1 = _token_f1_v1 if version == "v1.1" else _token_f1_v2
    return max(token_f1(predicted, normalize_squad_answer(reference).split()) for reference in references)


def _token_f1_v1(predicted: list[str], reference: list[str]) -> float:
    overlap = sum((Counter(predicted) & Counter(reference)).values())
    if overlap == 0:  # also when both are empty: the v1.1 script scores that 0
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(reference)
    return 2 * precision * recall / (precision + recall)


def _token_f1_v2(predicted: list[str], reference: list[str]) -> float:
    if not predicted or not reference:  # an empty answer is right only for an empty reference
        return float(predicted == reference)
    return _token_f1_v1(predicted, reference)


def squad_scores(predictions: Sequence[str], answers: Sequence[Any], version: str | None = None) -> dict[str, Any]:
    """Mean exact match and F1 of ``predictions`` against ``answers`` (one entry per question: a list of
    reference strings or a SQuAD ``answers`` dict; ``dataset["answers"]`` as it is works).

    ``version=None`` picks ``"v2.0"`` when some question has no reference answer (the policy may abstain
    with an empty answer) and ``"v1.1"`` otherwise. v1.1 averages over the questions with references and
    counts the others in ``skipped_unanswerable``; v2.0 scores every question and adds ``has_answer_*`` and
    ``no_answer_*`` (``exact_match``, ``f1``, ``total``) for the groups present. ``scored`` is the number of
    questions averaged over.
    """
    if isinstance(predictions, str) or not isinstance(predictions, Iterable):
        raise TypeError(f"squad_scores: predictions must be a list of answer strings, got {type(predictions).__name__}")
    predictions, references = list(predictions), _answer_lists(answers, "squad_scores")
    if len(predictions) != len(references):
        raise ValueError(f"squad_scores: {len(predictions)} predictions for {len(references)} answer lists")
    for prediction in predictions:
        _checked_prediction(prediction, "squad_scores")
    coverage = _coverage(references, version)
    version = coverage["version"]
    everything = list(range(len(predictions)))
    scored = everything if version == "v2.0" else [index for index in everything if references[index]]
    result: dict[str, Any] = {"version": version, **_mean_scores(predictions, references, scored, version),
                              "scored": coverage["scored"], "skipped_unanswerable": coverage["skipped_unanswerable"]}
    if version == "v2.0":
        # The v2.0 script groups by whether the question lists answers at all (not after normalisation).
        for group, members in (("has_answer", [i for i in everything if references[i]]),
                               ("no_answer", [i for i in everything if not references[i]])):
            if members:
                group_scores = _mean_scores(predictions, references, members, version)
                result |= {f"{group}_{key}": value for key, value in group_scores.items()}
                result[f"{group}_total"] = len(members)
    return result


def squad_coverage(answers: Sequence[Any], version: str | None = None) -> dict[str, Any]:
    """Which questions :func:`squad_scores` averages over, without predictions: ``version`` (as chosen),
    ``scored``, ``skipped_unanswerable`` (v1.1 skips questions without reference answers), and for v2.0
    ``has_answer_total`` / ``no_answer_total``."""
    references = _answer_lists(answers, "squad_coverage")
    coverage = _coverage(references, version)
    if coverage["version"] == "v2.0":
        coverage["has_answer_total"] = sum(1 for texts in references if texts)
        coverage["no_answer_total"] = sum(1 for texts in references if not texts)
    return coverage


def _coverage(references: list[list[str]], version: str | None) -> dict[str, Any]:
    if version is None:
        version = "v2.0" if any(not texts for texts in references) else "v1.1"
    _check_version(version)
    answerable = sum(1 for texts in references if texts)
    scored = len(references) if version == "v2.0" else answerable
    return {"version": version, "scored": scored, "skipped_unanswerable": len(references) - scored}


def _answer_lists(answers: Any, caller: str) -> list[list[str]]:
    if isinstance(answers, (str, Mapping)) or not isinstance(answers, Iterable):
        raise TypeError(
            f"{caller}: answers must hold one entry per question (a list of reference strings or a SQuAD "
            f"answers dict), got {type(answers).__name__}; pass dataset['answers'] or [list of texts, ...]"
        )
    return [_reference_texts(entry, caller) for entry in answers]


def _mean_scores(predictions: list[str], references: list[list[str]], indices: list[int],
                 version: str) -> dict[str, float]:
    if not indices:
        return {"exact_match": float("nan"), "f1": float("nan")}
    exact = sum(squad_exact_match(predictions[i], references[i], version) for i in indices)
    f1 = sum(squad_f1(predictions[i], references[i], version) for i in indices)
    return {"exact_match": exact / len(indices), "f1": f1 / len(indices)}


def _references(ground_truths: Any, version: str, caller: str) -> list[str]:
    _check_version(version)
    texts = _reference_texts(ground_truths, caller)
    if version == "v1.1":
        if not texts:
            raise ValueError(f"{caller}: SQuAD v1.1 needs at least one reference answer; score unanswerable "
                             f"questions with version='v2.0'")
        return texts
    kept = [text for text in texts if normalize_squad_answer(text)]
    return kept or [""]  # v2.0: the only right answer to an unanswerable question is the empty one


def _reference_texts(ground_truths: Any, caller: str) -> list[str]:
    """The reference strings of one question: a string, a list of strings, or a SQuAD answers dict."""
    if isinstance(ground_truths, str):
        return [ground_truths]
    if isinstance(ground_truths, Mapping):
        if "text" not in ground_truths:
            raise TypeError(f"{caller}: a SQuAD answers dict has a 'text' list; got keys {sorted(ground_truths)}")
        ground_truths = ground_truths["text"]
    if isinstance(ground_truths, (str, Mapping)) or not isinstance(ground_truths, Iterable):
        raise TypeError(f"{caller}: references must be a string, a list of strings or a SQuAD answers dict, "
                        f"got {type(ground_truths).__name__}")
    texts = list(ground_truths)
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"{caller}: reference answers must be strings, got {type(text).__name__} ({text!r})")
    return texts


def _checked_prediction(prediction: Any, caller: str) -> str:
    if not isinstance(prediction, str):
        raise TypeError(f"{caller}: a prediction must be a string, got {type(prediction).__name__}")
    return prediction


def _check_version(version: str) -> None:
    if version not in SQUAD_VERSIONS:
        raise ValueError(f"version={version!r}: choose one of {', '.join(SQUAD_VERSIONS)}")
