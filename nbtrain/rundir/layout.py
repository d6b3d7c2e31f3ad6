"""The run directory: the single source of truth of a run (format in docs/run-directory.md).

Every view (the cell output, `RunResult`, the dashboard, the server API) reads it; the
launcher and the workers write it. Writes are crash-safe: JSON documents are replaced
atomically (write a temporary file, then rename), metric records are appended one line
each and flushed, and readers skip a partial last line.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbtrain.rundir.records import read_json, read_records, write_json_atomic

FORMAT_VERSION = 1
STATES = ("starting", "running", "succeeded", "failed", "stopped")
FINAL_STATES = ("succeeded", "failed", "stopped")


def new_run_id(name: str | None = None, now: float | None = None) -> str:
    """Return a sortable, unique run id: `YYYYmmdd-HHMMSS-<name>-<4 hex>`."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return f"{stamp}-{name or 'run'}-{secrets.token_hex(2)}"


# Every path inside a run directory, relative to it, spelled here once (docs/run-directory.md).
# `{r}` is a rank. The relay, the workers, the supervisor and every view build paths from these.
RUN_FILE = "run.json"
STATUS_FILE = "status.json"
DEEPSPEED_FILE = "deepspeed.json"
EFFECTIVE_DEEPSPEED_FILE = "deepspeed.effective.json"
CELL_FILE = "cell.py"
INPUTS_FILE = "inputs.pkl"
OUTPUTS_FILE = "results/outputs.pkl"
CHECKPOINTS = "checkpoints"
METRICS = "metrics/rank-{r}.jsonl"
UTILIZATION = "utilization/rank-{r}.jsonl"
LOG = "logs/rank-{r}.log"  # the rank's whole stdout and stderr
OUTPUT = "logs/rank-{r}.out"  # what the cell printed (rank 0's is relayed to the notebook)
HEARTBEAT = "heartbeats/rank-{r}.json"
ERROR = "errors/rank-{r}.json"
DONE = "results/rank-{r}.done"
TIMELINE = "logs/rank-0.timeline.json"
LAUNCHER_LOG = "logs/launcher.log"  # a multi-node runner's own output, on the head
HOST_LAUNCH_LOG = "logs/launch-{host}.log"  # a command a relay started on a host
# The folders of a run, all made when it is created (on the head; a relay makes them on a host).
FOLDERS = ("metrics", "logs", "errors", "results", CHECKPOINTS, "heartbeats", "utilization")


def rank_file(template: str, rank: int) -> str:
    """Return the relative path of `rank`'s file of kind `template` (e.g. METRICS)."""
    return template.format(r=rank)


@dataclass(frozen=True)
class RunDirectory:
    """Paths and reads/writes of one run's folder."""

    path: Path

    # -- layout ------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def status_file(self) -> Path:
        return self.path / STATUS_FILE

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def deepspeed_file(self) -> Path:
        return self.path / DEEPSPEED_FILE

    @property
    def effective_deepspeed_file(self) -> Path:
        return self.path / EFFECTIVE_DEEPSPEED_FILE

    @property
    def cell_file(self) -> Path:
        return self.path / CELL_FILE

    @property
    def inputs_file(self) -> Path:
        return self.path / INPUTS_FILE

    @property
    def outputs_file(self) -> Path:
        return self.path / OUTPUTS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def timeline_file(self) -> Path:
        return self.path / TIMELINE

    @property
    def launcher_log(self) -> Path:
        return self.path / LAUNCHER_LOG

    def metrics_file(self, rank: int) -> Path:
        return self.path / rank_file(METRICS, rank)

    def utilization_file(self, rank: int) -> Path:
        return self.path / rank_file(UTILIZATION, rank)

    def log_file(self, rank: int) -> Path:
        return self.path / rank_file(LOG, rank)

    def output_file(self, rank: int) -> Path:
        return self.path / rank_file(OUTPUT, rank)

    def heartbeat_file(self, rank: int) -> Path:
        return self.path / rank_file(HEARTBEAT, rank)

    def error_file(self, rank: int) -> Path:
        return self.path / rank_file(ERROR, rank)

    def done_file(self, rank: int) -> Path:
        """Where a rank started by a multi-node runner says its part of the cell succeeded."""
        return self.path / rank_file(DONE, rank)

    # -- writing -----------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, run_id: str, run_info: dict[str, Any]) -> RunDirectory:
        """Make a new run folder under `root` with its run.json and a 'starting' status."""
        run = cls(Path(root).resolve() / run_id)
        for sub in FOLDERS:
            (run.path / sub).mkdir(parents=True, exist_ok=True)
        write_json_atomic(run.run_file, {"format_version": FORMAT_VERSION, "run_id": run_id, **run_info})
        run.write_status(state="starting", created=time.time())
        return run

    def write_status(self, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into status.json (atomically) and return the new status.

        A run that ended stays ended: a late `state` change (e.g. "running" written after a
        quick failure) is dropped, the other fields are still merged.
        """
        status = self.status()
        if status.get("state") in FINAL_STATES and changes.get("state", status["state"]) != status["state"]:
            changes = {k: v for k, v in changes.items() if k not in ("state", "reason", "ended", "failed_rank")}
        status.update(changes, format_version=FORMAT_VERSION, run_id=self.run_id)
        write_json_atomic(self.status_file, status)
        return status

    def finish(self, state: str, reason: str, **more: Any) -> dict[str, Any]:
        """Mark the run ended, unless it already is (the first final word wins)."""
        current = self.status()
        if current.get("state") in FINAL_STATES:
            return current
        return self.write_status(state=state, reason=reason, ended=time.time(), **more)

    # -- reading -----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return read_json(self.status_file, {}) or {}

    def run_info(self) -> dict[str, Any]:
        return read_json(self.run_file, {}) or {}

    def ranks(self) -> list[int]:
        """Return the ranks that wrote metrics, in order."""
        found = []
        for path in self.metrics_file(0).parent.glob("rank-*.jsonl"):
            try:
                found.append(int(path.stem.split("-")[1]))
            except ValueError:
                continue
        return sorted(found)

    def metric_records(self) -> list[dict[str, Any]]:
        """Return every complete metric record of every rank."""
        records: list[dict[str, Any]] = []
        for rank in self.ranks():
            records += read_records(self.metrics_file(rank))[0]
        return records

    def errors(self) -> dict[int, dict[str, Any]]:
        """Return the error reports of the ranks that failed, by rank."""
        found = {}
        for path in sorted(self.error_file(0).parent.glob("rank-*.json")):
            report = read_json(path)
            if report:
                found[int(path.stem.split("-")[1])] = report
        return found


def list_runs(root: Path) -> Iterator[RunDirectory]:
    """Yield the run directories under `root`, newest first."""
    if not root.is_dir():
        return
    for path in sorted(root.iterdir(), reverse=True):
        if (path / RUN_FILE).is_file():
            yield RunDirectory(path)
