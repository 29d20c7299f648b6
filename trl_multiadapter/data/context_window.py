"""Sentences of a SQuAD context, and the run of sentences that holds every reference answer.

Pure text functions (no tokenizer): :mod:`.prompts` grows the window sentence by sentence until the
prompt's token budget is reached. A sentence ends at ``.``, ``!`` or ``?`` followed by white space and a
capital letter, digit or opening quote, except after an initial (``C. J. Anderson``), a dotted
abbreviation (``U.S.``, ``e.g.``) or a common abbreviation (``Dr.``, ``St.``, ``No.``): real SQuAD
contexts are full of them, and a cut there would end a window in ``... Running back C. J.``. The splitter
may miss a boundary (a window is then a little coarser); the window itself is defined by the answers'
character offsets, so a cut never falls inside an answer whatever the splitter does.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence

# Lower-case, without the dot. Titles, places, units, months and Latin; all common in Wikipedia text.
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st mt ft jr sr sen rep gov gen col lt sgt capt cmdr adm rev hon pres messrs "
    "no nos vol vols pp fig figs ch sec art dept univ assn inc ltd co corp bros vs etc approx ca cf al "
    "jan feb mar apr jun jul aug sep sept oct nov dec est op ed eds".split()
)
_CANDIDATE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(\s+)(?=[\"'\u201c\u2018(\[]?[A-Z0-9])")
_LAST_WORD = re.compile(r"([A-Za-z.]+)\.$")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the sentences of ``text``, white space between them left out."""
    spans, start = [], 0
    for match in _CANDIDATE_END.finditer(text):
        stop = match.start(1)  # the sentence keeps its closing punctuation and quotes
        if text[match.start()] == "." and _ends_in_abbreviation(text[start : match.start() + 1]):
            continue
        if stop > start:
            spans.append((start, stop))
        start = match.end(1)
    if start < len(text) and text[start:].strip():
        spans.append((start, len(text.rstrip())))
    return spans


def _ends_in_abbreviation(sentence: str) -> bool:
    match = _LAST_WORD.search(sentence)
    if match is None:
        return False
    word = match.group(1)
    if len(word) == 1 and word.isalpha():  # an initial: "C." of "C. J. Anderson"
        return True
    if re.fullmatch(r"(?:[A-Za-z]\.)+[A-Za-z]", word):  # "U.S", "e.g" (the final dot is not in word)
        return True
    return word.lower() in ABBREVIATIONS


def answer_sentences(spans: Sequence[tuple[int, int]], texts: Sequence[str],
                     starts: Sequence[int]) -> tuple[int, int] | None:
    """``(first, last)``: the indices of the sentences from the one holding the earliest answer start to
    the one holding the latest answer end; None without answers."""
    if not starts:
        return None
    sentence_starts = [span[0] for span in spans]

    def sentence_of(position: int) -> int:
        return max(0, bisect.bisect_right(sentence_starts, position) - 1)

    first = min(sentence_of(start) for start in starts)
    last = max(sentence_of(start + max(len(text), 1) - 1) for text, start in zip(texts, starts))
    return first, last
