"""SQuAD exact match and F1 on normalised answers."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_squad_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    without_punctuation = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", without_punctuation).split())


def _references(ground_truths: str | Iterable[str]) -> list[str]:
    references = [ground_truths] if isinstance(ground_truths, str) else list(ground_truths)
    # SQuAD v2's convention: a question without answers is answered correctly by an empty answer.
    return references or [""]


def squad_exact_match(prediction: str, ground_truths: str | Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference answer, else 0.0."""
    predicted = normalize_squad_answer(prediction)
    return float(
        any(predicted == normalize_squad_answer(reference) for reference in _references(ground_truths))
    )


def squad_f1(prediction: str, ground_truths: str | Iterable[str]) -> float:
    """The best token-overlap F1 between the normalised prediction and any reference answer (0 to 1)."""
    predicted = normalize_squad_answer(prediction).split()
    return max(
        _token_f1(predicted, normalize_squad_answer(reference).split())
        for reference in _references(ground_truths)
    )


def _token_f1(predicted: list[str], reference: list[str]) -> float:
    if not predicted or not reference:
        return float(predicted == reference)
    overlap = sum((Counter(predicted) & Counter(reference)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(reference)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and F1 over answerable questions; unanswerable ones (no answers) are skipped."""
    if len(predictions) != len(answers):
        raise ValueError(f"squad_scores: {len(predictions)} predictions for {len(answers)} answer lists")
    scored = [(prediction, refs) for prediction, refs in zip(predictions, answers) if len(refs) > 0]
    count = len(scored)
    return {
        "exact_match": sum(squad_exact_match(p, refs) for p, refs in scored) / count
        if count
        else float("nan"),
        "f1": sum(squad_f1(p, refs) for p, refs in scored) / count if count else float("nan"),
        "scored": count,
        "skipped_unanswerable": len(predictions) - count,
    }
