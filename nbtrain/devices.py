"""Read what the devices are doing: a process's CPU and memory, GPUs through NVML, CPU energy through RAPL.

The one reader of devices: the workers' sampler (`nbtrain.worker.utilization`), the server
API's machine-wide readings (`machine_stats`) and the kernel's GPU count
(`nbtrain.config.machine.count_gpus`) all read through it. Every reader works where its device
is missing: NVML without a driver or library reports no GPU (with the reason), RAPL
without a readable counter reports None; nothing here raises because a machine lacks
hardware. NVML is imported only when a `Gpus` is made, never at `import nbtrain`.
"""

from __future__ import annotations

import os
import platform
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POWERCAP = Path("/sys/class/powercap")


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment; power and energy are None where the GPU does not report them."""

    index: int
    name: str
    util_percent: float
    mem_used_bytes: int
    mem_total_bytes: int
    power_w: float | None
    energy_j: float | None  # NVML's counter: joules since the driver was loaded


class Gpus:
    """The machine's NVIDIA GPUs through NVML; `count` is 0 (and `problem` says why) without them."""

    def __init__(self) -> None:
        self.count, self.problem = 0, ""
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.count = int(pynvml.nvmlDeviceGetCount())
            self._nvml = pynvml
        except ImportError:
            self.problem = "nvidia-ml-py is not installed"
        except Exception as e:  # noqa: BLE001 - NVMLError of every kind: no driver, no library, no GPU
            self.problem = str(e) or type(e).__name__
        if self._nvml is not None and self.count == 0:
            self.problem = "NVML sees no GPU"

    def read(self, index: int, power: bool = True) -> GpuReading | None:
        """Return GPU `index` now, or None if NVML cannot read it (power and energy only if `power`)."""
        if self._nvml is None or not 0 <= index < self.count:
            return None
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            util = nvml.nvmlDeviceGetUtilizationRates(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        except nvml.NVMLError:
            return None
        return GpuReading(index=index, name=name.decode() if isinstance(name, bytes) else str(name),
                          util_percent=float(util.gpu), mem_used_bytes=int(memory.used),
                          mem_total_bytes=int(memory.total),
                          power_w=_optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0, nvml)
                          if power else None,
                          energy_j=_optional(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0,
                                             nvml) if power else None)

    def process_memory(self) -> dict[int, dict[int, int | None]]:
        """Return the GPU memory of every compute process NVML lists: {pid: {GPU index: bytes}}.

        A process appears on each GPU where it holds a CUDA context; bytes is None where the
        driver does not tell (the real library's value for "not available"). The pids are those
        of the PID namespace NVML runs in: in a container that does not share the host's, they
        match no process here, and every process reads as holding nothing.
        """
        found: dict[int, dict[int, int | None]] = {}
        if self._nvml is None:
            return found
        nvml = self._nvml
        for index in range(self.count):
            try:
                processes = nvml.nvmlDeviceGetComputeRunningProcesses(nvml.nvmlDeviceGetHandleByIndex(index))
            except nvml.NVMLError:
                continue  # "Not Supported" on some virtualised GPUs: that GPU lists nobody
            for process in processes:
                used = process.usedGpuMemory
                found.setdefault(int(process.pid), {})[index] = None if used is None else int(used)
        return found

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
            self._nvml = None


def gpu_stats() -> list[dict[str, Any]]:
    """Return each GPU's utilization and memory, or [] where NVML cannot read them all."""
    gpus = Gpus()
    try:
        # The sidebar shows no power: two NVML calls per GPU and poll saved.
        readings = [gpus.read(index, power=False) for index in range(gpus.count)]
    finally:
        gpus.close()
    if any(reading is None for reading in readings):  # a GPU that fell off the bus mid-query: report none
        return []
    return [{"index": r.index, "name": r.name, "utilization_percent": r.util_percent,
             "memory_used_bytes": r.mem_used_bytes, "memory_total_bytes": r.mem_total_bytes}
            for r in readings if r is not None]


def machine_stats() -> dict[str, Any]:
    """Return the machine's CPU (since the previous call) and RAM use, and the GPUs."""
    import psutil

    memory = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(None), "cpu_count": psutil.cpu_count(),
        "memory_used_bytes": int(memory.total - memory.available), "memory_total_bytes": int(memory.total),
        "memory_percent": float(memory.percent), "gpus": gpu_stats(),
    }


def gpu_memory_of(pids: Iterable[int]) -> dict[int, dict[int, int | None]] | None:
    """Return the GPU memory each of `pids` holds, per GPU index ({} for none); None where there is no GPU."""
    gpus = Gpus()
    try:
        if gpus.count == 0:
            return None
        listed = gpus.process_memory()
    finally:
        gpus.close()
    return {pid: listed.get(pid, {}) for pid in pids}


def held_bytes(per_gpu: dict[int, int | None]) -> int:
    """Return the bytes a process holds over all its GPUs (those the driver does not report count 0)."""
    return sum(used for used in per_gpu.values() if used is not None)


class ProcessGpuMemory:
    """The GPU memory one process holds (NVML per process), read at most once every `every_s` seconds.

    For views that poll often (the dashboard ticks five times a second): NVML stays open
    between reads, as opening it can take a while, and closes when the reader is collected.
    """

    def __init__(self, pid: int, every_s: float = 1.0):
        self.pid, self.every_s = pid, every_s
        self._gpus: Gpus | None = None
        self._next = 0.0

    def read(self) -> int | None:
        """Return the bytes the process holds now (0 if it is on no GPU); None between reads or without GPUs."""
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + self.every_s
        if self._gpus is None:
            self._gpus = Gpus()
            weakref.finalize(self, self._gpus.close)
        if self._gpus.count == 0:
            return None
        return held_bytes(self._gpus.process_memory().get(self.pid, {}))


def _optional(read: Any, nvml: Any) -> float | None:
    # Power and energy are "Not Supported" on many GPUs (older or virtualised ones).
    try:
        return float(read())
    except nvml.NVMLError:
        return None


def gpu_index_for(local_rank: int, gpu_count: int, visible: str | None) -> int | None:
    """Return the NVML index of the GPU that a rank uses, or None if it uses none.

    A rank uses CUDA device `local_rank`; CUDA_VISIBLE_DEVICES renumbers devices, NVML does not.
    """
    if visible is not None:
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        if not entries or entries[0] == "-1" or local_rank >= len(entries):
            return None
        if not entries[local_rank].isdigit():
            return None  # UUIDs or MIG names: no reliable NVML index for them
        index = int(entries[local_rank])
    else:
        index = local_rank
    return index if index < gpu_count else None


class Rapl:
    """The CPU packages' energy counters (Linux powercap/RAPL), summed; `readable` False where they are not."""

    def __init__(self, root: Path = POWERCAP):
        self._zones = [zone for zone in sorted(root.glob("intel-rapl:*")) if _is_package(zone)]
        self._last: dict[Path, int] = {}
        self._total_uj = 0
        self.readable = bool(self._zones) and self.read_j() is not None

    def read_j(self) -> float | None:
        """Return the joules used by every CPU package since this reader was made (counter wraps handled)."""
        for zone in self._zones:
            try:
                now = int((zone / "energy_uj").read_text())
                span = int((zone / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                return None  # on most machines only root may read energy_uj
            before = self._last.get(zone, now)
            self._total_uj += now - before if now >= before else now + span - before
            self._last[zone] = now
        return self._total_uj / 1e6 if self._zones else None


def _is_package(zone: Path) -> bool:
    # Top-level zones are packages ("package-0"); sub-zones (intel-rapl:0:0 = core, dram) are inside them.
    try:
        return zone.name.count(":") == 1 and (zone / "name").read_text().startswith("package")
    except OSError:
        return False


# CPU time is counted in clock ticks (10 ms): over a few milliseconds a CPU % is noise (it read
# 974 % and 1,760 % on 2 cores when the sampler's first reading came right after it started).
MIN_CPU_INTERVAL_S = 0.5


class ProcessMeter:
    """CPU % (100 = one core busy; up to 100 x cores) and resident memory of one process, through psutil.

    CPU % is the process's CPU time over the wall time since the previous measurement. A
    reading less than MIN_CPU_INTERVAL_S after it repeats the previous figure (None before
    the first), so readers never get a figure measured over too short a time.
    """

    def __init__(self, pid: int | None = None):
        import psutil

        self._process = psutil.Process(pid)
        self._since = (time.monotonic(), self._cpu_seconds())
        self._percent: float | None = None

    def _cpu_seconds(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system)

    def read(self) -> tuple[float | None, int]:
        with self._process.oneshot():
            now, used = time.monotonic(), self._cpu_seconds()
            if now - self._since[0] >= MIN_CPU_INTERVAL_S:
                self._percent = (used - self._since[1]) / (now - self._since[0]) * 100
                self._since = (now, used)
            return self._percent, int(self._process.memory_info().rss)


def cpu_name() -> str:
    """Return the CPU's model name, e.g. "AMD EPYC 7B13"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def visible_devices() -> str | None:
    """Return CUDA_VISIBLE_DEVICES as the workers see it (None when unset)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")
