"""Progress of long stages: a rich bar in a terminal, plain lines everywhere else.

Without a TTY (a log file, ``nohup``, CI, SageMaker) a bar prints nothing useful, so progress is printed
as plain lines: on the first update, at least every 10% of the work and at the end, each with the count,
the elapsed time and an ETA (and, for PPO, the mean score and KL of the last logged iteration).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from transformers import TrainerCallback

PLAIN_LINES = 10  # at least this many evenly spaced lines per run


class PlainProgress:
    """``update(done, total)`` prints ``[label] <unit>done/total (p%) | elapsed, ETA [| details]``.

    ``start`` is where this process began (a resumed run), so the ETA uses only the work it did itself.
    """

    def __init__(self, label: str, unit: str = "", start: int = 0, stream=None):
        self.label, self.unit, self.start, self.stream = label, unit, start, stream
        self.started_at = time.perf_counter()
        self.printed: int | None = None

    def update(self, done: int, total: int, details: Sequence[str] = ()) -> None:
        step = max(1, total // PLAIN_LINES)
        due = self.printed is None or done >= total or done // step > self.printed // step
        if not due:
            return
        self.printed = done
        elapsed = time.perf_counter() - self.started_at
        worked = done - self.start
        eta = elapsed / worked * (total - done) if worked > 0 else float("nan")
        parts = [f"{self.unit}{done}/{total} ({100 * done // max(total, 1)}%)", f"{elapsed:.0f} s, ETA {eta:.0f} s",
                 *details]
        self.say(" | ".join(parts))

    def say(self, text: str) -> None:
        print(f"[{self.label}] {text}", file=self.stream or sys.stdout, flush=True)


def plain_progress(label: str, stream=None):
    """``report(done, total)``: the ``update`` of a fresh :class:`PlainProgress` (e.g. evaluated prompts)."""
    return PlainProgress(label, stream=stream).update


class PlainProgressCallback(TrainerCallback):
    """PPO iterations as plain lines (see :class:`PlainProgress`), and a line when a run resumes."""

    def __init__(self, stream=None, label: str = "ppo"):
        self.stream, self.label = stream, label
        self.progress: PlainProgress | None = None
        self.latest: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.progress = PlainProgress(self.label, "iteration ", start=state.global_step, stream=self.stream)
        if state.global_step:
            self.progress.say(f"resuming at iteration {state.global_step}/{state.max_steps}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.latest.update({key: value for key, value in (logs or {}).items() if key.startswith("objective/")})

    def on_step_end(self, args, state, control, **kwargs):
        details = [f"{name} {self.latest[key]:.3f}" for key, name in (("objective/scores", "score"),
                                                                      ("objective/kl", "KL")) if key in self.latest]
        self.progress.update(state.global_step, state.max_steps, details)


def install_progress(trainer) -> None:
    """Replace transformers' tqdm/printer callbacks: rich in a terminal, plain lines otherwise."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if trainer.args.disable_tqdm:
        return
    if sys.stdout.isatty():
        from trl.trainer.callbacks import RichProgressCallback

        trainer.add_callback(RichProgressCallback)
    else:
        trainer.add_callback(PlainProgressCallback)
