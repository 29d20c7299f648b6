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

BAD_ROW_POLICIES = ("skip", "error")
_EXAMPLES_PER_REASON = 5


@dataclass
class DataReport:
    """What a loading or preparation step kept, shortened and dropped (by reason), with example rows.

    ``examples`` maps each reason (and ``"shortened"``) to the first few row indices of the step's input.
    """

    step: str
    total: int = 0
    kept: int = 0
    shortened: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[int]] = field(default_factory=dict)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def record_kept(self, row: int, shortened: bool = False) -> None:
        self.kept += 1
        if shortened:
            self.shortened += 1
            self._add_example("shortened", row)

    def record_dropped(self, row: int, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        self._add_example(reason, row)

    def summary(self) -> str:
        """One line, e.g. ``load_hh_rlhf(x.jsonl): 10 rows, kept 8 (1 shortened), dropped 2: ...``."""
        line = f"{self.step}: {self.total} rows, kept {self.kept} ({self.shortened} shortened"
        if self.shortened:
            line += f", e.g. rows {_row_list(self.examples['shortened'])}"
        line += f"), dropped {self.dropped_total}"
        if self.dropped:
            reasons = "; ".join(
                f"{reason} {count} (e.g. rows {_row_list(self.examples[reason])})"
                for reason, count in sorted(self.dropped.items())
            )
            line += f": {reasons}"
        return line

    def _add_example(self, key: str, row: int) -> None:
        rows = self.examples.setdefault(key, [])
        if len(rows) < _EXAMPLES_PER_REASON:
            rows.append(row)


def _row_list(rows: list[int]) -> str:
    return ", ".join(str(row) for row in rows)


def log_report(report: DataReport) -> None:
    if report.dropped_total or report.shortened:
        logger.warning(report.summary())
    else:
        logger.info(report.summary())
