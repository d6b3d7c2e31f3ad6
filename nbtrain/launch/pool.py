"""Warm workers: the next run of a cell starts in the processes of the last one.

A cold run spends seconds before its first step: starting Python, importing torch,
DeepSpeed and accelerate, joining the process group. After a run succeeds its workers put
themselves back as they were before it (`nbtrain.worker.isolation`) and wait, idle, for the
next run with the same launch shape (`LaunchShape`). Anything else gets fresh workers, and
the run says why. At most one idle group is kept per kernel; it ends after `--keep-warm`
seconds without a run, on `%bigtrain shutdown`, and with the kernel (the liveness pipe).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtrain.config.plan import RunPlan
from nbtrain.config.tree import DEFAULT_HANG_TIMEOUT_S, DEFAULT_KEEP_WARM_S
from nbtrain.launch.launcher import WorkerGroup, collective_timeout_s, default_threads, launch_workers
from nbtrain.rundir import RunDirectory

if TYPE_CHECKING:
    from nbtrain.launch.cluster import ClusterGroup
    from nbtrain.launch.slurm import SlurmGroup

# A warm worker cleans up right after its run; the next run waits for that at most this long.
READY_TIMEOUT_S = 60.0
# An idle warm worker takes a job within milliseconds; one that does not answer is replaced.
STARTED_TIMEOUT_S = 10.0
# How long `%bigtrain workers` waits for a worker that is already exiting, for its exit code.
EXIT_WAIT_S = 2.0
_PF_EXITING = 0x4  # include/linux/sched.h
# Variables that differ on every launch by design; any other change of the environment the
# workers were started with means fresh workers (they would not see it).
_PER_LAUNCH = {"NBTRAIN_LAUNCHED_AT"}


@dataclass(frozen=True)
class LaunchShape:
    """What must be equal for a run to start in already-running workers."""

    nproc: int
    hosts: tuple[str, ...]
    backend: str
    threads: int
    collective_timeout_s: float
    python: str
    environment: str  # a digest of the workers' environment, see `environment_digest`

    def difference(self, wanted: LaunchShape) -> str | None:
        """Return why workers of this shape cannot run `wanted`, or None if they can."""
        labels = {"nproc": "--nproc", "hosts": "the hosts", "backend": "the backend",
                  "threads": "threads per worker", "collective_timeout_s": "the collective timeout (from --hang-timeout)",
                  "python": "the Python executable", "environment": "the environment"}
        for f in fields(self):
            have, want = getattr(self, f.name), getattr(wanted, f.name)
            if have != want:
                if f.name == "environment":
                    return "the kernel's environment variables or sys.path changed since the workers started"
                return f"{labels[f.name]} changed from {have} to {want}"
        return None


def environment_digest(environ: dict[str, str] | None = None) -> str:
    """Digest the environment workers inherit (plus the kernel's sys.path and working directory)."""
    environ = dict(os.environ if environ is None else environ)
    items = sorted((k, v) for k, v in environ.items() if k not in _PER_LAUNCH)
    text = repr((items, sys.path, os.getcwd()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shape_for(plan: RunPlan) -> LaunchShape:
    """Return the launch shape `plan` needs."""
    hang = plan.config.hang_timeout or DEFAULT_HANG_TIMEOUT_S
    hosts = tuple(h.name for h in plan.hosts) or ("localhost",)
    if plan.launcher == "slurm":  # warm tasks serve a run asking for the same SLURM request
        from nbtrain.launch.slurm import slurm_shape

        hosts = slurm_shape(plan)
    return LaunchShape(nproc=plan.nproc, hosts=hosts, backend="nccl" if plan.machine.cuda else "gloo",
                       threads=default_threads(plan.nproc), collective_timeout_s=collective_timeout_s(hang),
                       python=sys.executable, environment=environment_digest())


@dataclass
class Workers:
    """The workers a run got, and how: warm (an earlier run's) or fresh, and why fresh."""

    group: WorkerGroup | ClusterGroup | SlurmGroup
    shape: LaunchShape
    warm: bool
    note: str


class WorkerPool:
    """The kernel's warm workers: at most one idle group.

    `launch` starts a fresh group on this machine (`launch_workers`'s signature); tests give a
    stand-in to check the pool's decisions in-process.
    """

    def __init__(self, launch: Callable[..., WorkerGroup] = launch_workers) -> None:
        self._launch = launch
        self._lock = threading.Lock()
        self._idle: Workers | None = None
        self._idle_since = 0.0
        self._keep_s = DEFAULT_KEEP_WARM_S
        self._timer: threading.Timer | None = None
        self._dropped: str | None = None  # why the last idle group was ended before a run came

    def workers_for(self, run: RunDirectory, plan: RunPlan) -> Workers:
        """Return workers for `run`: the idle group if its shape fits, else a fresh group."""
        shape = shape_for(plan)
        with self._lock:
            idle, self._idle = self._idle, None
            self._cancel_timer()
            why_fresh, self._dropped = self._dropped or "no warm workers", None
        if idle is not None:
            why_fresh = ("--cold" if plan.config.cold else idle.shape.difference(shape)
                         or idle.group.wait_ready(READY_TIMEOUT_S) or "")
            if not why_fresh:
                served = idle.group.runs_served + 1
                return Workers(idle.group, shape, warm=True,
                               note=f"warm workers (pids {', '.join(map(str, idle.group.pids))}; run {served} in them)")
            idle.group.shutdown()
        return self._fresh(run, plan, shape, why_fresh)

    def _fresh(self, run: RunDirectory, plan: RunPlan, shape: LaunchShape, why_fresh: str) -> Workers:
        hang = plan.config.hang_timeout or DEFAULT_HANG_TIMEOUT_S
        if plan.hosts:
            from nbtrain.launch.cluster import launch_cluster

            cluster = launch_cluster(run, plan.hosts, plan.nproc, plan.launcher, hang)
            return Workers(cluster, shape, warm=False,
                           note=f"fresh workers on {len(plan.hosts)} hosts (multi-node runs start fresh workers)")
        if plan.launcher == "slurm":
            from nbtrain.launch.slurm import launch_slurm

            tasks = launch_slurm(run, plan, hang, shape.threads)
            return Workers(tasks, shape, warm=False, note=f"fresh workers: an srun step of {plan.nodes} node(s) x "
                           f"{plan.nproc} in SLURM job {tasks.allocation.job_id} ({why_fresh})")
        group = self._launch(run, plan.nproc, hang_timeout=hang, threads=shape.threads)
        return Workers(group, shape, warm=False, note=f"fresh workers ({why_fresh})")

    def start(self, run: RunDirectory, plan: RunPlan, last: bool) -> Workers:
        """Return workers running `run`: warm ones if they fit and take it, else fresh ones."""
        workers = self.workers_for(run, plan)
        workers.group.submit(run, last=last)
        if workers.warm:
            # A worker can die while idle (killed, out of memory) just before the run: the others
            # would then wait for it in the first collective. Fresh workers instead, at once.
            died = workers.group.wait_started(STARTED_TIMEOUT_S)
            if died:
                workers.group.stop(grace=0)
                workers.group.close()
                workers = self._fresh(run, plan, shape_for(plan), died)
                workers.group.submit(run, last=last)
        return workers

    def keep(self, workers: Workers, keep_s: float) -> None:
        """Keep the workers of a succeeded run warm for `keep_s` seconds (0: end them now)."""
        if keep_s <= 0 or not workers.group.alive():
            if keep_s > 0:  # a worker retired (or died) right after the run: the next run's note says why
                with self._lock:
                    self._dropped = ended_worker(workers.group)
            workers.group.shutdown()
            return
        with self._lock:
            previous, self._idle, self._dropped = self._idle, workers, None
            self._idle_since, self._keep_s = time.time(), keep_s
            self._cancel_timer()
            self._timer = threading.Timer(keep_s, self._expire, args=(workers,))
            self._timer.daemon = True
            self._timer.start()
        if previous is not None:  # a background run's group and this one: keep the newest
            previous.group.shutdown()

    def shutdown(self) -> str:
        """End the idle workers; return what happened, for the user."""
        with self._lock:
            idle, self._idle = self._idle, None
            self._cancel_timer()
        if idle is None:
            return "no warm workers to end"
        took = idle.group.shutdown()
        said = getattr(idle.group, "ended_words", None)  # a SLURM step: its tasks live on the nodes
        if said is not None:
            return f"{said()} in {took:.1f} s"
        return f"ended {len(idle.group.pids)} warm workers (pids {', '.join(map(str, idle.group.pids))}) in {took:.1f} s"

    def describe(self) -> list[dict[str, Any]]:
        """Return one row per idle worker: rank, pid, memory, GPU memory, age, runs served, idle time left.

        `gpu_memory` is {GPU index: bytes} from NVML's per-process list (None on a machine
        without GPUs). Idle workers that are not all alive are not warm: the group is ended
        here and the one row returned is {"dropped": why}; the next run's note says it too.
        """
        import psutil

        from nbtrain.devices import gpu_memory_of

        with self._lock:
            idle, since, keep_s = self._idle, self._idle_since, self._keep_s
        if idle is None:
            return []
        ended = ended_worker(idle.group)
        if ended:
            return [{"dropped": self._drop(idle, ended)}]
        now = time.time()
        describe_tasks = getattr(idle.group, "describe_tasks", None)  # a SLURM step: its tasks, by node
        if describe_tasks is not None:
            return describe_tasks(now - since, keep_s, idle.shape)  # type: ignore[no-any-return]
        gpu = gpu_memory_of(idle.group.pids)
        rows = []
        for rank, pid in enumerate(idle.group.pids):
            try:
                rss = psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                rss = None
            rows.append({"rank": rank, "pid": pid, "rss_mib": None if rss is None else rss / 2**20,
                         "gpu_memory": None if gpu is None else gpu[pid],
                         "age_s": now - idle.group.started, "runs_served": idle.group.runs_served,
                         "idle_s": now - since, "ends_in_s": max(0.0, keep_s - (now - since)),
                         "nproc": idle.shape.nproc, "backend": idle.shape.backend})
        return rows

    def _drop(self, workers: Workers, why: str) -> str:
        """End an idle group that cannot serve; return what happened, which the next run's note repeats."""
        said = f"the idle warm workers were ended: {why}"
        with self._lock:
            if self._idle is not workers:
                return said
            self._idle, self._dropped = None, said
            self._cancel_timer()
        workers.group.shutdown()
        return said

    def _expire(self, workers: Workers) -> None:
        with self._lock:
            if self._idle is not workers:
                return
            self._idle, self._timer = None, None
        workers.group.shutdown()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def ended_worker(group: WorkerGroup | ClusterGroup | SlurmGroup) -> str | None:
    """Return why an idle group cannot serve because a worker of it has ended or is ending, or None.

    Polling reaps a worker that has exited (a zombie until then), so its exit code is known.
    A worker still on its way out (its memory already released, which read as "0 MiB") is
    waited for briefly: on a GPU, tearing down a CUDA context can take seconds.
    """
    ended = getattr(group, "ended", None)  # a SLURM step answers for its tasks
    if ended is not None:
        return ended()  # type: ignore[no-any-return]
    if not isinstance(group, WorkerGroup):
        return "multi-node workers serve one run"
    retired = group.retired()  # a worker that retired said why before it ended
    if retired:
        return retired
    for rank, process in enumerate(group.processes):
        if process.poll() is None and _exiting(process.pid):
            try:
                process.wait(timeout=EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                return f"worker rank {rank} (pid {process.pid}) is exiting"
        if process.returncode is not None:
            return f"worker rank {rank} (pid {process.pid}) ended with code {process.returncode}"
    return None


def _exiting(pid: int) -> bool:
    """Return whether a live process has begun to exit (Linux: PF_EXITING in /proc/PID/stat's flags)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False  # no procfs: polling alone tells
    state, flags = stat[0], int(stat[6])
    return state in ("Z", "X") or bool(flags & _PF_EXITING)


def gpu_memory_text(per_gpu: dict[int, int | None]) -> str:
    """Return a worker's GPU memory for `%bigtrain workers`: "10958 MiB (GPU 0)", or "none"."""
    if not per_gpu:
        return "none"
    return ", ".join(("not reported" if used is None else f"{used / 2**20:.0f} MiB") + f" (GPU {index})"
                     for index, used in sorted(per_gpu.items()))

