#!/usr/bin/env bash
# Build the wheel, install it (not editable) into a clean venv and use it from outside the source
# tree, so a module or data file missing from the wheel fails here rather than for users.
#
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0), KEEP_WORK=1 keeps the
# temporary folder for inspection.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/trl-multiadapter-wheel.XXXXXX")"
if [ "${KEEP_WORK:-0}" != 1 ]; then trap 'rm -rf "$WORK"' EXIT; fi

echo "== copying the files git would ship (tracked + untracked, not ignored) to $WORK/src"
# A copy keeps build/ and *.egg-info leftovers of the working tree out of the wheel.
"$PYTHON" "$ROOT/ci/copy_source.py" "$ROOT" "$WORK/src"

echo "== building the wheel"
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
"$PY" -m pip install --quiet "$TORCH_SPEC"
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/trl_multiadapter-*.whl)"
echo "   $(basename "$WHEEL"): $(du -k "$WHEEL" | cut -f1) KiB"

echo "== installing the wheel (not editable) with its dependencies"
"$PY" -m pip install --quiet "$WHEEL"

cd "$WORK"  # outside the source tree: imports must come from the installed wheel
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
echo "== trl-multiadapter env"
"$WORK/venv/bin/trl-multiadapter" env
echo "== import smoke test"
"$PY" "$ROOT/ci/smoke_installed.py" --wheel "$WHEEL" --source "$WORK/src"
echo "== wheel smoke test done in ${SECONDS}s"
