"""Find runs under the run roots and read them for the API, safely.

Run directories are data written by other processes, possibly by other people: a run id
from a URL must not lead outside its root (`..`, absolute paths, symlinks), and nothing in
a run folder is ever unpickled or executed here. Every file read goes through `_inside`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbtrain.rundir import FINAL_STATES, RunDirectory, list_runs, read_json, read_records
from nbtrain.rundir.progress import StepReader, planned_steps, startup

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
RANK_LIMIT = 4096
LOSS_TAIL = 60  # points of the sidebar's sparkline
LOG_READ_BYTES = 256 * 1024
MAX_LOG_LINES = 5000
TEXT_LIMIT = 200_000  # cell source shown in the run panel


class RequestError(ValueError):
    """A malformed request: the handlers answer it with its status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _inside(base: Path, path: Path) -> bool:
    """Return whether `path`, symlinks resolved, lies within `base` (itself resolved)."""
    try:
        return path.resolve().is_relative_to(base.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def _json(run: RunDirectory, path: Path) -> Any:
    """Read a JSON document of `run`, or None if it is missing or points outside the run."""
    if not _inside(run.path, path):
        return None
    return read_json(path)


def parse_run_id(run_id: str) -> str:
    """Return `run_id` if it has the form of a run folder name; refuse anything else."""
    if not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise RequestError(400, f"run id {run_id[:80]!r} is malformed: a run id is a folder name made of "
                                "letters, digits, '_', '.' and '-' (as listed by /nbtrain/api/runs)")
    return run_id


def parse_int(name: str, value: str | None, default: int, low: int, high: int) -> int:
    """Return the integer query argument `name`, or refuse it naming the rule."""
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise RequestError(400, f"{name}={value[:40]!r} is invalid: it must be a whole number from {low} to {high}")
    return number


def parse_cursor(value: str | None) -> dict[int, int]:
    """Parse a metrics cursor `rank:offset,rank:offset` (as returned by the metrics route)."""
    offsets: dict[int, int] = {}
    if not value:
        return offsets
    for part in value.split(","):
        rank, sep, offset = part.partition(":")
        if not (sep and rank.isdigit() and offset.isdigit() and int(rank) < RANK_LIMIT):
            raise RequestError(400, f"cursor={value[:80]!r} is invalid: it must be 'rank:byte_offset' pairs "
                                    "separated by commas, e.g. '0:1234,1:987', as returned in 'cursor'")
        offsets[int(rank)] = int(offset)
    return offsets


@dataclass
class RunRoots:
    """The folders that hold run directories, in the order they are searched."""

    roots: list[Path] = field(default_factory=list)

    def add(self, root: Path) -> None:
        root = root.expanduser().absolute()
        if root not in self.roots:
            self.roots.append(root)

    def runs(self) -> Iterable[RunDirectory]:
        """Yield every run under the roots whose folder really lies in its root."""
        for root in self.roots:
            for run in list_runs(root):
                if run.path.is_dir() and not run.path.is_symlink() and _inside(root, run.path):
                    yield run

    def find(self, run_id: str) -> RunDirectory:
        """Return the run called `run_id`; 400 for a malformed id, 404 for an unknown one."""
        parse_run_id(run_id)
        for root in self.roots:
            path = root / run_id
            if path.is_dir() and not path.is_symlink() and _inside(root, path) and RunDirectory(path).run_file.is_file():
                return RunDirectory(path)
        raise RequestError(404, f"no run {run_id!r} under the run roots {[str(r) for r in self.roots]}")


def total_steps(run: RunDirectory) -> int | None:
    """Return the planned number of optimizer steps (the engine's, else the flag's)."""
    return planned_steps(_json(run, run.effective_deepspeed_file), run.run_info())


@dataclass
class _Progress:
    """What the sidebar shows of one rank-0 metrics file, kept up to date incrementally."""

    steps: StepReader
    losses: list[tuple[int, float]] = field(default_factory=list)


class ProgressCache:
    """Read only what is new in each run's rank-0 metrics since the last listing."""

    def __init__(self) -> None:
        self._progress: dict[Path, _Progress] = {}

    def progress(self, run: RunDirectory) -> _Progress:
        path = run.metrics_file(0)
        seen = self._progress.setdefault(run.path, _Progress(StepReader(path)))
        if not _inside(run.path, path):
            return seen
        for record in seen.steps.read():
            loss = record.get("loss")
            if isinstance(loss, (int, float)) and not isinstance(loss, bool):
                seen.losses = [*seen.losses[-(4 * LOSS_TAIL):], (record["step"], float(loss))]
        return seen


def startup_phase(run: RunDirectory, status: dict[str, Any], step: int) -> dict[str, Any] | None:
    """Return the start-up phase of a run that has not made its first step yet, as the views show it."""
    if status.get("state") in FINAL_STATES or step > 0:
        return None  # no read of the timeline for a run that trains or ended
    found = startup(status, _json(run, run.timeline_file), step)
    return found.as_json(time.time()) if found else None


def _thin(points: list[tuple[int, float]], count: int) -> list[list[float]]:
    """Return at most `count` points spread evenly over `points`, the last one kept."""
    if len(points) <= count:
        return [list(p) for p in points]
    stride = len(points) / count
    return [list(points[min(len(points) - 1, int(i * stride))]) for i in range(count - 1)] + [list(points[-1])]


def summary(run: RunDirectory, cache: ProgressCache) -> dict[str, Any]:
    """Return one run as the sidebar lists it."""
    status, info = _json(run, run.status_file) or {}, _json(run, run.run_file) or {}
    seen = cache.progress(run)
    total = total_steps(run)
    state = status.get("state", "unknown")
    return {
        "id": run.run_id, "name": info.get("name") or "", "root": str(run.path.parent),
        "state": state, "reason": status.get("reason", ""), "final": state in FINAL_STATES,
        "created": status.get("created") or info.get("created"), "started": status.get("started"),
        "ended": status.get("ended"), "nproc": info.get("nproc"),
        "step": seen.steps.step, "total": total, "loss": seen.steps.latest["loss"],
        "loss_tail": _thin(seen.losses, LOSS_TAIL),
        "eta_s": None if state in FINAL_STATES else seen.steps.eta_s(total),
        "phase": startup_phase(run, status, seen.steps.step),
    }


def order_for_sidebar(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Running (and starting) runs first, then the rest; newest first within each."""
    newest = sorted(runs, key=lambda r: r.get("created") or 0, reverse=True)
    return [r for r in newest if not r["final"]] + [r for r in newest if r["final"]]


def detail(run: RunDirectory, cache: ProgressCache) -> dict[str, Any]:
    """Return what the run panel shows: status, run.json, DeepSpeed configs, cell, errors."""
    cell = run.cell_file.read_text(errors="replace")[:TEXT_LIMIT] if _inside(run.path, run.cell_file) and \
        run.cell_file.is_file() else ""
    errors = {rank: report for rank, report in run.errors().items()
              if _inside(run.path, run.error_file(rank))}
    status = _json(run, run.status_file) or {}
    return {
        "id": run.run_id, "root": str(run.path.parent), "status": status,
        "run": _json(run, run.run_file) or {}, "deepspeed": _json(run, run.deepspeed_file),
        "effective": _json(run, run.effective_deepspeed_file), "cell": cell, "errors": errors,
        "ranks": run.ranks(), "total": total_steps(run), "phase": startup_phase(run, status, cache.progress(run).steps.step),
    }


def metrics(run: RunDirectory, cursor: dict[int, int], after_step: int | None) -> dict[str, Any]:
    """Return the metric records that are new since `cursor` (byte offsets) or `after_step`."""
    records: list[dict[str, Any]] = []
    next_cursor = dict(cursor)
    for rank in run.ranks():
        path = run.metrics_file(rank)
        if not _inside(run.path, path):
            continue
        found, next_cursor[rank] = read_records(path, cursor.get(rank, 0))
        records += [r for r in found if after_step is None or (isinstance(r.get("step"), int) and r["step"] > after_step)]
    status = _json(run, run.status_file) or {}
    return {"id": run.run_id, "state": status.get("state", "unknown"), "records": records,
            "cursor": ",".join(f"{rank}:{offset}" for rank, offset in sorted(next_cursor.items()))}


def log_tail(run: RunDirectory, rank: int, lines: int) -> dict[str, Any]:
    """Return the last `lines` lines of one rank's log (DeepSpeed's messages included)."""
    path = run.log_file(rank)
    if not (_inside(run.path, path) and path.is_file()):
        return {"id": run.run_id, "rank": rank, "lines": [], "exists": False}
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - LOG_READ_BYTES))
        text = f.read().decode(errors="replace")
    kept = text.splitlines()
    if size > LOG_READ_BYTES:
        kept = kept[1:]  # the first line read is probably cut
    return {"id": run.run_id, "rank": rank, "lines": kept[-lines:], "exists": True}
