"""Read a run's published checkpoints (`checkpoints/latest.json`): what `--resume` continues from.

The writing side (three moves: partial folder, barrier, rename then pointer) is
`nbtrain.worker.checkpoint`. Standard library only: the kernel checks `--resume` before
anything starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nbtrain.rundir.layout import CHECKPOINTS, RUN_FILE

POINTER = "latest.json"
PARTIAL_PREFIX = ".partial-"


@dataclass(frozen=True)
class Published:
    """A checkpoint that every rank finished writing: what `latest.json` says."""

    run: Path  # the run directory that saved it
    tag: str
    step: int
    world_size: int
    zero_stage: int

    @property
    def path(self) -> Path:
        return self.run / CHECKPOINTS / self.tag


def published(run: Path) -> Published | None:
    """Return the run's last published checkpoint, or None when it has none."""
    try:
        pointer = json.loads((run / CHECKPOINTS / POINTER).read_text())
        found = Published(run, str(pointer["tag"]), int(pointer["step"]), int(pointer["world_size"]),
                          int(pointer["zero_stage"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return found if found.path.is_dir() else None


def find_run(root: Path, wanted: str) -> tuple[Path | None, str]:
    """Return the run directory `--resume wanted` means, or None and why there is none."""
    if wanted == "latest":
        runs = sorted((p for p in root.iterdir() if (p / RUN_FILE).is_file()), reverse=True) \
            if root.is_dir() else []
        for run in runs:
            if published(run) is not None:
                return run, ""
        return None, f"no run under {root} has a published checkpoint"
    candidate = Path(wanted).expanduser()
    for path in (candidate, root / wanted):
        if (path / RUN_FILE).is_file():
            return path.resolve(), ""
    return None, f"no run {wanted!r} under {root}"
