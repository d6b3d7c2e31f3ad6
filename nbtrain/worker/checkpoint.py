"""Checkpoints that a crash cannot corrupt, and what `--resume` needs to continue exactly.

A checkpoint is saved in three moves (every rank takes part):
1. each rank writes its DeepSpeed files and its own `nbtrain-rank-<r>.pt` (RNG states, data
   position) into `checkpoints/.partial-<tag>/`;
2. a barrier: every rank has finished writing;
3. rank 0 syncs the files to disk, renames the folder to `checkpoints/<tag>/` and only then
   replaces the pointer `checkpoints/latest.json` (and DeepSpeed's `latest`) atomically.
A crash before step 3 leaves a `.partial-*` folder that no pointer names (it is removed at
the next save); the last published checkpoint stays as it was.

The pointer's reading side (`published`, `find_run`) is `nbtrain.rundir.checkpoints`: the
kernel uses it to check `--resume` before anything starts.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
from pathlib import Path
from typing import Any

from nbtrain.rundir.checkpoints import PARTIAL_PREFIX, POINTER, Published

RANK_STATE = "nbtrain-rank-{rank}.pt"
NEARLY_FULL_BYTES = 1 << 20


# -- the worker side (torch and DeepSpeed are imported where used) --------------------------
def capture_rng() -> dict[str, Any]:
    """Return this process's RNG states: torch (CPU and CUDA), numpy and Python's."""
    import numpy as np
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back RNG states taken by `capture_rng`."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine: Any, checkpoints: Path, tag: str, rank: int, rank_state: dict[str, Any]) -> Path:
    """Save `engine` and `rank_state` as checkpoint `tag`; publish it once every rank is done.

    Every rank must call this (it contains collectives). Returns the published folder.
    """
    import torch
    import torch.distributed as dist

    partial = checkpoints / f"{PARTIAL_PREFIX}{tag}"
    if rank == 0:
        for leftover in checkpoints.glob(f"{PARTIAL_PREFIX}*"):  # from a save that crashed
            shutil.rmtree(leftover, ignore_errors=True)
    _barrier(dist)
    try:
        partial.mkdir(parents=True, exist_ok=True)
        torch.save(rank_state, partial / RANK_STATE.format(rank=rank))
        # DeepSpeed's own save ends with a barrier: after it, every rank's files are written.
        engine.save_checkpoint(str(checkpoints), tag=partial.name, save_latest=False)
    except BaseException as e:
        # torch.save reports a full disk without its errno: look before freeing the room.
        full = shutil.disk_usage(checkpoints).free < NEARLY_FULL_BYTES
        shutil.rmtree(partial, ignore_errors=True)  # never published; give the space back
        if full:
            raise OSError(errno.ENOSPC, f"No space left on device while saving checkpoint {tag}",
                          str(checkpoints)) from e
        raise
    final = checkpoints / tag
    if rank == 0:
        _publish(partial, final, engine, tag)
    _barrier(dist)  # no rank goes on (or reports the path) before the pointer is there
    return final


def _publish(partial: Path, final: Path, engine: Any, tag: str) -> None:
    from nbtrain.rundir import write_json_atomic

    for path in partial.rglob("*"):
        if path.is_file():
            _fsync(path)
    replaced = final.with_name(f".replaced-{tag}")
    if final.exists():  # the same tag saved again: the new one replaces it
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(partial, final)
    _fsync(final.parent)
    write_json_atomic(final.parent / POINTER, {
        "tag": tag, "step": int(engine.global_steps), "world_size": int(engine.world_size),
        "zero_stage": int(engine.zero_optimization_stage()),
    })
    deepspeed_latest = final.parent / ".latest.tmp"
    deepspeed_latest.write_text(tag)
    os.replace(deepspeed_latest, final.parent / "latest")
    shutil.rmtree(replaced, ignore_errors=True)


def load(engine: Any, checkpoint: Published, rank: int) -> dict[str, Any]:
    """Load `checkpoint` into `engine`; return this rank's own state (RNG, data position)."""
    import torch

    path, _ = engine.load_checkpoint(str(checkpoint.path.parent), tag=checkpoint.tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {checkpoint.path}")
    state: dict[str, Any] = torch.load(checkpoint.path / RANK_STATE.format(rank=rank), weights_only=False)
    return state


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _barrier(dist: Any) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
