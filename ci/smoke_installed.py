"""Check an installed (non-editable) trl-multiadapter: every module imports, every shipped file is
there, the CLI and the offline test harness work. Run from outside the source tree.

Usage: python ci/smoke_installed.py --wheel WHEEL --source SOURCE_COPY
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

PACKAGE = "trl_multiadapter"


def check_installed_location(source: Path) -> Path:
    package = importlib.import_module(PACKAGE)
    location = Path(package.__file__).resolve().parent
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    if source.resolve() in location.parents or location.parent != site:
        raise SystemExit(f"{PACKAGE} imported from {location}, expected the installed copy in {site}")
    print(f"   {PACKAGE} {package.__version__} imported from {location}")
    return location


def check_every_module_imports(location: Path) -> None:
    failures = []
    names = [PACKAGE] + [m.name for m in pkgutil.walk_packages([str(location)], prefix=f"{PACKAGE}.")]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:  # report every broken module, not only the first
            failures.append(f"{name}: {type(error).__name__}: {error}")
    if failures:
        raise SystemExit("modules that fail to import from the wheel:\n  " + "\n  ".join(failures))
    print(f"   {len(names)} modules import")


def check_shipped_files(location: Path, source: Path, wheel: Path) -> None:
    expected = {
        path.relative_to(source / PACKAGE).as_posix()
        for path in (source / PACKAGE).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    with zipfile.ZipFile(wheel) as archive:
        in_wheel = {name[len(PACKAGE) + 1:] for name in archive.namelist() if name.startswith(f"{PACKAGE}/")}
    installed = {
        path.relative_to(location).as_posix()
        for path in location.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    missing = sorted(expected - in_wheel) + sorted(f"{name} (installed)" for name in expected - installed)
    if missing:
        raise SystemExit(
            "package files missing from the wheel; add them to [tool.setuptools.package-data] in "
            "pyproject.toml:\n  " + "\n  ".join(missing)
        )
    print(f"   all {len(expected)} package files are in the wheel and installed")


def check_cli() -> None:
    for args in (["--help"], ["--version"]):
        result = subprocess.run([sys.executable, "-m", PACKAGE, *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"python -m {PACKAGE} {' '.join(args)} failed:\n{result.stderr}")
    print(f"   python -m {PACKAGE} --help / --version work")


def check_testing_harness() -> None:
    import torch

    from trl_multiadapter.testing import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    messages = [{"role": "user", "content": "Where is the river?"}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=True)
    model = build_tiny_model("tiny")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    if logits.shape != (1, len(ids), len(tokenizer)) or not torch.isfinite(logits).all():
        raise SystemExit(f"tiny model gave logits of shape {tuple(logits.shape)} or non-finite values")
    print(f"   tiny tokenizer + model: {len(ids)} prompt tokens, finite logits")


def report_sizes(location: Path, wheel: Path) -> None:
    installed = sum(p.stat().st_size for p in location.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    print(f"   wheel {wheel.stat().st_size / 1024:.1f} KiB, installed package {installed / 1024:.1f} KiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wheel", type=Path, required=True)
    parser.add_argument("--source", type=Path, required=True, help="the copied source tree the wheel was built from")
    args = parser.parse_args()
    location = check_installed_location(args.source)
    check_every_module_imports(location)
    check_shipped_files(location, args.source, args.wheel)
    check_cli()
    check_testing_harness()
    report_sizes(location, args.wheel)
    print("wheel smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
