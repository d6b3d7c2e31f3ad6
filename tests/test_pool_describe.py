"""`%bigtrain workers` from the pool's own view: each worker's GPU memory, and never a dead worker as warm.

The idle groups here are real processes (`cat`, which ends when its stdin closes, as an idle
worker does), so that a kill is a real kill; the GPU column uses the fake NVML of
tests/fakes/pynvml.py listing those pids among its compute processes, as nvidia-ml-py would.
Real warm workers are in test_pool.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from nbtrain.launch.launcher import WorkerGroup
from nbtrain.launch.pool import LaunchShape, WorkerPool, Workers
from nbtrain.magic import describe_workers
from tests.nvml import use_fake_nvml

SHAPE = LaunchShape(nproc=2, hosts=("localhost",), backend="nccl", threads=1, collective_timeout_s=120.0,
                    python=sys.executable, environment="test")
MIB = 2**20


def idle_group(nproc: int = 2) -> WorkerGroup:
    """Start `nproc` processes shaped like a launcher's group: one process group, stdin as the job channel."""
    processes: list[subprocess.Popen[bytes]] = []
    report_fds = []
    for rank in range(nproc):
        report_read, report_write = os.pipe()
        os.close(report_write)
        report_fds.append(report_read)
        processes.append(subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          process_group=0 if rank == 0 else processes[0].pid))
    alive_read, alive_write = os.pipe()
    os.close(alive_read)
    return WorkerGroup(processes, port=0, alive_fd=alive_write, report_fds=report_fds)


@pytest.fixture
def pool() -> Iterator[WorkerPool]:
    pool = WorkerPool()
    yield pool
    pool.shutdown()


def keep_warm(pool: WorkerPool) -> WorkerGroup:
    group = idle_group()
    pool.keep(Workers(group, SHAPE, warm=False, note=""), keep_s=600)
    return group


def test_each_workers_gpu_memory_is_shown_from_nvml(pool: WorkerPool, monkeypatch: pytest.MonkeyPatch) -> None:
    group = keep_warm(pool)
    first, second = group.pids
    # NVML lists rank 0 on GPU 0 with what issue 14 saw an idle warm worker hold; rank 1 on no GPU.
    use_fake_nvml(monkeypatch, gpus=2, FAKE_NVML_PROCESSES=f"0:{first}:{10958 * MIB},1:{os.getpid()}:{MIB}")
    rows = pool.describe()
    assert [row["gpu_memory"] for row in rows] == [{0: 10958 * MIB}, {}]
    shown = describe_workers(rows)
    assert "GPU memory" in shown.splitlines()[1], shown
    assert f"{first:<8}" in shown and "10958 MiB (GPU 0)" in shown.splitlines()[2], shown
    assert shown.splitlines()[3].endswith("none"), shown


def test_gpu_memory_the_driver_does_not_report_says_so(pool: WorkerPool, monkeypatch: pytest.MonkeyPatch) -> None:
    group = keep_warm(pool)
    use_fake_nvml(monkeypatch, gpus=1, FAKE_NVML_PROCESSES=f"0:{group.pids[0]}:-")  # None, as under WDDM
    assert "not reported (GPU 0)" in describe_workers(pool.describe())


def test_without_gpus_the_table_is_as_before(pool: WorkerPool, monkeypatch: pytest.MonkeyPatch) -> None:
    group = keep_warm(pool)
    use_fake_nvml(monkeypatch, gpus=1, FAKE_NVML_DRIVER="missing")
    rows = pool.describe()
    assert [row["gpu_memory"] for row in rows] == [None, None]
    shown = describe_workers(rows)
    assert "GPU" not in shown and str(group.pids[1]) in shown and "MiB" in shown, shown


def test_a_killed_idle_worker_is_never_shown_as_warm(pool: WorkerPool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Regression (issue 14): a worker dying after its run was listed as warm ("memory 0 MiB").
    use_fake_nvml(monkeypatch, gpus=1)
    group = keep_warm(pool)
    dead, partner = group.pids[1], group.pids[0]
    os.kill(dead, signal.SIGKILL)
    _until_zombie(dead)
    rows = pool.describe()
    assert rows == [{"dropped": f"the idle warm workers were ended: worker rank 1 (pid {dead}) ended with code -9"}]
    shown = describe_workers(rows)
    assert shown == (f"no warm workers: the idle warm workers were ended: worker rank 1 (pid {dead}) ended with "
                     "code -9; the next run starts fresh ones")
    assert not psutil.pid_exists(partner), "the dead worker's partner was left running"
    assert pool.describe() == [], "the dropped group is gone for good"


def _until_zombie(pid: int) -> None:
    """Wait until the killed child has exited (a zombie: the pool must not count it as alive)."""
    process = psutil.Process(pid)
    for _ in range(200):
        if process.status() == psutil.STATUS_ZOMBIE:
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} did not exit after SIGKILL")
