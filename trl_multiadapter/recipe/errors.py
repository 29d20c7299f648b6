"""``RecipeError``: every recipe problem, with the key path (``ppo.mini_batch_size``) and a fix."""

from __future__ import annotations

import os


class RecipeError(ValueError):
    """A recipe problem: ``key_path`` says where (``ppo.mini_batch_size``), ``fix`` says what to change."""

    exit_code = 2

    def __init__(self, key_path: str, problem: str, fix: str = "", source: str | os.PathLike | None = None):
        self.key_path = key_path
        self.problem = problem
        self.fix = fix
        self.source = None if source is None else str(source)
        super().__init__(str(self))

    def with_source(self, source: str | os.PathLike) -> RecipeError:
        return RecipeError(self.key_path, self.problem, self.fix, source)

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        key = self.key_path or "<recipe>"
        text = f"{where}{key}: {self.problem}"
        return f"{text} Fix: {self.fix}" if self.fix else text


def fail(key_path: str, problem: str, fix: str) -> None:
    raise RecipeError(key_path, problem, fix)
