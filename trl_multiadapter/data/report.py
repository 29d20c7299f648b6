"""What a loading or preparation step kept, shortened, flagged and dropped, and why.

Every row that a step drops, shortens or changes is counted here under a reason name; the names are the
constants below, and ``docs/data.md`` describes each one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

# One logger for the whole package: a step's summary line is a ``trl_multiadapter.data`` record.
logger = logging.getLogger("trl_multiadapter.data")

# Why a row was dropped; the report and the error messages use these names.
MALFORMED_ROW = "malformed_row"  # not a JSON object
NON_STRING_FIELD = "non_string_field"  # "chosen" or "rejected" missing or not a string
TEXT_BEFORE_FIRST_TURN = "text_before_first_turn"
ROLES_OUT_OF_ORDER = "roles_out_of_order"
NO_ASSISTANT_TURN = "no_assistant_turn"  # the transcript does not end with an assistant turn
PROMPTS_DIFFER = "prompts_differ"
IDENTICAL_RESPONSES = "identical_responses"
FINAL_TURN_TOO_LONG = "final_turn_too_long"
PROMPT_TOO_LONG = "prompt_too_long"
ANSWER_CUT = "answer_cut"  # the context cannot be cut to fit without losing a reference answer
MISSING_FIELD = "missing_field"  # a SQuAD question without id / question / context, or of the wrong type
BAD_ANSWER = "bad_answer"  # a SQuAD answer without text, or with an answer_start that is not a number

# Kept, but worth knowing: counted under ``flagged``.
DUPLICATE_ID = "duplicate_id"  # a SQuAD id seen earlier in the same split
MERGED_TURNS = "merged_turns"  # consecutive turns of one role, merged into one

BAD_ROW_POLICIES = ("skip", "error")
_EXAMPLES_PER_REASON = 5


@dataclass
class DataReport:
    """What a loading or preparation step kept, shortened, flagged and dropped (by reason), with examples.

    ``examples`` maps each reason (and ``"shortened"``) to the first few rows of the step's input: row
    indices, or record locations (``"row 0.paragraphs[2].qas[1]"``) where rows are nested. ``flagged``
    counts kept rows by a reason worth knowing (``duplicate_id``, ``merged_turns``).
    """

    step: str
    total: int = 0
    kept: int = 0
    shortened: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[int | str]] = field(default_factory=dict)
    flagged: dict[str, int] = field(default_factory=dict)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def record_kept(self, row: int, shortened: bool = False) -> None:
        self.kept += 1
        if shortened:
            self.shortened += 1
            self._add_example("shortened", row)

    def record_dropped(self, row: int | str, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self._add_example(reason, row)

    def record_flagged(self, row: int | str, reason: str) -> None:
        """Count a kept row under ``reason`` (call :meth:`record_kept` for it too)."""
        self.flagged[reason] = self.flagged.get(reason, 0) + 1
        self._add_example(reason, row)

    def summary(self) -> str:
        """One line, e.g. ``load_hh_rlhf(x.jsonl): 10 rows, kept 8 (1 shortened), dropped 2: ...``."""
        line = f"{self.step}: {self.total} rows, kept {self.kept} ({self.shortened} shortened"
        if self.shortened:
            line += f", e.g. {_row_list(self.examples['shortened'])}"
        if self.flagged:
            line += f"; flagged {self._reasons(self.flagged)}"
        line += f"), dropped {self.dropped_total}"
        if self.dropped:
            line += f": {self._reasons(self.dropped)}"
        return line

    def _reasons(self, counts: dict[str, int]) -> str:
        return "; ".join(
            f"{reason} {count} (e.g. {_row_list(self.examples[reason])})" for reason, count in sorted(counts.items())
        )

    def _add_example(self, key: str, row: int | str) -> None:
        rows = self.examples.setdefault(key, [])
        if len(rows) < _EXAMPLES_PER_REASON:
            rows.append(row)


def _row_list(rows: list[int | str]) -> str:
    """``rows 2, 5`` for row indices; record paths (``dev.json: row 0.paragraphs[1].qas[0]``) as they are."""
    if all(isinstance(row, int) for row in rows):
        return "rows " + ", ".join(str(row) for row in rows)
    return ", ".join(str(row) for row in rows)


class TooManyDroppedError(ValueError):
    """A step dropped more than the allowed share of its rows; the message gives the counts by reason."""


def check_drop_fraction(report: DataReport, max_drop_fraction: float, setting: str = "max_drop_fraction") -> None:
    """Raise :class:`TooManyDroppedError` when ``report`` dropped more than ``max_drop_fraction`` of its rows.

    A source where nearly every row is malformed is the wrong file or the wrong format; carrying on with
    the few rows left would train on them silently. ``setting`` names the knob in the message.
    """
    if not report.total or report.dropped_total / report.total <= max_drop_fraction:
        return
    share = report.dropped_total / report.total
    raise TooManyDroppedError(
        f"{report.step}: dropped {report.dropped_total} of {report.total} rows ({share:.1%}), more than "
        f"{setting}={max_drop_fraction}: {report._reasons(report.dropped)}; check that the source is the "
        f"right file in the right format, or raise {setting}"
    )


def log_report(report: DataReport) -> None:
    if report.dropped_total or report.shortened or report.flagged:
        logger.warning(report.summary())
    else:
        logger.info(report.summary())
