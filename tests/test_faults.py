"""Faults beyond a raising or killed rank: a hung rank, a full disk, and many runs without leaks.

Each test runs real 2-process DeepSpeed training through a real kernel and prints the time from
the fault to every worker gone (pytest -s shows it).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from nbtrain.rundir import RunDirectory, read_records
from tests.conftest import only_run, status_of, worker_processes
from tests.kernel import Kernel

pytestmark = pytest.mark.integration

HANGS = """
import os, signal, time
engine, loader = bigtrain.prepare(make_model(), ToyData())
for x, y in loader:
    engine.backward(loss_fn(engine, (x, y)))
    engine.step()
    bigtrain.log(loss=0.0)
    if engine.global_steps == 3 and bigtrain.rank == 1:
        {hang}
"""


def step_time(run: Path, step: int) -> float:
    records = read_records(run / "metrics" / "rank-0.jsonl")[0]
    return min(r["time"] for r in records if r["step"] == step)


@pytest.mark.parametrize(("hang", "says"), [
    ("time.sleep(100000)", "rank 1 hung for 1"),  # for 1x s: the timeout is 12 s
    ("os.kill(os.getpid(), signal.SIGSTOP)", "rank 1 sent no heartbeat for 1"),
], ids=["stuck-in-the-cell", "frozen"])
def test_a_hung_rank_is_named_and_every_worker_stopped(kernel: Kernel, tmp_path: Path, hang: str, says: str) -> None:
    out = kernel.execute(f"%%bigtrain --nproc 2 --steps 1000 --micro-batch 4 --hang-timeout 12\n"
                         f"{HANGS.format(hang=hang)}", allow_error=True)
    assert out.error is not None, "the hung run should fail"
    run = only_run(tmp_path)
    status = status_of(run)
    assert status["state"] == "failed" and status["failed_rank"] == 1, status
    assert says in status["reason"], status["reason"]
    assert "while rank(s) 0 waited for it (--hang-timeout 12 s)" in status["reason"], status["reason"]
    if "sleep" in hang:
        assert "at cell line 9 (no progress since step 3)" in status["reason"], status["reason"]
    assert status["reason"] in out.error.text
    assert not worker_processes(str(tmp_path)), "a worker outlived the hung run"
    print(f"\n[{hang}] fault -> all workers gone: {status['ended'] - step_time(run, 3):.1f} s "
          f"(--hang-timeout 12); the user saw: {status['reason']}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Mount small tmpfs file systems under `tmp_path` (a disk that really fills up)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (make test runs as root in CI)")
    mounted: list[Path] = []

    def mount(name: str, size: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_metrics_disk_stops_training_with_the_reason(kernel: Kernel, tmp_path: Path,
                                                            small_disk: Callable[[str, str], Path]) -> None:
    disk = small_disk("small", "512k")  # the run's files and 256 KB reserve, then ~1000 steps of metrics
    out = kernel.execute("%%bigtrain --nproc 2 --steps 1000000 --micro-batch 4 --run-dir small\n"
                         "bigtrain.fit(make_model(), ToyData(), loss_fn=loss_fn)", allow_error=True, timeout=600)
    assert out.error is not None, "the run should fail when its disk is full"
    (run,) = [p for p in disk.iterdir() if p.is_dir()]
    status = status_of(run)
    assert status["state"] == "failed", status
    assert status["reason"].startswith(f"no space left on device in {run}"), status["reason"]
    assert "no space left on device in" in out.error.text
    # Every complete record up to the fault reads back: steps 1, 2, ... without a gap.
    steps = sorted({r["step"] for r in RunDirectory(run).metric_records() if "loss" in r})
    assert len(steps) > 100 and steps == list(range(1, len(steps) + 1)), steps[-5:]
    assert not (run / ".space-reserve").exists()
    assert not worker_processes(str(tmp_path))
    fault = json.loads((run / "errors" / "rank-0.json").read_text())["time"]
    print(f"\n[metrics disk full] fault -> all workers gone: {status['ended'] - fault:.1f} s after "
          f"{len(steps)} steps; the user saw: {status['reason']}")


BIG_MODEL = '''
def make_big_model():
    # About 1.1 M parameters: one checkpoint (weights + Adam state) takes ~17 MB.
    return torch.nn.Sequential(torch.nn.Linear(16, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 1024),
                               torch.nn.Tanh(), torch.nn.Linear(1024, 4))
'''


def test_a_full_checkpoint_disk_keeps_the_last_good_checkpoint(kernel: Kernel, tmp_path: Path,
                                                               small_disk: Callable[[str, str], Path]) -> None:
    disk = small_disk("small", "28m")  # room for one checkpoint, not for two
    kernel.execute(BIG_MODEL)
    out = kernel.execute("%%bigtrain --nproc 2 --steps 1000 --micro-batch 4 --zero 1 --checkpoint-every 3 "
                         "--run-dir small\nbigtrain.fit(make_big_model(), ToyData(), loss_fn=loss_fn)",
                         allow_error=True)
    assert out.error is not None, "the run should fail when a checkpoint does not fit"
    (run,) = [p for p in disk.iterdir() if p.is_dir()]
    status = status_of(run)
    assert status["state"] == "failed", status
    assert status["reason"].startswith(f"no space left on device in {run / 'checkpoints'}"), status["reason"]
    checkpoints = run / "checkpoints"
    assert json.loads((checkpoints / "latest.json").read_text())["tag"] == "step-3"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step-3"], \
        "the failed save must leave no partial folder (it would fill the disk for good)"
    assert len(list((checkpoints / "step-3").iterdir())) >= 4  # DeepSpeed's files and ours, per rank
    assert not worker_processes(str(tmp_path))
    fault = min(e["time"] for e in RunDirectory(run).errors().values())
    print(f"\n[checkpoint disk full] fault -> all workers gone: {status['ended'] - fault:.1f} s; "
          f"the user saw: {status['reason']}")


def test_twenty_runs_in_one_kernel_leave_nothing_behind(kernel: Kernel, tmp_path: Path) -> None:
    # Runs whose workers end with them (--keep-warm 0); test_pool covers twenty warm runs.
    kernel_process = psutil.Process(kernel.pid)

    def footprint() -> dict[str, int]:
        return {"child processes": len(kernel_process.children(recursive=True)),
                "threads": kernel_process.num_threads(), "fds": kernel_process.num_fds(),
                "sockets": len(kernel_process.net_connections(kind="all"))}

    cell = "%%bigtrain --nproc 2 --steps 1 --micro-batch 8 --no-plot --keep-warm 0\nbigtrain.fit(make_model(), ToyData(), loss_fn=loss_fn)"
    kernel.execute(cell)
    after_one = footprint()
    for _ in range(19):
        kernel.execute(cell)
    after_twenty = footprint()
    print(f"\nkernel footprint after 1 run {after_one}, after 20 runs {after_twenty}")
    assert after_twenty == after_one, f"after 1 run {after_one}, after 20 runs {after_twenty}"
    assert after_one["child processes"] == 0, "a worker is still a child of the kernel"
    runs = list((tmp_path / "bigtrain-runs").iterdir())
    assert len(runs) == 20 and all(status_of(r)["state"] == "succeeded" for r in runs)
    assert not any((r / ".space-reserve").exists() for r in runs)
