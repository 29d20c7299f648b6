"""Helpers every built-in stage uses: where the base model is, and its tokenizer."""

from __future__ import annotations

import os

from .runner import (
    BASE_MODEL_DIR,
    StageContext,
    StageFailedError,
)

# ---------------------------------------------------------------------------------------- shared helpers


def base_model_path(context: StageContext) -> str:
    """The base model as a path or hub id; a builtin test model lives under the run folder (see
    ``materialise_base_model``, which the data stage calls)."""
    model = context.recipe.model
    if not model.is_builtin:
        return model.name_or_path
    path = context.run_dir / BASE_MODEL_DIR
    if not (path / "config.json").is_file():
        raise StageFailedError(f"{path} is missing: the data stage saves the builtin base model there; "
                               f"run the 'data' stage (or delete {context.run_dir / 'data'} to redo it).")
    return str(path.resolve())


def materialise_base_model(context: StageContext) -> None:
    """Save a builtin test model once under the run folder, so every stage and the export refer to a path.
    Called by every process (it synchronises them)."""
    model = context.recipe.model
    path = context.run_dir / BASE_MODEL_DIR
    if model.is_builtin and context.is_main_process and not (path / "config.json").is_file():
        from ..builtin_models import save_builtin

        tmp = context.run_dir / f".tmp-{BASE_MODEL_DIR}"
        save_builtin(model.name_or_path, tmp, seed=model.seed)
        os.replace(tmp, path)
    context.wait_for_everyone()


def load_tokenizer(context: StageContext):
    from ..builder import load_tokenizer as load

    model = context.recipe.model
    if model.is_builtin:
        return load(model.name_or_path)
    return load(model.tokenizer or model.name_or_path, revision=model.revision,
                trust_remote_code=model.trust_remote_code)
