"""A worker started by srun for nbtrain: torch's rank variables from SLURM's own, and the report channel.

`nbtrain.launch.slurm` starts every rank of a run with one `srun ... python -m nbtrain.worker
RUN_DIR`. SLURM tells each task who it is (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
SLURM_NODEID, the step's node list); torch.distributed wants RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (the head picks the port). No mpi4py, no ssh.

Reports (`started`, `done`, `ready`, `retire ...`) go to the head as marked lines on the
task's original stdout, which srun carries back with `--label` (the task number first);
the jobs come on stdin, which srun broadcasts to every task (`--input=all`).

Standard library only.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from typing import TextIO

from nbtrain.launch.slurm_protocol import LAUNCHED_VARIABLE, REPORT_MARK, expand_hostlist


def first_count(tasks_per_node: str) -> int:
    """Return the tasks on the first node from SLURM's compressed list: "2(x3),1" -> 2."""
    return int(re.match(r"\d+", tasks_per_node).group())  # type: ignore[union-attr]


def rank_variables(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """Return torch.distributed's variables for the srun task described by `environ`.

    The master is the first node of the step (SLURM_STEP_NODELIST; a step may use fewer
    nodes than the job, whose SLURM_JOB_NODELIST comes second), where SLURM places task 0.
    """
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"]
    master = expand_hostlist(nodelist)[0]
    local_size = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or "1"
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ["SLURM_LOCALID"], "GROUP_RANK": environ["SLURM_NODEID"],
            "LOCAL_WORLD_SIZE": str(first_count(local_size)),
            "MASTER_ADDR": socket.gethostbyname(master),  # gloo and NCCL want an address they can bind/reach
            "MASTER_PORT": environ["MASTER_PORT"]}


class _MarkedLines:
    """The report channel: each line written goes out with REPORT_MARK, on the task's original stdout."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self._stream.write(f"{REPORT_MARK}{line}\n")
        self._stream.flush()
        return len(text)


def from_srun() -> _MarkedLines | None:
    """Set the rank variables and return the report channel if srun started this worker for nbtrain, else None."""
    if LAUNCHED_VARIABLE not in os.environ:
        return None
    ranks = rank_variables(os.environ)
    os.environ.update(ranks)
    # One line per task in the run's launcher log (srun's stderr): where each rank runs, and its master.
    print(f"nbtrain: rank {ranks['RANK']} of {ranks['WORLD_SIZE']} on {socket.gethostname()} (SLURM job "
          f"{os.environ.get('SLURM_JOB_ID')}, node {ranks['GROUP_RANK']}, local rank {ranks['LOCAL_RANK']}); "
          f"master {ranks['MASTER_ADDR']}:{ranks['MASTER_PORT']}", file=sys.stderr, flush=True)
    # fd 1 goes to the rank's log once a run starts (entry._output_to); reports keep srun's stdout.
    return _MarkedLines(os.fdopen(os.dup(1), "w", buffering=1))
