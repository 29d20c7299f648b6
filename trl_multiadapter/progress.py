"""Progress of PPO training: a rich bar in a terminal, plain lines everywhere else.

Without a TTY (a log file, ``nohup``, CI, SageMaker) a bar prints nothing useful, so the plain
callback prints one line at least every 10% of the iterations (and on the first and last): iteration,
elapsed time, ETA, mean score and KL of the last logged iteration.
"""

from __future__ import annotations

import sys
import time

from transformers import TrainerCallback

PLAIN_LINES = 10  # at least this many evenly spaced lines per run


class PlainProgressCallback(TrainerCallback):
    def __init__(self, stream=None, label: str = "ppo"):
        self.stream, self.label = stream, label
        self.start = self.first_step = None
        self.latest: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.first_step = time.perf_counter(), state.global_step
        if state.global_step:
            self._print(f"resuming at iteration {state.global_step}/{state.max_steps}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.latest.update({key: value for key, value in (logs or {}).items() if key.startswith("objective/")})

    def on_step_end(self, args, state, control, **kwargs):
        total, step = state.max_steps, state.global_step
        every = max(1, total // PLAIN_LINES)
        if step != self.first_step + 1 and step % every and step != total:
            return
        elapsed = time.perf_counter() - self.start
        done = step - self.first_step
        eta = elapsed / done * (total - step) if done else float("nan")
        parts = [f"iteration {step}/{total} ({100 * step // max(total, 1)}%)", f"{elapsed:.0f} s, ETA {eta:.0f} s"]
        for key, name in (("objective/scores", "score"), ("objective/kl", "KL")):
            if key in self.latest:
                parts.append(f"{name} {self.latest[key]:.3f}")
        self._print(" | ".join(parts))

    def _print(self, text: str) -> None:
        print(f"[{self.label}] {text}", file=self.stream or sys.stdout, flush=True)


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


def plain_progress(label: str, stream=None):
    """``report(done, total)`` printing ``[label] done/total (p%), elapsed, ETA`` at least every 10%."""
    start, printed = time.perf_counter(), [0]

    def report(done: int, total: int) -> None:
        step = max(1, total // PLAIN_LINES)
        if done < total and done - printed[0] < step:
            return
        printed[0] = done
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (total - done) if done else float("nan")
        print(f"[{label}] {done}/{total} ({100 * done // max(total, 1)}%) | {elapsed:.0f} s, ETA {eta:.0f} s",
              file=stream or sys.stdout, flush=True)

    return report
