"""Warm workers: the next compatible run starts in the workers of the last one, isolated from it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import NOTEBOOK_SETUP, PACED_FIT, has_trained, losses, status_of, wait_until_gone, worker_processes
from tests.kernel import Kernel

pytestmark = pytest.mark.integration

FIT = "bigtrain.fit(make_model(), ToyData(), loss_fn=loss_fn)"


def run(kernel: Kernel, root: Path, flags: str, body: str = FIT, name: str | None = None) -> Path:
    """Run one %%bigtrain cell that must succeed; return its run directory."""
    runs = root / "bigtrain-runs"
    name = name or f"r{len(list(runs.glob('*'))) if runs.exists() else 0}"
    kernel.execute(f"%%bigtrain --nproc 2 --steps 6 --micro-batch 8 --no-plot --name {name} {flags}\n{body}")
    found = list(runs.glob(f"*-{name}-*"))
    assert len(found) == 1, found
    assert status_of(found[0])["state"] == "succeeded"
    return found[0]


def workers_of(run_dir: Path) -> dict:
    return status_of(run_dir)["workers"] | {"pids": status_of(run_dir)["pids"]}


def test_the_next_run_starts_in_the_same_workers_with_the_same_losses(kernel: Kernel, tmp_path: Path) -> None:
    first = run(kernel, tmp_path, "--zero 2")
    second = run(kernel, tmp_path, "--zero 2")
    cold = run(kernel, tmp_path, "--zero 2 --cold")
    assert not workers_of(first)["warm"] and workers_of(first)["note"] == "fresh workers (no warm workers)"
    assert workers_of(second)["warm"] and workers_of(second)["pids"] == workers_of(first)["pids"]
    assert "run 2 in them" in workers_of(second)["note"]
    assert not workers_of(cold)["warm"] and workers_of(cold)["note"] == "fresh workers (--cold)"
    assert set(workers_of(cold)["pids"]).isdisjoint(workers_of(first)["pids"])
    assert losses(first) == losses(second) == losses(cold) and len(losses(first)) == 6
    # The warm pool the --cold run replaced is gone; the --cold run's workers are the warm ones now.
    assert {p.pid for p in worker_processes(str(tmp_path))} == set(workers_of(cold)["pids"])
    shown = kernel.execute("_").text
    assert "on fresh workers (--cold)" in shown, shown
    timings = [status_of(r)["timings"]["first_step_s"] for r in (first, second, cold)]
    print(f"\nfirst step: cold {timings[0]:.2f} s, warm {timings[1]:.2f} s, --cold {timings[2]:.2f} s")


def test_a_different_launch_shape_gets_fresh_workers_and_says_why(kernel: Kernel, tmp_path: Path) -> None:
    two = run(kernel, tmp_path, "")
    kernel.execute(f"%%bigtrain --nproc 1 --steps 2 --micro-batch 8 --no-plot --name one\n{FIT}")
    (one,) = (tmp_path / "bigtrain-runs").glob("*-one-*")
    assert workers_of(one)["note"] == "fresh workers (--nproc changed from 2 to 1)"
    assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
               for pid in workers_of(two)["pids"]), "the replaced warm workers still run"
    # The kernel's environment is the workers' environment: a change means fresh workers.
    kernel.execute("import os\nos.environ['NBTRAIN_TEST_KNOB'] = '1'")
    kernel.execute("%%bigtrain --nproc 1 --steps 2 --micro-batch 8 --no-plot --name env\n"
                   "import os\nprint('knob', os.environ.get('NBTRAIN_TEST_KNOB'))\n" + FIT)
    (env,) = (tmp_path / "bigtrain-runs").glob("*-env-*")
    assert "environment variables or sys.path changed" in workers_of(env)["note"]
    assert "knob 1" in (env / "logs" / "rank-0.out").read_text()


ZERO3_LEAK_PROBE = """
import torch, transformers.integrations
print('linear is torch', torch.nn.functional.linear is torch._C._nn.linear)
print('zero3 on', transformers.integrations.is_deepspeed_zero3_enabled())
""" + FIT


def test_zero3_then_zero1_in_warm_workers_equals_zero1_on_fresh_workers(kernel: Kernel, tmp_path: Path) -> None:
    zero3 = run(kernel, tmp_path, "--zero 3", ZERO3_LEAK_PROBE, name="three")
    warm = run(kernel, tmp_path, "--zero 1", ZERO3_LEAK_PROBE, name="warm")
    fresh = run(kernel, tmp_path, "--zero 1 --cold", ZERO3_LEAK_PROBE, name="fresh")
    assert workers_of(warm)["warm"] and not workers_of(fresh)["warm"]
    assert losses(warm) == losses(fresh), (losses(warm), losses(fresh))
    # DeepSpeed's ZeRO-3 leaves torch.nn.functional.linear patched in its process.
    probe = (warm / "logs" / "rank-0.out").read_text()
    assert "linear is torch True" in probe and "zero3 on False" in probe, probe
    assert "torch.nn.functional.linear" in (zero3 / "logs" / "rank-0.log").read_text(), \
        "the worker's log should say what it put back after the ZeRO-3 run"


MEDDLE = """
import os, json, torch
print('rand', torch.rand(2).tolist())
torch.nn.Tanh.forward = lambda self, x: x * 0          # a class's method
torch.nn.functional.cross_entropy = lambda *a, **k: torch.tensor(0.0, requires_grad=True)  # a module's function
json.meddled = lambda: True                               # a new module function
os.environ['NBTRAIN_MEDDLED'] = '1'
os.chdir('/')
torch.set_default_dtype(torch.float64)
leftover = 'from the first run'
"""

CHECK = """
import os, json, torch
print('tanh', torch.nn.Tanh()(torch.ones(1)).item() != 0)
print('json', hasattr(json, 'meddled'), 'env', 'NBTRAIN_MEDDLED' in os.environ, 'cwd', os.getcwd() == CWD)
print('dtype', torch.get_default_dtype(), 'leftover', 'leftover' in globals())
print('rand', torch.rand(2).tolist())
""" + FIT


def test_a_run_that_meddles_with_its_process_does_not_change_the_next(kernel: Kernel, tmp_path: Path) -> None:
    kernel.execute(f"CWD = {str(tmp_path)!r}")
    meddler = run(kernel, tmp_path, "", MEDDLE, name="meddler")
    warm = run(kernel, tmp_path, "", CHECK, name="warm")
    fresh = run(kernel, tmp_path, "--cold", CHECK, name="fresh")
    assert workers_of(warm)["warm"]
    seen = (warm / "logs" / "rank-0.out").read_text()
    assert "tanh True" in seen and "json False env False cwd True" in seen, seen
    assert "dtype torch.float32 leftover False" in seen, seen
    # Seeds are applied again: the same draws as on fresh workers (and as the first run's).
    rand = [line for line in seen.splitlines() if line.startswith("rand")]
    assert rand == [line for line in (fresh / "logs" / "rank-0.out").read_text().splitlines()
                    if line.startswith("rand")]
    assert rand[0] in (meddler / "logs" / "rank-0.out").read_text()
    assert losses(warm) == losses(fresh)
    put_back = (meddler / "logs" / "rank-0.log").read_text()
    for name in ("torch.nn.modules.activation.Tanh.forward", "torch.nn.functional.cross_entropy",
                 "json.meddled", "os.environ['NBTRAIN_MEDDLED']", "the working directory", "torch default_dtype"):
        assert name in put_back, f"{name} missing from: {put_back[-2000:]}"


def test_a_failed_run_and_an_interrupted_run_lead_to_fresh_workers(kernel: Kernel, tmp_path: Path) -> None:
    ok = run(kernel, tmp_path, "")
    failed = kernel.execute("%%bigtrain --nproc 2 --steps 6 --micro-batch 8 --no-plot --name bad\n"
                            "raise ValueError('broken cell')", allow_error=True)
    assert failed.error is not None
    (bad,) = (tmp_path / "bigtrain-runs").glob("*-bad-*")
    assert workers_of(bad)["warm"], "the failing run should have started in the warm workers"
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in workers_of(ok)["pids"]), "a failed run's workers must not be kept"
    after_failure = run(kernel, tmp_path, "")
    assert workers_of(after_failure)["note"] == "fresh workers (no warm workers)"
    kernel.execute("%%bigtrain --nproc 2 --steps 100000 --micro-batch 8 --no-plot --name stopped\n" + PACED_FIT,
                   interrupt_after=has_trained(tmp_path, "stopped"), allow_error=True)
    assert not worker_processes(str(tmp_path)), "workers survived the interrupt"
    after_interrupt = run(kernel, tmp_path, "")
    assert workers_of(after_interrupt)["note"] == "fresh workers (no warm workers)"


def test_twenty_warm_runs_leak_nothing(kernel: Kernel, tmp_path: Path) -> None:
    kernel_process = psutil.Process(kernel.pid)

    def footprint() -> dict[str, object]:
        workers = kernel_process.children()
        return {"kernel threads": kernel_process.num_threads(), "kernel fds": kernel_process.num_fds(),
                "workers": sorted(w.pid for w in workers),
                "worker threads": [w.num_threads() for w in workers], "worker fds": [w.num_fds() for w in workers]}

    def settled() -> dict[str, object]:
        # Measured once the workers finished cleaning up after the run (it runs after `done`).
        last, now = None, footprint()
        deadline = time.monotonic() + 15
        while now != last and time.monotonic() < deadline:
            time.sleep(0.5)
            last, now = now, footprint()
        return now

    def worker_rss() -> int:
        return sum(w.memory_info().rss for w in kernel_process.children())

    run(kernel, tmp_path, "", name="r0")
    run(kernel, tmp_path, "", name="r1")
    after_two, rss_two = settled(), worker_rss()
    for i in range(2, 20):
        run(kernel, tmp_path, "", name=f"r{i}")
    after_twenty, rss_twenty = settled(), worker_rss()
    grown_mib = (rss_twenty - rss_two) / 2**20
    print(f"\nafter 2 runs {after_two}, after 20 {after_twenty}; workers' memory grew {grown_mib:.1f} MiB")
    assert after_twenty == after_two
    assert len(after_two["workers"]) == 2  # type: ignore[arg-type]
    assert grown_mib < 100, f"the warm workers' memory grew {grown_mib:.0f} MiB over 18 runs"
    runs = list((tmp_path / "bigtrain-runs").iterdir())
    assert len(runs) == 20 and sum(status_of(r)["workers"]["warm"] for r in runs) == 19
    assert "ended 2 warm workers" in kernel.execute("%bigtrain shutdown").text
    assert not kernel_process.children()


def test_warm_workers_idle_quietly_and_end_on_time_on_request_and_with_the_kernel(tmp_path: Path) -> None:
    kernel = Kernel(tmp_path)
    try:
        kernel.execute("%load_ext nbtrain")
        kernel.execute(NOTEBOOK_SETUP)
        first = run(kernel, tmp_path, "--keep-warm 3")
        begun = time.monotonic()
        wait_until_gone(str(tmp_path), timeout=30)
        print(f"\n--keep-warm 3: the idle workers ended after {time.monotonic() - begun:.1f} s")
        assert time.monotonic() - begun > 1.5, "the workers ended long before --keep-warm"
        assert "no warm workers" in kernel.execute("%bigtrain workers").text
        assert not workers_of(first)["warm"]

        run(kernel, tmp_path, "")
        shown = kernel.execute("%bigtrain workers").text
        pids = [w.pid for w in worker_processes(str(tmp_path))]
        assert len(pids) == 2 and all(str(pid) in shown for pid in pids) and "MiB" in shown, shown
        # Idle means asleep: no busy loop, no sampler or heartbeat left running.
        time.sleep(1)  # the clean-up right after a run is work, not idling
        before = [psutil.Process(pid).cpu_times() for pid in pids]
        time.sleep(3)
        after = [psutil.Process(pid).cpu_times() for pid in pids]
        busy = max(a.user + a.system - b.user - b.system for b, a in zip(before, after, strict=True))
        rss = [psutil.Process(pid).memory_info().rss / 2**20 for pid in pids]
        print(f"idle warm workers: {busy:.3f} CPU s in 3 s, memory {', '.join(f'{m:.0f}' for m in rss)} MiB")
        assert busy < 0.1, f"an idle warm worker used {busy:.2f} CPU s in 3 s"
        assert "the next run starts on fresh workers" in kernel.execute("%bigtrain restart").text
        wait_until_gone(str(tmp_path), timeout=5)

        run(kernel, tmp_path, "")
        assert len(worker_processes(str(tmp_path))) == 2
        kernel.kill()
        took = wait_until_gone(str(tmp_path), timeout=30)
        print(f"idle warm workers gone {took:.1f} s after kill -9 of the kernel")
        runs = sorted((tmp_path / "bigtrain-runs").iterdir())
        assert all(status_of(r)["state"] == "succeeded" for r in runs), \
            "the kernel's death must not mark an already finished run"
    finally:
        kernel.client.stop_channels()
        kernel.shutdown()
    assert json.loads((first / "status.json").read_text())["state"] == "succeeded"


def test_a_warm_worker_that_died_while_idle_means_fresh_workers(kernel: Kernel, tmp_path: Path) -> None:
    first = run(kernel, tmp_path, "")
    dead = workers_of(first)["pids"][1]
    psutil.Process(dead).kill()
    after = run(kernel, tmp_path, "")
    note = workers_of(after)["note"]
    assert note.startswith(f"fresh workers (worker rank 1 (pid {dead}) ended with code -9"), note
    assert losses(after) == losses(first)
    assert not psutil.pid_exists(workers_of(first)["pids"][0]) or \
        psutil.Process(workers_of(first)["pids"][0]).status() == psutil.STATUS_ZOMBIE, "its partner was not ended"


def test_a_killed_idle_worker_is_never_listed_as_warm(kernel: Kernel, tmp_path: Path) -> None:
    # Regression (issue 14): `%bigtrain workers` listed a dying worker as warm ("memory 0 MiB").
    first = run(kernel, tmp_path, "")
    partner, dead = workers_of(first)["pids"]
    assert str(dead) in kernel.execute("%bigtrain workers").text
    psutil.Process(dead).kill()
    shown = kernel.execute("%bigtrain workers").text
    gone = f"the idle warm workers were ended: worker rank 1 (pid {dead}) ended with code -9"
    assert shown.strip() == f"no warm workers: {gone}; the next run starts fresh ones", shown
    assert not psutil.pid_exists(partner) or psutil.Process(partner).status() == psutil.STATUS_ZOMBIE, \
        "the dead worker's partner was left running"
    after = run(kernel, tmp_path, "")
    assert workers_of(after)["note"] == f"fresh workers ({gone})"
    assert losses(after) == losses(first)
