"""The worker processes of a run: find them, measure them, stop them.

status.json names the workers' pids; the first leads their process group. A pid in a file
is only a claim (the run may be long over and the pid reused), so a process counts as the
run's worker only if it leads its own group and has the run folder on its command line, as
every worker started by nbtrain's launcher does (`python -m nbtrain.worker RUN_DIR RANK`),
or, for warm workers started for an earlier run, is a worker child of the run's kernel.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import psutil

from nbtrain.devices import ProcessMeter
from nbtrain.rundir import FINAL_STATES, RunDirectory
from nbtrain.server.runs import RequestError

STOPPED_REASON = "stopped from JupyterLab"


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _is_worker_of(proc: psutil.Process, run: RunDirectory) -> bool:
    # A warm worker (nbtrain.launch.pool) was started for an earlier run, whose folder its command
    # line names: it counts when it is a worker child of the kernel that started this run.
    try:
        cmdline = proc.cmdline()
        if str(run.path.resolve()) in cmdline:
            return True
        kernel_pid = run.run_info().get("kernel_pid")
        return "nbtrain.worker" in cmdline and isinstance(kernel_pid, int) and proc.ppid() == kernel_pid
    except psutil.Error:
        return False


def group_leader(run: RunDirectory) -> psutil.Process | None:
    """Return the live leader of the run's worker group, or None when the workers are gone.

    Raises RequestError (409) when the pid belongs to a process that is not this run's worker.
    """
    pids = run.status().get("pids") or []
    if not pids or not isinstance(pids[0], int) or pids[0] <= 1:
        return None
    try:
        leader = psutil.Process(pids[0])
    except psutil.Error:
        return None
    if not _alive(leader):
        return None
    if not _is_worker_of(leader, run) or os.getpgid(leader.pid) != leader.pid or leader.pid == os.getpgid(0):
        raise RequestError(409, f"process {leader.pid} named in status.json is not a worker of run {run.run_id} "
                                "(its pid was probably reused); nothing was signalled")
    return leader


def group_members(pgid: int) -> list[psutil.Process]:
    """Return the live (non-zombie) processes of process group `pgid`."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and _alive(proc):
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


class WorkerSampler:
    """CPU % and resident memory of each rank's worker; keeps processes to measure CPU between calls."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        # One meter per worker: the sidebar's and the run panel's requests come milliseconds apart,
        # and psutil's own CPU % over such a gap reads 1000+ % (ProcessMeter does not).
        self._meters: dict[int, ProcessMeter] = {}

    def sample(self, run: RunDirectory) -> list[dict[str, Any]]:
        status = run.status()
        pids = status.get("pids") or []
        if status.get("state") in FINAL_STATES or not pids:
            return [{"rank": rank, "pid": pid, "alive": False} for rank, pid in enumerate(pids)]
        try:
            leader = group_leader(run)
        except RequestError:
            leader = None
        rows = []
        for rank, pid in enumerate(pids):
            row: dict[str, Any] = {"rank": rank, "pid": pid, "alive": False}
            proc = self._procs.get(pid)
            if leader is not None and isinstance(pid, int):
                try:
                    if proc is None or proc.create_time() != psutil.Process(pid).create_time():
                        proc = self._procs[pid] = psutil.Process(pid)
                        self._meters[pid] = ProcessMeter(pid)
                    if _alive(proc) and os.getpgid(pid) == leader.pid:
                        cpu, rss = self._meters[pid].read()
                        row.update(alive=True, rss_bytes=rss, **({} if cpu is None else {"cpu_percent": cpu}))
                except (OSError, psutil.Error):
                    pass
            rows.append(row)
        return rows


async def stop_run(run: RunDirectory, grace_s: float, reason: str = STOPPED_REASON) -> dict[str, Any]:
    """Stop the run's workers (SIGTERM, SIGKILL after `grace_s`) and mark the run stopped with `reason`."""
    status = run.status()
    if status.get("state") in FINAL_STATES:
        raise RequestError(409, f"run {run.run_id} has already ended ({status['state']}): there is nothing to stop")
    leader = group_leader(run)
    if leader is None:
        # A 'running' run without workers: its supervisor died without a word.
        return run.finish("stopped", f"{reason}; its workers were already gone")
    begun = time.monotonic()
    _signal_group(leader.pid, signal.SIGTERM)
    # Say so at once: the kernel's supervisor sees ranks exit and must not call it a failure.
    run.finish("stopped", reason)
    while group_members(leader.pid) and time.monotonic() - begun < grace_s:
        await asyncio.sleep(0.1)
    if group_members(leader.pid):
        _signal_group(leader.pid, signal.SIGKILL)
        while group_members(leader.pid) and time.monotonic() - begun < grace_s + 5:
            await asyncio.sleep(0.05)
    took = time.monotonic() - begun
    current = run.status()
    if current.get("reason") != reason:  # another final word came first: keep it
        return current
    return run.write_status(reason=f"{reason}; workers stopped in {took:.1f} s")


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
