"""A worker's utilization sampler: one record a second in `utilization/rank-<r>.jsonl`.

Each record (format in docs/run-directory.md) says which device the rank uses, CPU or
GPU, and what it is doing. The thread is a daemon that spends well under a millisecond
a second; it must never take the training down, so every failure ends only the sampler.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import IO, Any

from nbtrain.devices import Gpus, ProcessMeter, Rapl, cpu_name, gpu_index_for, visible_devices
from nbtrain.rundir import RunDirectory

SAMPLE_EVERY_S = 1.0


def utilization_file(run: RunDirectory, rank: int) -> Path:
    return run.utilization_file(rank)


class UtilizationSampler:
    """Read this process's CPU and memory, its GPU (NVML) and, on local rank 0, the CPU energy (RAPL)."""

    def __init__(self, rank: int, local_rank: int):
        self.rank = rank
        self.process = ProcessMeter()
        self.gpus = Gpus()
        self.gpu_index = gpu_index_for(local_rank, self.gpus.count, visible_devices())
        # RAPL counts the whole machine: one rank per machine reports it, or it would be counted twice.
        self.rapl = Rapl() if local_rank == 0 else None
        self._cpu_name = cpu_name()

    def record(self) -> dict[str, Any]:
        """Return one utilization record for now."""
        cpu_percent, rss = self.process.read()
        record: dict[str, Any] = {"time": time.time(), "rank": self.rank, "cpu_percent": cpu_percent,
                                  "rss_bytes": rss}
        gpu = self.gpus.read(self.gpu_index) if self.gpu_index is not None else None
        if gpu is not None:
            record.update(device="gpu", device_name=gpu.name, gpu_index=gpu.index, gpu_util=gpu.util_percent,
                          gpu_mem_bytes=gpu.mem_used_bytes, gpu_mem_total_bytes=gpu.mem_total_bytes,
                          power_w=gpu.power_w, energy_j=gpu.energy_j)
        else:
            record.update(device="cpu", device_name=self._cpu_name)
            if self.gpus.problem:
                record["no_gpu_reason"] = self.gpus.problem
        if self.rapl is not None and self.rapl.readable:
            record["cpu_energy_j"] = self.rapl.read_j()
        return record


def start_sampler(run_dir: RunDirectory, rank: int, every_s: float = SAMPLE_EVERY_S,
                  stop: threading.Event | None = None) -> None:
    """Start the daemon thread that appends a utilization record every `every_s` seconds (until `stop` is set)."""
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    threading.Thread(target=_sample, args=(run_dir, rank, local_rank, every_s, stop or threading.Event()),
                     name="nbtrain-utilization", daemon=True).start()


def _sample(run_dir: RunDirectory, rank: int, local_rank: int, every_s: float, stop: threading.Event) -> None:
    path = utilization_file(run_dir, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sampler = UtilizationSampler(rank, local_rank)
        out: IO[str] = open(path, "a", buffering=1)  # line-buffered: each record reaches the file whole
    except Exception as e:  # noqa: BLE001 - no sampler is better than no training
        _note(run_dir, rank, f"utilization sampler did not start: {type(e).__name__}: {e}")
        return
    with out:
        while not stop.is_set():
            try:
                out.write(json.dumps(sampler.record()) + "\n")
            except Exception as e:  # noqa: BLE001 - the same: end the sampler, keep training
                _note(run_dir, rank, f"utilization sampler stopped: {type(e).__name__}: {e}")
                return
            stop.wait(every_s)


def _note(run_dir: RunDirectory, rank: int, text: str) -> None:
    # The rank's log is where the user looks for what went wrong in a worker.
    try:
        with open(run_dir.log_file(rank), "a") as log:
            log.write(f"nbtrain: {text}\n")
    except OSError:
        pass
