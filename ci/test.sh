#!/usr/bin/env bash
# Install the project into ./.venv and run the whole test suite once.
#
#   bash ci/test.sh                   # everything (what CI runs)
#   bash ci/test.sh -m "not slow"     # extra arguments go to pytest
#
# Needs only Python >= 3.10 with venv. Re-running reuses .venv. Environment:
#   PYTHON       interpreter that creates the venv (default: python3)
#   VENV         venv folder (default: .venv in the repository)
#   TORCH_SPEC   torch requirement installed first (default: torch==2.13.0, the CPU build this project
#                tests with; an unpinned torch makes pip pull a multi-GB CUDA build)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

echo "== installing $TORCH_SPEC (first, so nothing else picks another torch)"
"$PY" -m pip install --quiet "$TORCH_SPEC"
echo "== installing trl-multiadapter[test,quant] (editable)"
"$PY" -m pip install --quiet -e ".[test,quant]"
"$PY" -m pip install --quiet "ruff>=0.6"
echo "== installed in ${SECONDS}s"

echo "== ruff check"
"$PY" -m ruff check "$ROOT"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
echo "== pytest"
exec "$PY" -m pytest -ra --durations=25 "$@"
