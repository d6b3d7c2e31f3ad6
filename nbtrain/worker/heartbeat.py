"""Heartbeats: each rank says once a second how far it got, so the kernel can name a hung rank.

A worker's heartbeat (`heartbeats/rank-<r>.json`) holds its optimizer step, whether its main
thread is waiting inside a collective (a torch.distributed / DeepSpeed comm call), since when
that has been so, and where in the cell it is. The kernel (`find_hang`) calls a run hung when a
rank has waited in a collective for longer than the hang timeout while another rank made no
progress outside one (or stopped beating altogether): that other rank is the hung one.

The readers (`read_heartbeats`, `find_hang`) live in `nbtrain.rundir.heartbeats`: the kernel uses them.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from nbtrain.rundir.heartbeats import heartbeat_file

BEAT_S = 1.0
CELL_FILENAME = "<bigtrain cell>"
# Frames of these files mean "waiting for the other ranks".
_COLLECTIVE_PARTS = ("/torch/distributed/", "/deepspeed/comm/")


class Heartbeat:
    """Write this rank's heartbeat every second from a daemon thread; `context.engine` gives the step."""

    def __init__(self, run_path: Path, rank: int):
        self.context: Any = None  # the BigTrain object, once there is one
        self._path = heartbeat_file(run_path, rank)
        self._rank = rank
        self._main = threading.main_thread().ident
        self._state: tuple[int, bool] | None = None
        self._since = time.time()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nbtrain-heartbeat", daemon=True)
        self._fd: int | None = None
        self._width = 0  # bytes of the longest beat written so far

    def start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self) -> None:
        """End the heartbeat (a warm worker between runs beats for no run)."""
        self._stopped.set()
        self._thread.join()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._beat()
            except OSError:
                pass  # a full disk must not end the worker from here; training reports it
            self._stopped.wait(BEAT_S)

    def _beat(self) -> None:
        frame = sys._current_frames().get(self._main or 0)
        waiting, where = _locate(frame)
        step = int(getattr(getattr(self.context, "engine", None), "global_steps", 0) or 0)
        now = time.time()
        if self._state != (step, waiting):
            self._state, self._since = (step, waiting), now
        self._write(json.dumps({"time": now, "rank": self._rank, "step": step, "waiting": waiting,
                                "since": self._since, "where": where}).encode())

    def _write(self, beat: bytes) -> None:
        # Rewritten in place, padded with spaces (JSON allows them) to the longest beat so far,
        # and never synced: a heartbeat is only news while the worker lives. A new file and a
        # rename each second cost ~0.3 ms of CPU on ext4, and a journal commit; this ~5 us.
        # A reader that catches a write half done gets invalid JSON and skips this beat.
        if self._fd is None:
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT, 0o644)
        self._width = max(self._width, len(beat))
        os.pwrite(self._fd, beat.ljust(self._width), 0)


def _locate(frame: Any) -> tuple[bool, str]:
    """Return whether the stack waits in a collective, and the innermost cell line (or frame)."""
    waiting, cell_line, innermost = False, None, None
    while frame is not None:
        filename = frame.f_code.co_filename
        if innermost is None:
            innermost = f"{os.path.basename(filename)}:{frame.f_lineno}"
        if any(part in filename for part in _COLLECTIVE_PARTS):
            waiting = True
        if cell_line is None and filename == CELL_FILENAME:
            cell_line = f"cell line {frame.f_lineno}"
        frame = frame.f_back
    return waiting, cell_line or innermost or "?"
