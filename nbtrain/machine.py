"""What this machine can run: GPUs, and the libraries DeepSpeed needs for some features.

Detected without importing torch or initialising CUDA in the kernel (NVML only asks the
driver), so that asking never costs seconds nor changes the kernel's state.
"""

from __future__ import annotations

import ctypes.util
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class MachineFacts:
    """The facts validation needs about the machine the workers will run on."""

    gpu_count: int = 0
    has_libaio: bool = True

    @property
    def cuda(self) -> bool:
        return self.gpu_count > 0


def count_gpus() -> int:
    """Return the number of visible NVIDIA GPUs (0 where there is no driver)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, no library: no GPU, which is a normal state
        return 0
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
    return MachineFacts(gpu_count=count_gpus(), has_libaio=ctypes.util.find_library("aio") is not None)
