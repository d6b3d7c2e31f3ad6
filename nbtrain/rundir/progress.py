"""Where a run stands, read from its run directory the same way for every view (standard library only).

The cell's dashboard, the `--no-plot` progress line, the server API (and through it
JupyterLab's sidebar, run panel and status bar) all take a run's start-up phase and its
step and ETA from here, so that they say the same thing at the same moment.

- `StepReader` folds rank 0's metric records, read incrementally, into the step, the latest
  scalars and the pace of the recent steps; `eta_s` turns that pace into the seconds left.
- `read_startup(run)` says which start-up phase a run is in (waiting in SLURM's queue, starting the workers, imports,
  joining the process group, the cell up to `prepare`, building DeepSpeed's ops or the
  engine, the first step) and how long each took, from status.json and rank 0's timeline
  (`logs/rank-0.timeline.json`, written by the worker at each phase change).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from nbtrain.rundir import FINAL_STATES, RunDirectory, read_json, read_records

ETA_WINDOW = 20  # recent steps whose median duration predicts the rest (the first, slow step soon drops out)
SCALARS = ("loss", "eval_loss", "lr", "samples_per_s", "tokens_per_s")


def eta_s(step: int, max_steps: int | None, recent_step_times: list[float]) -> float | None:
    """Return the seconds left: the remaining steps at the median pace of the recent ones.

    >>> eta_s(10, 110, [0.5, 0.4, 0.6])
    50.0
    """
    if not max_steps or step <= 0 or not recent_step_times:
        return None
    return max(0, max_steps - step) * statistics.median(recent_step_times)


def planned_steps(effective: Any, run_info: Any) -> int | None:
    """Return the run's optimizer steps: the engine's count once it is built, else `--steps`."""
    engine = effective.get("engine") if isinstance(effective, dict) else None
    steps = engine.get("max_steps") if isinstance(engine, dict) else None
    if not _is_int(steps):
        config = run_info.get("config") if isinstance(run_info, dict) else None
        steps = config.get("steps") if isinstance(config, dict) else None
    return steps if _is_int(steps) and steps > 0 else None


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> float | None:
    """Return `value` as a finite float, or None (run files are data written by others)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


class StepReader:
    """Rank 0's metric records, read incrementally: step, latest scalars, pace of the recent steps.

    A tick reads only the bytes written since the last one, so it costs the same at step 10
    and at step 100 000. Records that are not what docs/run-directory.md says are skipped.
    """

    def __init__(self, metrics_file: Path):
        self.path = metrics_file
        self.offset = 0
        self.step = 0
        self.latest: dict[str, float | None] = dict.fromkeys(SCALARS)  # the latest number logged of each
        self.recent_step_times: deque[float] = deque(maxlen=ETA_WINDOW)
        self.first_step_time: float | None = None  # unix s when the first optimizer step ended

    def read(self) -> list[dict[str, Any]]:
        """Fold in the complete records written since the last call; return them (valid ones only)."""
        records, self.offset = read_records(self.path, self.offset)
        valid = [r for r in records if isinstance(r, dict) and _is_int(r.get("step"))]
        for record in valid:
            self._add(record)
        return valid

    def _add(self, record: dict[str, Any]) -> None:
        self.step = max(self.step, record["step"])
        for key in SCALARS:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.latest[key] = float(value)  # NaN too: a diverged loss is news
        step_time = _number(record.get("step_time_s"))
        if step_time is not None:
            self.recent_step_times.append(step_time)
            if self.first_step_time is None:
                self.first_step_time = _number(record.get("time"))

    def eta_s(self, max_steps: int | None) -> float | None:
        """Return the seconds left to `max_steps` at the recent pace (see `eta_s`)."""
        return eta_s(self.step, max_steps, list(self.recent_step_times))


# -- start-up phases ----------------------------------------------------------------------------

# Timeline marks (worker/timeline.py) and the phase each one begins; `first_step` ends the start-up.
MARKS = (("python_started", "imports"), ("imports_done", "process_group"), ("job_received", "cell"),
         ("prepare_called", "engine"), ("engine_built", "first_step"))
# What each phase is called while it runs, and once it is done.
LABELS = {
    "workers": ("starting the worker processes", "workers started"),
    "imports": ("importing torch, DeepSpeed and accelerate", "imports"),
    "process_group": ("joining the process group", "process group"),
    "cell": ("running the cell up to bigtrain.prepare", "cell up to prepare"),
    "engine": ("building the DeepSpeed engine", "engine"),
    "first_step": ("running the first step", "first step"),
}


@dataclass(frozen=True)
class Phase:
    """One part of a run's start-up: what happens, when it began and (once done) ended."""

    key: str  # queue (SLURM), workers, imports, process_group, cell, op, engine or first_step
    label: str  # what is happening, in words
    done_label: str  # what happened, in words
    began: float
    ended: float | None = None


def op_phase(name: str, began: float, ended: float | None, cached: bool) -> Phase:
    """Return the phase of a DeepSpeed op that is built just in time (or loaded from the build cache)."""
    if cached:
        return Phase("op", f"loading DeepSpeed op {name} (built before, from the cache)", f"op {name} loaded",
                     began, ended)
    return Phase("op", f"building DeepSpeed op {name} (once for this environment: later runs reuse it)",
                 f"op {name} built", began, ended)


@dataclass(frozen=True)
class Startup:
    """Where a run's start-up stands: the phase going on, the phases done, when the run started."""

    current: Phase
    done: tuple[Phase, ...]
    run_started: float

    def line(self, now: float) -> str:
        """Return e.g. "building the DeepSpeed engine · 4 s (12 s since the run started)"."""
        return (f"{self.current.label} · {duration(now - self.current.began)} "
                f"({duration(now - self.run_started)} since the run started)")

    def trail(self) -> str:
        """Return the phases done with their durations, e.g. "workers started 0.3 s · imports 5.1 s"."""
        return " · ".join(f"{p.done_label} {duration((p.ended or p.began) - p.began)}" for p in self.done)

    def as_json(self, now: float) -> dict[str, Any]:
        """Return what the server API sends (`phase` of a run; docs/run-directory.md)."""
        return {"key": self.current.key, "label": self.current.label, "line": self.line(now),
                "phase_s": max(0.0, now - self.current.began), "elapsed_s": max(0.0, now - self.run_started),
                "trail": self.trail(),
                "done": [{"key": p.key, "label": p.done_label, "seconds": max(0.0, (p.ended or p.began) - p.began)}
                         for p in self.done]}


def duration(seconds: float) -> str:
    """Return a short duration: "0.4 s", "12 s", "2:05"."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def startup(status: Any, timeline: Any, step: int = 0) -> Startup | None:
    """Return the start-up of a run from its status.json and rank 0's timeline.

    None once it trains (a first step in the timeline, or `step`, rank 0's latest step, above 0)
    or ended, and for a folder without a start time.
    """
    status = status if isinstance(status, dict) else {}
    timeline = timeline if isinstance(timeline, dict) else {}
    run_started = _number(status.get("started")) or _number(status.get("created"))
    if status.get("state") in FINAL_STATES or step > 0 or _number(timeline.get("first_step")) is not None \
            or run_started is None:
        return None
    begins = sorted((t, key) for mark, key in MARKS if (t := _number(timeline.get(mark))) is not None)
    queue = queue_phase(status)  # a --slurm run waits for its allocation before any worker starts
    workers_began = run_started if queue is None else queue.ended
    begins = ([] if workers_began is None else [(workers_began, "workers")]) + [
        (max(t, run_started), key) for t, key in begins]
    main = ([] if queue is None else [queue]) + [
        Phase(key, *LABELS[key], began, ended=begins[i + 1][0] if i + 1 < len(begins) else None)
        for i, (began, key) in enumerate(begins)]
    ops = [op for entry in timeline.get("ops") or () if isinstance(entry, dict) and (op := _op(entry)) is not None]
    running_ops = [op for op in ops if op.ended is None]
    current = running_ops[-1] if running_ops else main[-1]
    done = sorted((p for p in main + ops if p.ended is not None), key=lambda p: p.began)
    return Startup(current, tuple(done), run_started)


def queue_phase(status: dict[str, Any]) -> Phase | None:
    """Return the SLURM queue phase of a run whose allocation nbtrain requested, or None.

    The kernel (status.json's only writer) records `slurm`: {job, state, reason, requested,
    granted} while salloc waits, from squeue each second; e.g. "SLURM job 12: pending (Resources)".
    """
    slurm = status.get("slurm")
    requested = _number(slurm.get("requested")) if isinstance(slurm, dict) else None
    if not isinstance(slurm, dict) or requested is None:
        return None
    state, reason = str(slurm.get("state") or "PENDING").lower(), slurm.get("reason")
    said = f"{state} ({reason})" if isinstance(reason, str) and reason not in ("", "None") else state
    job = str(slurm.get("job", "?"))[:40]
    return Phase("queue", f"waiting for SLURM's allocation: job {job} {said}", f"SLURM allocation {job}",
                 requested, _number(slurm.get("granted")))


def _op(entry: dict[str, Any]) -> Phase | None:
    began, name = _number(entry.get("started")), entry.get("name")
    if began is None or not isinstance(name, str):
        return None
    return op_phase(name[:100], began, _number(entry.get("ended")), entry.get("cached") is True)


def read_startup(run: RunDirectory, step: int = 0) -> Startup | None:
    """Return `startup(...)` of `run`, reading its status and rank 0's timeline."""
    return startup(run.status(), read_json(run.timeline_file), step)
