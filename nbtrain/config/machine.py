"""What this machine can run: GPUs, and the libraries DeepSpeed needs for some features.

Detected without importing torch or initialising CUDA in the kernel (NVML only asks the
driver), so that asking never costs seconds nor changes the kernel's state.
"""

from __future__ import annotations

import ctypes.util
import os
from dataclasses import dataclass
from typing import Any

from nbtrain.errors import Problem


@dataclass(frozen=True)
class MachineFacts:
    """The facts validation needs about the machine the workers will run on."""

    gpu_count: int = 0  # the GPUs CUDA will show the workers (CUDA_VISIBLE_DEVICES applied)
    has_libaio: bool = True
    cuda_visible_devices: str | None = None  # as the workers inherit it; None when unset

    @property
    def cuda(self) -> bool:
        return self.gpu_count > 0

    def as_record(self) -> dict[str, Any]:
        """Return the facts as run.json keeps them (views of the run read them, e.g. the MFU note)."""
        return {"gpu_count": self.gpu_count, "cuda_visible_devices": self.cuda_visible_devices}

    def shown(self) -> str:
        """Return what the workers will see: "this machine shows 1 GPU (CUDA_VISIBLE_DEVICES=0)"."""
        visible = f" (CUDA_VISIBLE_DEVICES={self.cuda_visible_devices})" if self.cuda_visible_devices is not None else ""
        return f"this machine shows {gpus(self.gpu_count)}{visible}"


def gpus(count: int) -> str:
    """Return "1 GPU" or "N GPUs"."""
    return f"{count} GPU" + ("" if count == 1 else "s")


def too_few_gpus(nproc: int, gpu_count: int, shown: str, fix: str) -> Problem:
    """Return the refusal of `nproc` processes per machine where `shown` says only `gpu_count` GPUs are.

    On GPUs every rank takes the GPU of its local rank: the ranks beyond the GPU count
    would fail at start-up (accelerate's "device_id cuda:N is out of range") after the
    others had started.
    """
    return Problem("--nproc", nproc,
                   f"each process needs a GPU of its own, and {shown}; rank {gpu_count} would fail at start-up "
                   f"(\"device_id cuda:{gpu_count} is out of range\")",
                   f"use --nproc {gpu_count}, or {fix}")


def count_gpus() -> int:
    """Return the number of visible NVIDIA GPUs (0 where there is no driver)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    from nbtrain.devices import Gpus

    gpus = Gpus()  # no driver, no library: no GPU, which is a normal state
    try:
        count = gpus.count
    finally:
        gpus.close()
    if visible is not None:
        count = _visible_count(visible, count)
    return count


def _visible_count(visible: str, present: int) -> int:
    """Return how many GPUs CUDA shows for CUDA_VISIBLE_DEVICES=`visible` on `present` GPUs.

    Like CUDA: the list ends at its first invalid entry (an index that is not there).
    """
    count = 0
    for entry in (part.strip() for part in visible.split(",")):
        is_index = entry.lstrip("-").isdigit()
        if not entry or (is_index and not 0 <= int(entry) < present):
            break
        count += 1
    return min(count, present)


def detect_machine() -> MachineFacts:
    """Return the facts about this machine."""
    return MachineFacts(gpu_count=count_gpus(), has_libaio=ctypes.util.find_library("aio") is not None,
                        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
