"""A run's start-up timeline on one rank: when each phase began; rank 0 publishes it at each change.

Start-up can take minutes (on a GPU the first run JIT-builds DeepSpeed's ops: fused_adam,
cpu_adam, the ZeRO++ quantizer), and a view that only waits for the first step says nothing
all that time. Rank 0 therefore rewrites `logs/rank-0.timeline.json` whenever a phase begins,
a handful of small writes per run, none once training runs; `nbtrain.rundir.progress.startup` turns
it into words for every view. Format: docs/run-directory.md.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


class Timeline:
    """When each start-up phase of a run began on this rank (unix s), and the ops built on the way."""

    def __init__(self, publish_to: Path | None = None, **marks: float):
        self.marks = {name: when for name, when in marks.items() if isinstance(when, float) and math.isfinite(when)}
        self.ops: list[dict[str, Any]] = []
        self._path = publish_to

    def __contains__(self, name: str) -> bool:
        return name in self.marks

    def __getitem__(self, name: str) -> float:
        return self.marks[name]

    def mark(self, name: str, when: float | None = None, publish: bool = True) -> None:
        """Record that `name` happens now (or at `when`; a time that is not a number is left out), and publish."""
        when = time.time() if when is None else when
        if isinstance(when, (int, float)) and math.isfinite(when):
            self.marks[name] = float(when)
        if publish:
            self.publish()

    def op_started(self, name: str, cached: bool) -> None:
        self.ops.append({"name": name, "started": time.time(), "cached": cached})
        self.publish()

    def op_ended(self, name: str) -> None:
        for op in self.ops:
            if op["name"] == name and "ended" not in op:
                op["ended"] = time.time()
        self.publish()

    def publish(self) -> None:
        """Write the timeline for the views (rank 0 only: the others have nowhere to publish)."""
        if self._path is None:
            return
        # Replaced whole (readers never see half of it) but not synced: what a starting run is
        # doing is news, not data, and the last write comes on the first step's path.
        tmp = self._path.with_name(f".{self._path.name}.tmp")
        try:
            tmp.write_text(json.dumps({**self.marks, "ops": self.ops}))
            os.replace(tmp, self._path)
        except OSError:
            pass  # a full disk is reported by what needs the disk


def watch_op_builds(current: Callable[[], Timeline | None]) -> None:
    """Mark each DeepSpeed op loaded just in time (built, or taken from the build cache) in the current timeline.

    DeepSpeed builds an op that was not prebuilt on its first use in an environment
    (`OpBuilder.jit_load`, through torch's cpp_extension) and loads the cached build later.
    """
    from deepspeed.ops.op_builder.builder import OpBuilder

    original = OpBuilder.jit_load
    if getattr(original, "_nbtrain_watched", False):
        return

    @functools.wraps(original)
    def jit_load(builder: Any, *args: Any, **kwargs: Any) -> Any:
        timeline = current()
        if timeline is None:
            return original(builder, *args, **kwargs)
        timeline.op_started(builder.name, cached=_built_before(builder.name))
        try:
            return original(builder, *args, **kwargs)
        finally:
            timeline.op_ended(builder.name)

    jit_load._nbtrain_watched = True  # type: ignore[attr-defined]
    OpBuilder.jit_load = jit_load  # type: ignore[method-assign]


def _built_before(name: str) -> bool:
    """Return whether torch's extension cache already holds a build of op `name` (it is then only loaded)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
    except Exception:  # noqa: BLE001 - a private torch helper: if it moved, call it a build
        return False
