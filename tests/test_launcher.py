"""The launcher's own housekeeping (process lifetime is tested through a kernel in test_run.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from nbtrain.launch.launcher import clear_stale_op_locks


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
