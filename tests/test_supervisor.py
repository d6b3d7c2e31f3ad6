"""The supervisor's verdicts and the pool's launch-shape decisions, in-process with a stand-in worker group.

The real groups are covered end to end by test_run.py, test_faults.py and test_pool.py (real
DeepSpeed workers); here the decisions alone, which a stand-in exercises in milliseconds.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from nbtrain.config.arguments import parse_line
from nbtrain.config.machine import MachineFacts
from nbtrain.config.plan import RunPlan, plan_run
from nbtrain.launch.pool import WorkerPool, shape_for
from nbtrain.launch.run import ActiveRun, KernelState, PrintSink, _supervise
from nbtrain.rundir import RunDirectory, new_run_id, write_json_atomic

CPU = MachineFacts()


class FakeGroup:
    """A worker group whose ranks end with the exit codes a test gives (None: still running)."""

    def __init__(self, nproc: int, codes: list[int | None] | None = None):
        self.pids = [10_000 + rank for rank in range(nproc)]
        self.codes: list[int | None] = codes if codes is not None else [None] * nproc
        self.port, self.runs_served = 29_500, 0
        self.failure, self.failed_rank = "", None
        self.stopped = self.shut = False
        self.submitted: list[Path] = []

    def exit_codes(self) -> list[int | None]:
        return list(self.codes)

    def stop(self, grace: float = 0) -> float:
        self.stopped = True
        self.codes = [-signal.SIGTERM if code is None else code for code in self.codes]
        return 0.0

    def close(self) -> None: ...
    def release_reserve(self) -> None: ...

    def submit(self, run: RunDirectory, last: bool) -> None:
        self.submitted.append(run.path)
        self.runs_served += 1

    def wait_ready(self, timeout: float) -> str | None:
        return None

    def wait_started(self, timeout: float) -> str | None:
        return None

    def alive(self) -> bool:
        return not self.shut

    def shutdown(self) -> float:
        self.shut = True
        return 0.0


def plan_of(flags: str, tmp_path: Path) -> RunPlan:
    return plan_run(parse_line(f"{flags} --run-dir {tmp_path}"), CPU)


def active_run(tmp_path: Path, group: FakeGroup, flags: str = "--nproc 2 --steps 3") -> ActiveRun:
    plan = plan_of(flags, tmp_path)
    run = RunDirectory.create(tmp_path, new_run_id("sup"), {"nproc": plan.world_size})
    pool = WorkerPool(launch=lambda *a, **k: group)
    workers = pool.workers_for(run, plan)
    return ActiveRun(plan, run, workers, PrintSink(every_s=3600), time.time(), pool)


def error(run: RunDirectory, rank: int, **report: Any) -> None:
    write_json_atomic(run.error_file(rank), {"rank": rank, "time": time.time(), **report})


def test_every_rank_exiting_cleanly_is_success(tmp_path: Path) -> None:
    assert _supervise(active_run(tmp_path, FakeGroup(2, [0, 0]))) == ("succeeded", "", None)


def test_a_rank_killed_by_a_signal_is_named_as_the_cause_not_its_peers_errors(tmp_path: Path) -> None:
    group = FakeGroup(2, [1, -signal.SIGKILL])
    active = active_run(tmp_path, group)
    error(active.run, 0, type="RuntimeError", message="connection closed by peer")
    state, reason, rank = _supervise(active)
    assert (state, rank) == ("failed", 1), reason
    assert reason == "rank 1 was killed by SIGKILL (the out-of-memory killer sends this)"
    assert group.stopped, "the surviving ranks were left running"


def test_the_earliest_python_error_names_the_rank_and_the_cell_line(tmp_path: Path) -> None:
    active = active_run(tmp_path, FakeGroup(2, [1, 1]))
    error(active.run, 1, type="ValueError", message="bad batch", cell_line=4, time=1.0)
    error(active.run, 0, type="RuntimeError", message="peer gone", time=2.0)
    assert _supervise(active) == ("failed", "rank 1 raised ValueError: bad batch (cell line 4)", 1)


def test_a_full_disk_says_the_earlier_metrics_are_intact(tmp_path: Path) -> None:
    active = active_run(tmp_path, FakeGroup(2, [0, 1]))
    error(active.run, 1, type="OSError", message="...", disk_full="no space left on device")
    state, reason, rank = _supervise(active)
    assert (state, rank) == ("failed", 1)
    assert reason.startswith("no space left on device: rank 1 could not write") and "intact" in reason, reason


def test_a_full_disk_is_the_cause_even_when_a_peers_failed_write_reported_first(tmp_path: Path) -> None:
    # Seen under load: rank 1's save hit the full disk and gave the room back; rank 0's write had
    # failed too, but torch.save lost the errno and the disk no longer looked full.
    active = active_run(tmp_path, FakeGroup(2, [1, 1]))
    error(active.run, 0, type="RuntimeError", message="[enforce fail at inline_container.cc:672] . unexpected pos",
          time=1.0)
    error(active.run, 1, type="OSError", message="...", disk_full="no space left on device in ckpt", time=1.5)
    state, reason, rank = _supervise(active)
    assert (state, rank) == ("failed", 1)
    assert reason.startswith("no space left on device in ckpt: rank 1 could not write"), reason


def test_an_exit_without_a_python_error_points_at_the_rank_s_log(tmp_path: Path) -> None:
    active = active_run(tmp_path, FakeGroup(2, [0, 3]))
    assert _supervise(active) == ("failed", "rank 1 exited with code 3 without a Python error "
                                            "(see logs/rank-1.log)", 1)


def test_a_group_s_own_failure_wins_over_the_ranks_codes(tmp_path: Path) -> None:
    group = FakeGroup(2, [None, 255])
    group.failure, group.failed_rank = "host node1 lost: no heartbeat for 10 s", 1
    assert _supervise(active_run(tmp_path, group)) == ("failed", "host node1 lost: no heartbeat for 10 s", 1)


def test_a_stop_from_outside_is_stopped_not_failed(tmp_path: Path) -> None:
    active = active_run(tmp_path, FakeGroup(2, [-signal.SIGTERM, -signal.SIGTERM]))
    active.run.finish("stopped", "stopped from JupyterLab")
    assert _supervise(active) == ("stopped", "stopped from JupyterLab", None)


def test_a_stop_request_stops_every_worker(tmp_path: Path) -> None:
    group = FakeGroup(2)
    active = active_run(tmp_path, group)
    active.request_stop()
    state, reason, _ = _supervise(active)
    assert state == "stopped" and reason.startswith("stopped from the notebook"), reason
    assert group.stopped


# -- the pool's launch-shape decisions --------------------------------------------------------

def started(pool: WorkerPool, tmp_path: Path, flags: str) -> tuple[Any, str, bool]:
    plan = plan_of(flags, tmp_path)
    run = RunDirectory.create(tmp_path, new_run_id("pool"), {})
    workers = pool.start(run, plan, last=False)
    return workers.group, workers.note, workers.warm


@pytest.fixture
def pool() -> WorkerPool:
    return WorkerPool(launch=lambda run, nproc, **kwargs: FakeGroup(nproc))  # a new stand-in for every fresh launch


def test_a_kept_group_of_the_same_shape_runs_the_next_run(pool: WorkerPool, tmp_path: Path) -> None:
    first, note, warm = started(pool, tmp_path, "--nproc 2")
    assert not warm and note == "fresh workers (no warm workers)"
    pool.keep(_workers(first, tmp_path, "--nproc 2"), 60)
    again, note, warm = started(pool, tmp_path, "--nproc 2")
    assert warm and again is first, note
    assert note.startswith("warm workers (pids 10000, 10001; run 2 in them)"), note


def test_another_process_count_gets_fresh_workers_and_ends_the_idle_ones(pool: WorkerPool, tmp_path: Path) -> None:
    first, _, _ = started(pool, tmp_path, "--nproc 2")
    pool.keep(_workers(first, tmp_path, "--nproc 2"), 60)
    other, note, warm = started(pool, tmp_path, "--nproc 3")
    assert not warm and other is not first
    assert note == "fresh workers (--nproc changed from 2 to 3)"
    assert first.shut, "the idle group of the old shape was left running"


def test_cold_gets_fresh_workers_even_when_the_shape_fits(pool: WorkerPool, tmp_path: Path) -> None:
    first, _, _ = started(pool, tmp_path, "--nproc 2")
    pool.keep(_workers(first, tmp_path, "--nproc 2"), 60)
    _, note, warm = started(pool, tmp_path, "--nproc 2 --cold")
    assert not warm and note == "fresh workers (--cold)"


def test_keep_warm_zero_ends_the_workers_at_once(pool: WorkerPool, tmp_path: Path) -> None:
    first, _, _ = started(pool, tmp_path, "--nproc 2")
    pool.keep(_workers(first, tmp_path, "--nproc 2"), 0)
    assert first.shut and pool.describe() == []


def test_the_magics_state_owns_the_pool_each_run_uses() -> None:
    one, two = KernelState(), KernelState()
    assert isinstance(one.pool, WorkerPool) and one.pool is not two.pool, "kernels must not share warm workers"


def _workers(group: FakeGroup, tmp_path: Path, flags: str) -> Any:
    from nbtrain.launch.pool import Workers

    return Workers(group, shape_for(plan_of(flags, tmp_path)), warm=False, note="")  # type: ignore[arg-type]
