"""Read the ranks' heartbeats and name a hung rank (the writer is `nbtrain.worker.heartbeat`).

A heartbeat (`heartbeats/rank-<r>.json`) holds a rank's optimizer step, whether its main
thread waits inside a collective, since when, and where in the cell it is. A run is hung when
a rank has waited in a collective for longer than the hang timeout while another rank made no
progress outside one (or stopped beating altogether): that other rank is the hung one.
Standard library only: the kernel's supervisor imports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nbtrain.rundir.layout import RunDirectory


def heartbeat_file(run_path: Path, rank: int) -> Path:
    """Return where `rank` of the run at `run_path` writes its heartbeat."""
    return RunDirectory(run_path).heartbeat_file(rank)


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
