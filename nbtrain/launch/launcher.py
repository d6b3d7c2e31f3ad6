"""Start and stop the worker processes of a run; own their whole lifetime.

Workers are fresh Python processes (never forks of the kernel, so CUDA or threads already
set up in the kernel cannot break them), started directly with the environment that
torchrun would give them, in one process group of their own (an interrupt of the kernel
does not reach them by accident; a stop reaches all of them and their children).

Kernel death: each worker holds the read end of a pipe whose only write end stays in the
kernel. When the kernel dies in any way (kill -9 included) the pipe reads EOF and the
workers end themselves (see `nbtrain.worker.entry`), so no worker outlives its kernel.

Runs reach the workers as jobs: one JSON line on each worker's stdin per run. A worker
answers on its own report pipe: `done` when the cell succeeded on its rank, then `ready`
once it is clean for another run (`nbtrain.launch.pool` keeps such groups warm). A failed rank
exits instead, so a group that failed is never reused.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nbtrain.rundir import RunDirectory

STOP_GRACE_S = 5.0
ALIVE_FD_ENV = "NBTRAIN_ALIVE_FD"
REPORT_FD_ENV = "NBTRAIN_REPORT_FD"
COLLECTIVE_TIMEOUT_ENV = "NBTRAIN_COLLECTIVE_TIMEOUT_S"
# Room kept in the run directory while workers run: a worker that finds the disk full deletes
# it, so that its error report and the run's final status can still be written.
SPACE_RESERVE = ".space-reserve"
SPACE_RESERVE_BYTES = 256 * 1024


def reserve_space(run: RunDirectory) -> Path:
    """Write the run's SPACE_RESERVE file (real blocks, not a sparse file: it must hold space)."""
    path = run.path / SPACE_RESERVE
    with open(path, "wb") as f:
        f.write(b"\0" * SPACE_RESERVE_BYTES)
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free right now on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class WorkerGroup:
    """The worker processes of one launch, which may serve several runs one after another."""

    processes: list[subprocess.Popen[bytes]]
    port: int
    alive_fd: int  # the kernel's write end of the liveness pipe
    report_fds: list[int]  # the kernel's read ends of each worker's report pipe
    started: float = field(default_factory=time.time)
    reserve: Path | None = None  # the current run's SPACE_RESERVE file
    runs_served: int = 0
    # Why the run failed when no rank's own error says it (a lost host of a multi-node run,
    # see nbtrain.launch.cluster); a local group's ranks always speak for themselves.
    failure: str | None = None
    failed_rank: int | None = None
    _reports: list[list[str]] = field(default_factory=list)  # per rank, since the last job

    def __post_init__(self) -> None:
        self._reports = [[] for _ in self.processes]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    @property
    def pgid(self) -> int:
        return self.processes[0].pid

    def submit(self, run: RunDirectory, last: bool = False) -> None:
        """Send `run` to every worker; `last` tells them to end after it instead of staying warm."""
        self.reserve = reserve_space(run)
        self._reports = [[] for _ in self.processes]
        job = json.dumps({"run": str(run.path), "launched_at": time.time(), "last": last}) + "\n"
        for p in self.processes:
            assert p.stdin is not None
            try:
                p.stdin.write(job.encode())
                p.stdin.flush()
            except BrokenPipeError:
                pass  # that worker is gone: its exit code tells the supervisor
        self.runs_served += 1

    def exit_codes(self) -> list[int | None]:
        """Return each rank's result for the current run: 0 once it reported `done`, its exit
        code if it ended without, None while it works."""
        self._read_reports()
        return [0 if "done" in reports else p.poll() for p, reports in zip(self.processes, self._reports, strict=True)]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.processes)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.processes)

    def wait_ready(self, timeout: float) -> str | None:
        """Wait until every worker is clean for another run; return why the group cannot serve, or None."""
        deadline = time.monotonic() + timeout
        while True:
            retired = self.retired()
            if retired:
                return retired
            for rank, p in enumerate(self.processes):
                if p.poll() is not None:
                    return f"worker rank {rank} (pid {p.pid}) ended with code {p.returncode}"
            if all("ready" in reports for reports in self._reports):
                return None
            if time.monotonic() > deadline:
                return f"the workers were not clean again within {timeout:.0f} s of the last run"
            time.sleep(0.02)

    def retired(self) -> str | None:
        """Return why a worker retired after its run ("rank 1 retired: REASON"), or None."""
        self._read_reports()
        for rank, reports in enumerate(self._reports):
            retired = [r for r in reports if r.startswith("retire")]
            if retired:
                return f"rank {rank} retired: {retired[0].removeprefix('retire ')}"
        return None

    def wait_started(self, timeout: float) -> str | None:
        """Wait until every worker took the job just submitted; return why not (one died), or None."""
        deadline = time.monotonic() + timeout
        while True:
            self._read_reports()
            if all("started" in reports for reports in self._reports):
                return None
            for rank, p in enumerate(self.processes):
                if p.poll() is not None and "started" not in self._reports[rank]:
                    return f"worker rank {rank} (pid {p.pid}) ended with code {p.returncode} while idle"
            if time.monotonic() > deadline:
                return f"the warm workers did not take the run within {timeout:.0f} s"
            time.sleep(0.005)

    def _read_reports(self) -> None:
        for fd, reports in zip(self.report_fds, self._reports, strict=True):
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # nothing new (BlockingIOError), or already closed
                continue
            reports += chunk.decode().splitlines()

    def stop(self, grace: float = STOP_GRACE_S) -> float:
        """End every worker and its children: SIGTERM, then SIGKILL after `grace` s.

        Returns the seconds it took until every worker was gone.
        """
        begun = time.monotonic()
        self._signal(signal.SIGTERM)
        self._signal(signal.SIGCONT)  # a stopped (frozen) worker acts on the SIGTERM only once continued
        deadline = begun + grace
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._signal(signal.SIGKILL)  # also reaches children left behind in the group
        for p in self.processes:
            p.wait()
        return time.monotonic() - begun

    def shutdown(self, grace: float = STOP_GRACE_S) -> float:
        """End idle workers the polite way (their stdin closes; they leave the process group), then stop."""
        begun = time.monotonic()
        self._close_job_channels()
        deadline = begun + grace
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.stop(grace=0)
        self.close()
        return time.monotonic() - begun

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def release_reserve(self) -> None:
        """Remove the current run's space reserve (the run has ended)."""
        if self.reserve is not None:
            self.reserve.unlink(missing_ok=True)
            self.reserve = None

    def close(self) -> None:
        """Release the pipes and the space reserve (after the workers are gone)."""
        for fd in (self.alive_fd, *self.report_fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self._close_job_channels()
        self.release_reserve()

    def _close_job_channels(self) -> None:
        """Close each worker's stdin: an idle worker reads EOF and ends."""
        for p in self.processes:
            if p.stdin is not None:
                try:
                    p.stdin.close()
                except OSError:  # BrokenPipeError: that worker is gone already
                    pass


def collective_timeout_s(hang_timeout: float) -> float:
    """Return the process group's collective timeout: a backstop behind --hang-timeout.

    The kernel names a hung rank after --hang-timeout (from heartbeats); this ends the
    collectives it could not attribute.
    """
    return hang_timeout + max(60.0, hang_timeout)


# glibc's malloc, left to itself, gives freed memory at the top of its heap back to the kernel
# (trim) and serves large blocks with mmap/munmap: every training step then page-faults fresh
# zeroed pages for the same temporaries it freed a step earlier. Measured on the benchmark's
# GPT-2 (2 CPU workers): ~1,500 page faults a step before, ~870 with these settings (the rest
# is DeepSpeed's reduce bucket, which is above any threshold), less system CPU on every step
# (figures: benchmarks/README.md).
# Blocks under 32 MiB (glibc's own upper limit for the threshold) come from the heap, and up to
# 256 MiB of freed heap stays mapped while the run trains; after a run the warm worker gives it
# back explicitly (malloc_trim in nbtrain.worker.isolation.release_memory).
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def worker_environment(rank: int, nproc: int, port: int, alive_fd: int, threads: int) -> dict[str, str]:
    """Return the environment of one worker: torchrun's variables plus nbtrain's."""
    env = dict(os.environ)
    # The kernel's own distributed settings must not leak into the workers.
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "GROUP_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(key, None)
    paths = [os.getcwd()] + [p for p in sys.path if p and Path(p).is_dir()]
    env.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
        GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        ACCELERATE_USE_DEEPSPEED="true", PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)),
        NBTRAIN_LAUNCHED_AT=repr(time.time()),
        **{ALIVE_FD_ENV: str(alive_fd)},
    )
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("TORCH_EXTENSIONS_DIR", ops_cache_dir())
    for key, value in MALLOC_SETTINGS.items():  # a value the user set wins
        env.setdefault(key, value)
    return env


def ops_cache_dir() -> str:
    """Return where DeepSpeed's JIT-built ops live: inside this Python environment.

    torch's default (~/.cache/torch_extensions) is shared by every environment of the same
    Python and torch; two environments then rebuild each other's ops (their source paths
    differ), and a run waits minutes on the build lock of another environment's run.
    """
    return os.path.join(sys.prefix, "var", "torch_extensions")


STALE_LOCK_S = 60.0


def _ninja_running() -> bool:
    import psutil

    return any(proc.info["name"] == "ninja" for proc in psutil.process_iter(["name"]))


def clear_stale_op_locks(ops_dir: Path, building: Callable[[], bool] = _ninja_running) -> list[Path]:
    """Remove DeepSpeed op build locks that a killed process left behind; return them.

    torch takes `<op>/lock` even to load an op that is already built, and a process killed
    while holding it leaves it: every later run then waits on it forever. A lock older than
    a minute while no ninja build runs on this machine is such a leftover.
    """
    now = time.time()
    locks = [p for p in ops_dir.glob("*/lock") if now - p.stat().st_mtime > STALE_LOCK_S]
    if not locks or building():
        return []
    for lock in locks:
        lock.unlink(missing_ok=True)
    return locks


def default_threads(nproc: int) -> int:
    """Return the intra-op threads per worker: the cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // nproc)


def launch_workers(run: RunDirectory, nproc: int, hang_timeout: float, threads: int | None = None) -> WorkerGroup:
    """Start `nproc` workers for `run` (not yet submitted), each writing its output to the run's log."""
    for lock in clear_stale_op_locks(Path(ops_cache_dir())):
        print(f"bigtrain: removed a stale DeepSpeed op build lock left by a killed process: {lock}",
              file=sys.stderr)
    port = free_port()
    alive_read, alive_write = os.pipe()  # both ends are not inherited unless passed explicitly
    threads = threads or default_threads(nproc)
    processes: list[subprocess.Popen[bytes]] = []
    report_fds: list[int] = []
    try:
        for rank in range(nproc):
            report_read, report_write = os.pipe()
            os.set_blocking(report_read, False)
            report_fds.append(report_read)
            env = worker_environment(rank, nproc, port, alive_read, threads)
            env.update({REPORT_FD_ENV: str(report_write), COLLECTIVE_TIMEOUT_ENV: str(collective_timeout_s(hang_timeout))})
            log = open(run.log_file(rank), "ab")
            try:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "nbtrain.worker", str(run.path), str(rank)],
                    env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                    pass_fds=(alive_read, report_write),
                    # The first worker leads a new process group and the others join it, so
                    # that the kernel's interrupt (sent to its own group) never reaches them.
                    process_group=0 if rank == 0 else processes[0].pid,
                ))
            finally:
                log.close()
                os.close(report_write)
    except BaseException:
        group = WorkerGroup(processes, port, alive_write, report_fds)
        if processes:
            group.stop(grace=0)
        group.close()
        raise
    finally:
        os.close(alive_read)
    return WorkerGroup(processes, port, alive_write, report_fds)
