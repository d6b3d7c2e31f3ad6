"""The launcher's own housekeeping (process lifetime is tested through a kernel in test_run.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nbtrain.launch.launcher import MALLOC_SETTINGS, clear_stale_op_locks, worker_environment


def test_a_stale_op_build_lock_is_removed_and_a_fresh_one_kept(tmp_path: Path) -> None:
    # Regression: a worker killed while loading a DeepSpeed op left `<op>/lock`, and every
    # later run on the machine hung at step 0 waiting for it.
    stale, fresh = tmp_path / "fused_adam" / "lock", tmp_path / "cpu_adam" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - 600
    os.utime(stale, (old, old))
    assert clear_stale_op_locks(tmp_path, building=lambda: True) == [], "a build in progress owns its locks"
    assert clear_stale_op_locks(tmp_path, building=lambda: False) == [stale]
    assert not stale.exists() and fresh.exists()


# A training step's temporaries: a small MLP's forward and backward on a batch (~3 MB of
# activations and gradients, freed each step), counting the minor page faults of 20 steps.
_STEP_FAULTS = """
import resource, torch
model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512))
x = torch.randn(256, 512)
def step():
    model(x).square().mean().backward()
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def test_workers_reuse_freed_memory_instead_of_faulting_in_fresh_pages_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # Regression (issue 15, throughput): glibc's default trimming and mmap threshold made each
    # step page-fault fresh zeroed pages for the temporaries the step before had freed (~300 a
    # step here, ~1,500 a step for the benchmark's two GPT-2 workers: system CPU on every step).
    for key in MALLOC_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    tuned = worker_environment(0, 1, 0, -1, 1)
    plain = {key: value for key, value in tuned.items() if key not in MALLOC_SETTINGS}

    def faults_a_step(env: dict[str, str]) -> float:
        out = subprocess.run([sys.executable, "-c", _STEP_FAULTS], env=env, capture_output=True, text=True, check=True)
        return float(out.stdout)

    # Noise on a shared machine only adds faults, so the best of three tuned runs is the
    # measure; it is compared with glibc's defaults measured in the same test (~500-950 here,
    # tuned ~25-100), not with a fixed count (CI's machine once crossed 100 at 102.4).
    best_tuned, untuned = min(faults_a_step(tuned) for _ in range(3)), faults_a_step(plain)
    assert best_tuned * 4 < untuned, f"{best_tuned} page faults a step with {MALLOC_SETTINGS}, {untuned} without"
    # A value the user set for a worker wins.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert worker_environment(0, 1, 0, -1, 1)["MALLOC_TRIM_THRESHOLD_"] == "0"


def test_workers_on_other_hosts_get_the_same_malloc_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: pdsh/standard launches forwarded only a fixed list of variables, without these."""
    from nbtrain.launch.cluster import worker_exports

    for key in MALLOC_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    exports = worker_exports(nproc=1, hang_timeout_s=60, tag="run-1")
    assert {key: exports.get(key) for key in MALLOC_SETTINGS} == MALLOC_SETTINGS
