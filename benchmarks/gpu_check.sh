#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py, issue 16) in one command, for one CUDA machine without network
# that has torch, transformers, peft and accelerate but not trl, datasets or bitsandbytes.
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR] [more gpu_check.py options]
#
# 1. installs trl, datasets and bitsandbytes from the wheels in benchmarks/wheels/ (filled beforehand by
#    benchmarks/fetch_gpu_wheels.sh on a machine with network), plus the small packages datasets needs that
#    the machine lacks, with `pip install --no-index --no-deps --target` into a scratch folder put on
#    PYTHONPATH (nothing in the machine's own environment changes);
# 2. runs gpu_check.py --device cuda --size 8b and writes gpu_<device>.json/.md and gpu_check.log to
#    OUTPUT_DIR (default: $OUT when set, else benchmarks/results).
#
# Environment: GPU_CHECK_SIZE (8b | 1b | tiny), GPU_CHECK_TIME_LIMIT (seconds for the Python part, 260),
# PYTHON (python3), GPU_CHECK_WHEELS (benchmarks/wheels), GPU_CHECK_SITE (/tmp/gpu_check_site).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=${1:-${OUT:-benchmarks/results}}
[ "$#" -gt 0 ] && shift
python=${PYTHON:-python3}
wheels=${GPU_CHECK_WHEELS:-benchmarks/wheels}
site=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
size=${GPU_CHECK_SIZE:-8b}
limit=${GPU_CHECK_TIME_LIMIT:-260}
mkdir -p "$out"

# Always the carried versions of these three; the small dependencies only where the machine has none.
required="trl datasets bitsandbytes"
optional="dill multiprocess xxhash"
missing=$("$python" - $optional <<'PY'
import importlib.metadata as metadata
import sys
for name in sys.argv[1:]:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        print(name)
PY
)
if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: no wheels in $wheels: run 'bash benchmarks/fetch_gpu_wheels.sh' on a machine with network" \
         "first (and carry $wheels to this machine)" >&2
else
    start=$(date +%s)
    # shellcheck disable=SC2086  # word splitting of the package lists is intended
    if ! "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
            --upgrade --target "$site" --find-links "$wheels" $required $missing; then
        echo "gpu_check.sh: installing from $wheels failed; the check runs with what the machine has" >&2
    fi
    echo "gpu_check.sh: installed $required ${missing//$'\n'/ } into $site in $(( $(date +%s) - start )) s"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# trl and datasets import pandas and pyarrow, which are too large to carry (~55 MB); say so in one line.
"$python" -c "import pandas, pyarrow" 2>/dev/null ||
    echo "gpu_check.sh: pandas or pyarrow is missing here; trl/datasets need them (not carried: too large)" >&2
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# The script stops its own parts at the time limit and writes partial results on SIGTERM; the timeout
# is the last resort for a hang.
timeout --signal=TERM --kill-after=20 $((limit + 30)) \
    "$python" -u benchmarks/gpu_check.py --device cuda --size "$size" --output-dir "$out" --time-limit "$limit" "$@" \
    2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
