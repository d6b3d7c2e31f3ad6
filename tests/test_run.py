"""How runs end: a rank failing, a rank killed, an interrupt, the kernel dying — and no leftovers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nbtrain.launch.run import RELAY_EVERY_S, _next_beat
from tests.conftest import LOOP, PACED_FIT, only_run, status_of, wait_until_gone, worker_processes
from tests.kernel import Kernel

pytestmark = pytest.mark.integration

def test_a_rank_raising_fails_the_run_with_its_traceback_at_the_cell_line(kernel: Kernel, tmp_path: Path) -> None:
    cell = LOOP.format(misbehave="if bigtrain.rank == 1:\n            raise ValueError('bad batch on rank 1')")
    out = kernel.execute(f"%%bigtrain --nproc 2 --steps 40 --micro-batch 4\n{cell}", allow_error=True)
    error = out.error
    assert error is not None, "the cell should fail"
    shown = error.text
    assert 'File "<bigtrain cell>", line 11' in shown and "raise ValueError('bad batch on rank 1')" in shown, shown
    assert "rank 1 raised ValueError: bad batch on rank 1 (cell line 11)" in shown
    run = only_run(tmp_path)
    status = status_of(run)
    assert (status["state"], status["failed_rank"]) == ("failed", 1)
    # Metrics written before the fault are kept (rank 0 logged steps 1-3 at least).
    assert (run / "metrics" / "rank-0.jsonl").read_text().count('"loss"') >= 3
    assert not worker_processes(str(tmp_path)), "a worker outlived the failed run"
    # Nothing is bound on failure, and the kernel is still usable.
    assert kernel.execute("print('state' in dir())").text.strip() == "False"


def test_a_rank_killed_by_a_signal_is_reported_and_the_others_stopped(kernel: Kernel, tmp_path: Path) -> None:
    cell = LOOP.format(misbehave="if bigtrain.rank == 1:\n            os.kill(os.getpid(), signal.SIGKILL)")
    began = time.time()
    out = kernel.execute(f"%%bigtrain --nproc 2 --steps 400 --micro-batch 4\n{cell}", allow_error=True)
    assert out.error is not None
    assert "rank 1 was killed by SIGKILL" in out.error.text
    assert status_of(only_run(tmp_path))["state"] == "failed"
    # Rank 0 would wait in gloo's collective for 30 minutes; nbtrain must stop it at once.
    assert time.time() - began < 120
    assert not worker_processes(str(tmp_path))


def test_interrupting_the_kernel_stops_every_worker(kernel: Kernel, tmp_path: Path) -> None:
    cell = LOOP.format(misbehave="pass") + "\ntime.sleep(600)\n"
    out = kernel.execute(f"%%bigtrain --nproc 2 --steps 5 --micro-batch 4\n{cell}",
                         interrupt_after=12, allow_error=True)
    assert out.error is not None and out.error.content["ename"] == "KeyboardInterrupt"
    interrupted_at = out.error.time
    status = status_of(only_run(tmp_path))
    assert status["state"] == "stopped" and "interrupted" in status["reason"], status
    assert not worker_processes(str(tmp_path)), "workers survived the interrupt"
    # The cell ended within 10 s of the interrupt (which was sent 12 s into the cell).
    assert interrupted_at - out.started < 12 + 10
    assert "[succeeded]" not in out.text


@pytest.mark.parametrize("mode", ["", "--background"])
def test_workers_end_themselves_when_the_kernel_is_killed(tmp_path: Path, mode: str) -> None:
    from tests.conftest import NOTEBOOK_SETUP

    kernel = Kernel(tmp_path)
    try:
        kernel.execute("%load_ext nbtrain")
        kernel.execute(NOTEBOOK_SETUP)
        kernel.client.execute(f"%%bigtrain --nproc 2 --steps 100000 --micro-batch 4 {mode}\n{PACED_FIT}")
        deadline = time.time() + 120
        while not any((tmp_path / "bigtrain-runs").glob("*/metrics/rank-0.jsonl")):
            assert time.time() < deadline, "training never started"
            time.sleep(0.2)
        # The kernel's own children; a worker's short-lived fork (a subprocess about to exec)
        # shows the same command line for a moment.
        workers = [p for p in worker_processes(str(tmp_path)) if p.ppid() == kernel.pid]
        assert len(workers) == 2
        kernel.kill()
        took = wait_until_gone(str(tmp_path), timeout=30)
    finally:
        kernel.client.stop_channels()
    status = status_of(only_run(tmp_path))
    assert status["state"] == "stopped" and "kernel died" in status["reason"], status
    print(f"workers gone {took:.1f} s after kill -9 of the kernel")


def test_a_background_run_returns_at_once_and_keeps_the_kernel_usable(kernel: Kernel, tmp_path: Path) -> None:
    # Paced steps: ~5 s of a run that mostly idles, rather than 1500 steps that keep both cores busy.
    started = kernel.execute("%%bigtrain --nproc 2 --steps 100 --micro-batch 4 --background --out final\n"
                             "r = bigtrain.fit(make_model(), ToyData(), loss_fn=paced_loss)\nfinal = r.final_loss\n"
                             "handle = None")
    assert "running in the background" in started.value(), started.text
    kernel.execute("handle = _")
    assert worker_processes(str(tmp_path)), "the workers should still be training"
    # The kernel answers while the run trains, and the metrics grow.
    grown = kernel.execute("import time\nwhile handle.metrics.empty: time.sleep(0.1)\n"
                           "n0 = len(handle.metrics)\ntime.sleep(1)\nprint(handle.status, len(handle.metrics) > n0)")
    assert grown.text.strip() == "running True", grown.text
    kernel.execute("result = handle.wait()")
    assert kernel.execute("print(result.status, round(final, 4) == round(result.metrics['loss'].dropna().iloc[-1], 4))"
                          ).text.strip() == "succeeded True"
    # The run's workers are kept warm for the next run, idle, until asked to end.
    assert "2 processes (gloo), 1 run(s) served" in kernel.execute("%bigtrain workers").text
    kernel.execute("%bigtrain shutdown")
    assert not worker_processes(str(tmp_path))


def test_stopping_a_background_run_keeps_its_metrics(kernel: Kernel, tmp_path: Path) -> None:
    kernel.execute(f"%%bigtrain --nproc 2 --steps 100000 --micro-batch 4 --background\n{PACED_FIT}")
    kernel.execute("handle = _\nimport time\nwhile len(handle.metrics) < 5: time.sleep(0.2)\nhandle.stop()")
    status = status_of(only_run(tmp_path))
    assert status["state"] == "stopped" and "stopped from the notebook" in status["reason"], status
    assert not worker_processes(str(tmp_path))
    assert kernel.execute("print(len(handle.metrics) >= 5)").text.strip() == "True"
    failed = kernel.execute("handle.wait()", allow_error=True)
    assert failed.error is not None and "stopped" in failed.error.text


def test_the_supervisor_relays_on_a_fixed_beat_without_catching_up_in_a_burst() -> None:
    """The wait for the next relay is the dashboard's delay (benchmarks/dashboard.py): a slow
    relay must not push the next one later, and one late by more than a beat must not be
    followed by relays back to back."""
    beat = RELAY_EVERY_S
    assert _next_beat(10.0, 10.0 + beat / 2) == pytest.approx(10.0 + beat)
    assert _next_beat(10.0, 10.0 + 3 * beat) == pytest.approx(10.0 + 4 * beat)
