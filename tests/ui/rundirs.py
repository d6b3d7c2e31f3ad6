"""Run folders written with nbtrain's own writers, for the server and UI tests."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from nbtrain.rundir import MetricWriter, RunDirectory, new_run_id


def make_run(root: Path, name: str, *, state: str = "running", steps: int = 3, total: int = 10,
             pids: list[int] | None = None, reason: str = "") -> RunDirectory:
    """Write a run folder the way the kernel and rank 0 do, `steps` steps into training."""
    run = RunDirectory.create(root, new_run_id(name), {
        "name": name, "created": time.time(), "nproc": 1, "hosts": ["localhost"],
        "config": {"steps": total, "zero": 2}, "kernel_pid": None, "cwd": str(root), "python": sys.executable})
    (run.path / "deepspeed.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    writer = MetricWriter(run.metrics_file(0), 0)
    for step in range(1, steps + 1):
        writer.write(step, lr=1e-3 * min(1.0, step / 5), step_time_s=0.01, samples_per_s=800.0 + step)
        writer.write(step, loss=2.0 / step)
    writer.close()
    run.log_file(0).write_text("".join(f"log line {i}\n" for i in range(500)))
    run.write_status(state=state, started=time.time(), pids=pids or [])
    if state in ("succeeded", "failed", "stopped"):
        run.write_status(ended=time.time(), reason=reason)
    return run
