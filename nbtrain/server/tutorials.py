"""The tutorial notebooks that "Open tutorial…" copies into the workspace."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from nbtrain.server.runs import RequestError

DATA = "data"  # the tutorials' data folder, next to them


def default_tutorial_dirs() -> list[Path]:
    """Where tutorials are: installed with the wheel, or notebooks/ of a source checkout."""
    package = Path(__file__).resolve().parents[1]
    return [Path(sys.prefix) / "share" / "nbtrain" / "notebooks", package.parent / "notebooks"]


def _title(path: Path) -> str:
    """Return the notebook's first markdown heading (read as JSON, never executed)."""
    try:
        cells = json.loads(path.read_text()).get("cells", [])
    except (OSError, ValueError, AttributeError):
        return path.stem
    for cell in cells:
        if isinstance(cell, dict) and cell.get("cell_type") == "markdown":
            source = cell.get("source", "")
            text = "".join(source) if isinstance(source, list) else str(source)
            for line in text.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return path.stem


def list_tutorials(folder: Path | None) -> list[dict[str, Any]]:
    """Return the tutorials of `folder` as {name, title}, sorted by name."""
    if folder is None or not folder.is_dir():
        return []
    return [{"name": p.name, "title": _title(p)} for p in sorted(folder.glob("*.ipynb")) if p.is_file()]


def copy_tutorial(folder: Path | None, name: str, workspace: Path) -> str:
    """Copy tutorial `name` and the data it reads into `workspace` without overwriting; return the new file's name."""
    known = {t["name"] for t in list_tutorials(folder)}
    if folder is None or name not in known:
        raise RequestError(404, f"no tutorial {name[:80]!r}; the tutorials are: {sorted(known) or 'none installed'}")
    target = workspace / name
    number = 1
    while target.exists():
        target = workspace / f"{Path(name).stem}-{number}.ipynb"
        number += 1
    shutil.copyfile(folder / name, target)
    _copy_missing(folder / DATA, workspace / DATA)
    return target.name


def _copy_missing(source: Path, target: Path) -> None:
    """Copy the files of `source` that `target` lacks (the tutorials read data/… relative to themselves)."""
    if not source.is_dir():
        return
    for path in sorted(source.rglob("*")):
        copy = target / path.relative_to(source)
        if path.is_file() and not copy.exists():  # never overwrite the user's own files
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)
