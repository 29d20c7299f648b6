"""Copy the files a release would contain (git-tracked plus untracked-but-not-ignored) to a folder.

Usage: python ci/copy_source.py SOURCE_ROOT DESTINATION
Outside a git checkout, copies the tree without caches, venvs and build leftovers.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

SKIP_OUTSIDE_GIT = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".tox", ".pytest_cache",
                    ".ruff_cache", ".hypothesis"}


def files_to_ship(root: Path) -> list[Path]:
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, check=True,
        ).stdout.decode()
        names = [name for name in listing.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        names = [
            str(path.relative_to(root)) for path in root.rglob("*")
            if path.is_file() and not SKIP_OUTSIDE_GIT.intersection(path.relative_to(root).parts)
            and not path.name.endswith(".egg-info")
        ]
    # A tracked file deleted in the working tree is listed by git but not shipped.
    return [root / name for name in names if (root / name).is_file()]


def main(source: str, destination: str) -> int:
    root, target = Path(source).resolve(), Path(destination)
    files = files_to_ship(root)
    for path in files:
        copy = target / path.relative_to(root)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, copy)
    print(f"   copied {len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
