"""Shared fixtures: a real kernel with nbtrain loaded, and checks for leftover workers."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import psutil
import pytest

from tests.kernel import Kernel

# The browser tests' screenshot folder and screenshot-on-failure (asked for by their modules);
# the SLURM tests' shared cluster (fixtures `slurm_shared` and `slurm`, tests/slurm.py).
pytest_plugins = ["tests.ui.fixtures", "tests.slurm"]

@functools.cache
def _uses_the_hosts(module: ModuleType) -> bool:
    """Whether a test module takes anything from tests/netns.py or tests/slurm.py."""
    return any(getattr(value, "__module__", None) in ("tests.netns", "tests.slurm") for value in vars(module).values())


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `hosts` the tests that use the namespace hosts (tests/netns.py) or SLURM on them.

    `make test-integration` runs them in a pytest session of their own alongside the other
    integration tests: they mostly wait (on daemons, cut links, SLURM's time limit) while the
    others keep both cores busy. Each session still runs its tests one at a time. A test is
    one of them if its module imports from those helpers or it uses the shared SLURM cluster
    (fixture `slurm_shared`, also behind `slurm`), which needs no import.
    """
    for item in items:
        module = getattr(item, "module", None)
        if "slurm_shared" in getattr(item, "fixturenames", ()) or (module is not None and _uses_the_hosts(module)):
            item.add_marker(pytest.mark.hosts)


# The "earlier cells" of the integration tests' notebook: a small model, data and a loss,
# all defined in the kernel (so they reach the workers only by nbtrain's shipping).
NOTEBOOK_SETUP = '''
import torch

class ToyData(torch.utils.data.Dataset):
    """320 samples of a 4-class problem, the same on every call."""
    def __init__(self, n=320):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 16, generator=g)
        self.y = (self.x[:, :4].argmax(dim=1))
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return self.x[i], self.y[i]

def make_model():
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))

def loss_fn(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x).float(), y)

def paced_loss(model, batch):
    import time
    time.sleep(0.05)  # a step of at least 50 ms: a long run waiting to be stopped mostly idles
    return loss_fn(model, batch)
'''
# The long runs a test stops, interrupts, cuts off or times out: what they train does not
# matter, and at full speed they would keep every core busy until then (slowing the tests
# that run alongside).
PACED_FIT = "bigtrain.fit(make_model(), ToyData(), loss_fn=paced_loss)"

# Every rank trains; a test then makes one of them misbehave at step 3 (cell line 11).
LOOP = """
import os, signal, time
engine, loader = bigtrain.prepare(make_model(), ToyData())
for x, y in loader:
    loss = loss_fn(engine, (x, y))
    engine.backward(loss)
    engine.step()
    bigtrain.log(loss=loss.item())
    if engine.global_steps == 3:
        {misbehave}
"""


def worker_processes(marker: str) -> list[psutil.Process]:
    """Return live nbtrain worker processes whose command line mentions `marker`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "nbtrain.worker" in cmdline and marker in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def wait_until_gone(marker: str, timeout: float) -> float:
    """Wait for every worker mentioning `marker` to exit; return the seconds it took."""
    begun = time.monotonic()
    while worker_processes(marker):
        if time.monotonic() - begun > timeout:
            alive = [p.pid for p in worker_processes(marker)]
            raise AssertionError(f"workers still running after {timeout} s: {alive}")
        time.sleep(0.1)
    return time.monotonic() - begun


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    """A fresh kernel in `tmp_path` with nbtrain loaded and the setup cell run."""
    k = Kernel(tmp_path)
    try:
        k.execute("%load_ext nbtrain")
        k.execute(NOTEBOOK_SETUP)
        yield k
    finally:
        k.shutdown()
        # Whatever happened in the test, no worker of it may outlive it.
        wait_until_gone(str(tmp_path), timeout=30)


def only_run(root: Path) -> Path:
    """Return the single run directory under `root`."""
    runs = [p for p in (root / "bigtrain-runs").iterdir() if p.is_dir()]
    assert len(runs) == 1, f"expected one run directory, found {[p.name for p in runs]}"
    return runs[0]


def status_of(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def has_trained(root: Path, name: str) -> Callable[[], bool]:
    """Return a condition: the run `name` under `root` has logged a step (to interrupt it mid-training)."""
    def condition() -> bool:
        return any(f.stat().st_size for f in (root / "bigtrain-runs").glob(f"*-{name}-*/metrics/rank-0.jsonl"))
    return condition


def losses(run: Path) -> list[float]:
    """Return rank 0's logged loss per step, in step order."""
    records = [json.loads(line) for line in (run / "metrics" / "rank-0.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted(records, key=lambda r: r["step"]) if "loss" in r]
