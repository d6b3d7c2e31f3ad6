"""Machine-wide utilization: CPU and RAM through psutil, each GPU through NVML.

No NVML (no driver, no GPU, no library) is the normal state of a CPU machine: it gives
`"gpus": []`, never an error.
"""

from __future__ import annotations

from typing import Any

import psutil


def gpu_stats() -> list[dict[str, Any]]:
    """Return each GPU's utilization and memory, or [] where NVML cannot be used."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no library or no driver: a machine without GPUs
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append({
                "index": index, "name": name.decode() if isinstance(name, bytes) else str(name),
                "utilization_percent": float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                "memory_used_bytes": int(memory.used), "memory_total_bytes": int(memory.total),
            })
        return gpus
    except Exception:  # noqa: BLE001 - a GPU that fell off the bus mid-query: report none rather than fail
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001, S110 - shutting down after a failed query
            pass


def machine_stats() -> dict[str, Any]:
    """Return CPU (since the previous call) and RAM use, and the GPUs."""
    memory = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(None), "cpu_count": psutil.cpu_count(),
        "memory_used_bytes": int(memory.total - memory.available), "memory_total_bytes": int(memory.total),
        "memory_percent": float(memory.percent), "gpus": gpu_stats(),
    }
