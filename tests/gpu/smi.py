"""What nvidia-smi says about the GPU: the processes holding its memory, as a user would check.

`nvidia-smi --query-compute-apps` lists every process with a CUDA context on the machine's
GPUs and the memory it holds. In a container the pids may be the host's: the tests compare
the list before and after (which processes are new, which are gone) rather than trusting that
a pid matches a worker's.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ComputeApp:
    """One process holding memory on a GPU."""

    pid: int
    gpu: str  # the GPU's UUID
    used_mib: float | None  # None where the driver does not say ("[N/A]")


def compute_apps() -> list[ComputeApp]:
    """Return the processes with memory on any GPU now."""
    if shutil.which("nvidia-smi") is None:
        raise AssertionError("nvidia-smi is not on PATH: the GPU tests read GPU memory through it")
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=60, check=True)
    apps = []
    for line in out.stdout.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit():
            used = float(parts[2]) if parts[2].replace(".", "").isdigit() else None
            apps.append(ComputeApp(int(parts[0]), parts[1], used))
    return apps


def used_mib() -> float:
    """Return the memory in use on all GPUs (MiB), whoever holds it."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=60, check=True)
    return sum(float(line) for line in out.stdout.split() if line.replace(".", "").isdigit())


def new_apps(before: list[ComputeApp]) -> list[ComputeApp]:
    """Return the processes holding GPU memory now that did not before."""
    known = {app.pid for app in before}
    return [app for app in compute_apps() if app.pid not in known]


def wait_until_released(before: list[ComputeApp], timeout: float = 30) -> list[ComputeApp]:
    """Wait until no process beyond `before` holds GPU memory; return those still holding it at the timeout."""
    deadline = time.monotonic() + timeout
    left = new_apps(before)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = new_apps(before)
    return left


def settled_new_apps(before: list[ComputeApp], timeout: float = 60, readings: int = 3) -> list[ComputeApp]:
    """Return the new processes' GPU memory once `readings` readings 2 s apart agree (a warm worker
    cleans up after its run: what it holds after that is what it keeps while idle)."""
    deadline = time.monotonic() + timeout
    seen = [new_apps(before)]
    while (len(seen) < readings or any(r != seen[-1] for r in seen[-readings:])) and time.monotonic() < deadline:
        time.sleep(2)
        seen.append(new_apps(before))
    return seen[-1]


def describe(apps: list[ComputeApp]) -> str:
    """Say which processes hold GPU memory, and how much is in use in all (a container may hide the processes)."""
    listed = ", ".join(f"pid {a.pid}: {'?' if a.used_mib is None else f'{a.used_mib:.0f}'} MiB" for a in apps)
    return f"{listed or 'no process listed'} (GPU memory in use: {used_mib():.0f} MiB)"
