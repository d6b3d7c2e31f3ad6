"""`python -m nbtrain.launch.slurm_guard --name NAME [--job J] [--owned]`: cancel a run's SLURM work when the kernel dies.

The kernel starts one guard per SLURM launch, in a session of its own, with stdin the read
end of a pipe whose only write end stays in the kernel. The kernel's death in any way
(kill -9 included) closes the pipe: the guard reads EOF and cancels what the launch owns:
the job it requested (by its name, so that even a request still pending goes), or, inside
the user's own allocation, only the job steps of that name. A kernel that ends the
launch itself writes `exit` first, and the guard leaves without cancelling anything; it
writes `run PATH` for each run the step serves, which the guard marks stopped with the reason.

Standard library only: it must start fast and hold nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping


def step_ids(job: str, name: str, env: Mapping[str, str], timeout: float = 30) -> list[str]:
    """Return the ids (J.S) of job `job`'s steps named `name` (a run's workers and relays)."""
    listed = subprocess.run(["squeue", "-h", "-s", "-j", job, "-o", "%i|%j"], env=dict(env), capture_output=True,
                            text=True, timeout=timeout, check=False).stdout
    return [line.split("|", 1)[0] for line in listed.splitlines() if line.strip().endswith(f"|{name}")]


def cancel(name: str, job: str | None, owned: bool) -> None:
    """Cancel the job named `name` (owned), or the steps named `name` of job `job`."""
    env = dict(os.environ)
    if owned:
        subprocess.run(["scancel", "--name", name], env=env, timeout=30, check=False)
        return
    if job is None:
        return
    steps = step_ids(job, name, env)
    if steps:
        subprocess.run(["scancel", *steps], env=env, timeout=30, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nbtrain.launch.slurm_guard")
    parser.add_argument("--name", required=True)
    parser.add_argument("--job")
    parser.add_argument("--owned", action="store_true")
    args = parser.parse_args(argv)
    run: str | None = None
    for line in sys.stdin:  # blocks until the kernel says `exit` or dies (EOF)
        if line.strip() == "exit":
            return 0
        if line.startswith("run "):
            run = line[4:].strip()  # the run the step serves now
    cancel(args.name, args.job, args.owned)
    if run:
        from pathlib import Path

        from nbtrain.rundir import RunDirectory

        what = "nbtrain's SLURM allocation was cancelled" if args.owned else "the run's SLURM job step was cancelled"
        RunDirectory(Path(run)).finish("stopped", f"the kernel died or restarted; {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
