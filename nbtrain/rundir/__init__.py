"""The run directory: the single source of truth of a run (format in docs/run-directory.md).

Every view (the cell output, `RunResult`, the dashboard, the server API, the relay) reads it;
the launcher and the workers write it. Standard library only, in every module here:

- `layout`: `RunDirectory`, the paths and states of one run's folder;
- `records`: JSON documents replaced atomically, metric records appended as JSON lines;
- `progress`: where a run stands (step, ETA, start-up phase), read the same way for every view;
- `heartbeats`: the ranks' heartbeats and which rank hangs;
- `checkpoints`: the published checkpoints `--resume` continues from.
"""

from nbtrain.rundir.layout import FINAL_STATES, FORMAT_VERSION, STATES, RunDirectory, list_runs, new_run_id
from nbtrain.rundir.records import MetricWriter, read_json, read_records, write_json_atomic

__all__ = ["FINAL_STATES", "FORMAT_VERSION", "STATES", "MetricWriter", "RunDirectory", "list_runs", "new_run_id",
           "read_json", "read_records", "write_json_atomic"]
