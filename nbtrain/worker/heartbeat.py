"""Heartbeats: each rank says once a second how far it got, so the kernel can name a hung rank.

A worker's heartbeat (`heartbeats/rank-<r>.json`) holds its optimizer step, whether its main
thread is waiting inside a collective (a torch.distributed / DeepSpeed comm call), since when
that has been so, and where in the cell it is. The kernel (`find_hang`) calls a run hung when a
rank has waited in a collective for longer than the hang timeout while another rank made no
progress outside one (or stopped beating altogether): that other rank is the hung one.

Only the standard library here: the kernel imports `find_hang`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

BEAT_S = 1.0
CELL_FILENAME = "<bigtrain cell>"
# Frames of these files mean "waiting for the other ranks".
_COLLECTIVE_PARTS = ("/torch/distributed/", "/deepspeed/comm/")


def heartbeat_file(run_path: Path, rank: int) -> Path:
    return run_path / "heartbeats" / f"rank-{rank}.json"


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


def read_heartbeats(run_path: Path, ranks: int) -> dict[int, dict[str, Any]]:
    """Return the ranks' latest heartbeats (ranks that never beat are left out)."""
    found = {}
    for rank in range(ranks):
        try:
            found[rank] = json.loads(heartbeat_file(run_path, rank).read_text())
        except (OSError, ValueError):
            continue
    return found


def find_hang(beats: dict[int, dict[str, Any]], timeout: float, now: float) -> tuple[int, str] | None:
    """Return the hung rank and the reason, or None while nothing looks hung."""
    waiting = [r for r, b in beats.items() if b["waiting"] and now - b["since"] > timeout
               and now - b["time"] < timeout]
    if not waiting:
        return None
    silent = [r for r, b in beats.items() if now - b["time"] > timeout]
    stuck = [r for r, b in beats.items() if not b["waiting"] and now - b["since"] > timeout]
    for rank in silent + stuck:
        beat = beats[rank]
        others = ", ".join(str(r) for r in waiting)
        if rank in silent:  # its last beat may be up to a second older than its last step
            what = f"sent no heartbeat for {now - beat['time']:.0f} s (frozen or stopped; last heard of at step"
        else:
            what = f"hung for {now - beat['since']:.0f} s at {beat['where']} (no progress since step"
        return rank, (f"rank {rank} {what} {beat['step']}) while rank(s) {others} waited for it "
                      f"(--hang-timeout {timeout:g} s)")
    if len(waiting) == len(beats):
        where = "; ".join(f"rank {r} at {beats[r]['where']}" for r in waiting)
        return waiting[0], (f"every rank waited in a collective for over {timeout:g} s (a deadlock: the ranks "
                            f"called different collectives): {where}")
    return None
