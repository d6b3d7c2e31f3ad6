"""A warm worker's clean-up after a run (nbtrain/worker/entry.py `clean_up`): it never kills the
worker, it retires the workers with a reason the next run shows, and it leaves nothing of the run."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from tests.conftest import status_of
from tests.kernel import Kernel

pytestmark = pytest.mark.integration

FIT = "bigtrain.fit(make_model(), ToyData(), loss_fn=loss_fn)"


def run(kernel: Kernel, root: Path, name: str, body: str = FIT) -> Path:
    kernel.execute(f"%%bigtrain --nproc 2 --steps 3 --micro-batch 8 --no-plot --name {name}\n{body}")
    (found,) = (root / "bigtrain-runs").glob(f"*-{name}-*")
    assert status_of(found)["state"] == "succeeded", status_of(found)
    return found


def note(run_dir: Path) -> str:
    return str(status_of(run_dir)["workers"]["note"])


def gone(pids: list[int]) -> bool:
    return all(not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE for p in pids)


def test_a_class_stored_in_a_module_leaves_the_workers_warm_and_the_run_is_released(
        kernel: Kernel, tmp_path: Path) -> None:
    # Regression (issue 14): after this cell, restore read `co_filename` of FunctionType's
    # `__code__` descriptor; the worker died in its clean-up and the next run said
    # "on fresh workers (worker rank 0 (pid ...) ended with code 1)".
    # The cell keeps its model and result in its namespace: a namespace that outlived the run would keep them.
    first = run(kernel, tmp_path, "first", "import json, types\njson.FT = types.FunctionType\n"
                "model = make_model()\nresult = bigtrain.fit(model, ToyData(), loss_fn=loss_fn)")
    second = run(kernel, tmp_path, "second")
    assert note(second).startswith("warm workers"), note(second)
    assert status_of(second)["pids"] == status_of(first)["pids"]
    assert "on warm workers" in kernel.execute("_").text
    # Nothing of the run may still be referenced once its memory is released: on a GPU, an
    # engine or model still alive keeps its cached memory (10.9 GiB in an idle worker, issue 14).
    for rank in (0, 1):
        log = (first / "logs" / f"rank-{rank}.log").read_text()
        assert "nbtrain: released the run's context, engine, model, optimizer, loader" in log, log[-3000:]


RESTORE_FAILS = """
import nbtrain.worker.isolation as isolation

def restore(self, notebook_dir=None):
    raise RuntimeError("injected restore failure")

isolation.ProcessState.restore = restore
""" + FIT


def test_a_clean_up_that_fails_retires_the_workers_and_the_next_run_says_why(kernel: Kernel, tmp_path: Path) -> None:
    # Regression (issue 14): any exception in clean-up ended the worker with code 1.
    failing = run(kernel, tmp_path, "failing", RESTORE_FAILS)
    after = run(kernel, tmp_path, "after")
    assert "retired: clean-up after run 1 failed: RuntimeError: injected restore failure" in note(after), note(after)
    assert note(after).startswith("fresh workers"), note(after)
    assert gone(status_of(failing)["pids"]), "the retired workers are still running"
    assert "injected restore failure" in (failing / "logs" / "rank-0.log").read_text()
