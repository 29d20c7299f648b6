#!/usr/bin/env bash
# Fill benchmarks/wheels/ (git-ignored) with the wheels benchmarks/gpu_check.sh installs on a GPU machine
# without network: trl, datasets and bitsandbytes (its manylinux x86_64 wheel with the CUDA kernels), at
# the versions installed in the project's environment, plus the small packages datasets needs that a
# machine with only torch, transformers, peft and accelerate lacks (dill, multiprocess, xxhash; found
# with `pip show datasets trl bitsandbytes`). pandas and pyarrow are needed too but not carried
# (~55 MB together): the GPU image must have them.
#
#   bash benchmarks/fetch_gpu_wheels.sh [DEST]
#
# Environment: PYTHON, the interpreter whose installed versions are pinned (default: .venv/bin/python
# when the repo has one, else python3); GPU_PYTHON_VERSIONS, the GPU machine's Python versions for the
# version-specific wheels (default "3.10 3.11 3.12 3.13").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

dest=${1:-benchmarks/wheels}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
pythons=${GPU_PYTHON_VERSIONS:-"3.10 3.11 3.12 3.13"}
packages="trl datasets bitsandbytes dill multiprocess xxhash"

pins=$("$PYTHON" - $packages <<'PY'
import importlib.metadata as metadata
import sys
for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        sys.exit(f"fetch_gpu_wheels.sh: {name} is not installed in {sys.executable}; install the project "
                 "with its quant extra there, or set PYTHON to an interpreter that has it")
PY
)
echo "pinned: $(echo $pins)"
mkdir -p "$dest"
rm -f "$dest"/*.whl  # one version of each package: stale wheels would make the install ambiguous
for version in $pythons; do
    for pin in $pins; do
        "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --disable-pip-version-check \
            --python-version "$version" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d "$dest" "$pin" ||
            echo "fetch_gpu_wheels.sh: no wheel of $pin for Python $version (skipped)" >&2
    done
done
for pin in $pins; do
    name=${pin%%==*}
    ls "$dest"/"$name"-*.whl >/dev/null 2>&1 || { echo "fetch_gpu_wheels.sh: no wheel of $pin at all" >&2; exit 1; }
done
ls -1 "$dest"
echo "total: $(du -cb "$dest"/*.whl | tail -1 | cut -f1) bytes ($(du -sh "$dest" | cut -f1)) in $dest"
