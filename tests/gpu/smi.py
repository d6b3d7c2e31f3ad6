"""What nvidia-smi says about the GPU: the processes holding its memory, as a user would check.

`nvidia-smi --query-compute-apps` lists every process with a CUDA context on the machine's
GPUs and the memory it holds. In a container the pids may be the host's, or the processes
may not be listed at all: the tests compare against a snapshot taken before (which processes
are new, how much more memory is in use) rather than trusting that a pid is a worker's.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass

# Memory in use may differ this much from the snapshot before with no process of ours on the GPU.
SLACK_MIB = 256.0


@dataclass(frozen=True)
class ComputeApp:
    """One process holding memory on a GPU."""

    pid: int
    gpu: str  # the GPU's UUID
    used_mib: float | None  # None where the driver does not say ("[N/A]")


@dataclass(frozen=True)
class GpuUse:
    """The GPUs at one moment: the processes listed as holding memory, and the memory in use in all."""

    apps: tuple[ComputeApp, ...]
    used_mib: float


@dataclass(frozen=True)
class Held:
    """What processes started since a snapshot hold on the GPUs now."""

    apps: tuple[ComputeApp, ...]  # the new processes nvidia-smi lists
    more_mib: float  # memory in use beyond the snapshot's

    @property
    def hidden(self) -> bool:
        """Memory is held but no new process is listed (a container that hides other pid namespaces)."""
        return not self.apps and self.more_mib > SLACK_MIB

    @property
    def nothing(self) -> bool:
        return not self.apps and self.more_mib <= SLACK_MIB

    def __str__(self) -> str:
        listed = ", ".join(f"pid {a.pid}: {'?' if a.used_mib is None else f'{a.used_mib:.0f}'} MiB" for a in self.apps)
        return f"{listed or 'no new process listed'} ({self.more_mib:+.0f} MiB in use on the GPUs)"


def _query(what: str) -> list[list[str]]:
    if shutil.which("nvidia-smi") is None:
        raise AssertionError("nvidia-smi is not on PATH: the GPU tests read GPU memory through it")
    out = subprocess.run(["nvidia-smi", what, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         timeout=60, check=True)
    return [[part.strip() for part in line.split(",")] for line in out.stdout.splitlines() if line.strip()]


def _number(text: str) -> float | None:
    return float(text) if text.replace(".", "", 1).isdigit() else None


def gpu_use() -> GpuUse:
    """Return the processes with memory on any GPU now, and the memory in use on all GPUs."""
    apps = tuple(ComputeApp(int(row[0]), row[1], _number(row[2]))
                 for row in _query("--query-compute-apps=pid,gpu_uuid,used_memory")
                 if len(row) == 3 and row[0].isdigit())
    used = sum(_number(row[0]) or 0.0 for row in _query("--query-gpu=memory.used"))
    return GpuUse(apps, used)


def held_since(before: GpuUse) -> Held:
    """Return what is held on the GPUs now by processes that were not there at `before`."""
    now = gpu_use()
    known = {app.pid for app in before.apps}
    return Held(tuple(app for app in now.apps if app.pid not in known), now.used_mib - before.used_mib)


def wait_until_released(before: GpuUse, timeout: float = 30) -> Held | None:
    """Wait until nothing started since `before` holds GPU memory; return what still does at the timeout."""
    deadline = time.monotonic() + timeout
    held = held_since(before)
    while not held.nothing and time.monotonic() < deadline:
        time.sleep(0.5)
        held = held_since(before)
    return None if held.nothing else held


def settled_held(before: GpuUse, timeout: float = 60, readings: int = 3) -> Held:
    """Return what new processes hold once `readings` readings 2 s apart agree (a warm worker
    cleans up after its run: what it holds after that is what it keeps while idle)."""
    deadline = time.monotonic() + timeout
    seen = [held_since(before)]
    while (len(seen) < readings or any(_rounded(r) != _rounded(seen[-1]) for r in seen[-readings:])) \
            and time.monotonic() < deadline:
        time.sleep(2)
        seen.append(held_since(before))
    return seen[-1]


def _rounded(held: Held) -> tuple[object, ...]:
    # Agreement to 16 MiB: the driver's count of memory in use moves by a page now and then.
    return held.apps, round(held.more_mib / 16)
