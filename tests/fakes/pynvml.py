"""A stand-in for nvidia-ml-py (`import pynvml`) on machines without an NVIDIA driver.

Put tests/fakes first on PYTHONPATH and code that uses NVML sees GPUs. It keeps the real
library's surface and manners: the same function names and units (mW, mJ, bytes),
`NVMLError` subclasses picked by error code, "Uninitialized" before `nvmlInit`, "Invalid
Argument" for a bad index or handle, counters that only go up. Set by the environment:
FAKE_NVML_GPUS (default 2), FAKE_NVML_NAME (default "NVIDIA H100 80GB HBM3"),
FAKE_NVML_DRIVER=missing (nvmlInit fails as it does without a driver),
FAKE_NVML_POWER=unsupported (power and energy raise "Not Supported", as on many GPUs),
FAKE_NVML_PROCESSES="GPU:PID:BYTES,..." (the compute processes each GPU lists, e.g. "0:4242:1073741824";
BYTES "-" for a process whose memory NVML cannot report, which the real library gives as None),
FAKE_NVML_PROCESSES_FILE (a file holding that same text, read at every call: for a process that is
already running when the test learns the pids).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
}


class NVMLError(Exception):
    """Like pynvml.NVMLError: `NVMLError(code)` makes the subclass for that code; `.value` is the code."""

    _by_code: dict[int, type[NVMLError]] = {}

    def __new__(cls, value: int) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._by_code.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML Error with code {self.value}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NVMLError) and self.value == other.value

    __hash__ = Exception.__hash__


def _error_class(name: str, code: int) -> type[NVMLError]:
    cls = type(name, (NVMLError,), {})
    NVMLError._by_code[code] = cls
    return cls


NVMLError_Uninitialized = _error_class("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_InvalidArgument = _error_class("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)


@dataclass(frozen=True)
class c_nvmlUtilization_t:  # the real library's name
    gpu: int
    memory: int


@dataclass(frozen=True)
class c_nvmlMemory_t:
    total: int
    free: int
    used: int


@dataclass
class c_nvmlProcessInfo_t:  # what the real library returns per process (v3 struct, as an object)
    pid: int
    usedGpuMemory: int | None  # bytes; None where the driver cannot tell (the real library's value)
    gpuInstanceId: int = 0xFFFFFFFF  # no MIG
    computeInstanceId: int = 0xFFFFFFFF


@dataclass(frozen=True)
class _Handle:
    index: int


_state = {"initialised": 0, "started": 0.0}
_TOTAL_MEMORY = 80 * 1024**3
_POWER_MW = 350_000  # a GPU under load, per the spec sheets


def _check_init() -> None:
    if _state["initialised"] <= 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)


def _gpu_count() -> int:
    return int(os.environ.get("FAKE_NVML_GPUS", "2"))


def _device(handle: object) -> int:
    _check_init()
    if not isinstance(handle, _Handle) or not 0 <= handle.index < _gpu_count():
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return handle.index


def nvmlInit() -> None:
    if os.environ.get("FAKE_NVML_DRIVER") == "missing":
        raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED)
    if _state["initialised"] == 0:
        _state["started"] = time.time() - 1000.0  # the driver was loaded a while ago
    _state["initialised"] += 1  # the real library counts nested inits too


def nvmlShutdown() -> None:
    _check_init()
    _state["initialised"] -= 1


def nvmlErrorString(result: int) -> str:
    return _MESSAGES.get(result, "Unknown Error")


def nvmlDeviceGetCount() -> int:
    _check_init()
    return _gpu_count()


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    handle = _Handle(int(index))
    _device(handle)
    return handle


def nvmlDeviceGetName(handle: _Handle) -> str:
    _device(handle)
    return os.environ.get("FAKE_NVML_NAME", "NVIDIA H100 80GB HBM3")


def nvmlDeviceGetUtilizationRates(handle: _Handle) -> c_nvmlUtilization_t:
    index = _device(handle)
    # Busy, and not the same number every time, as a training GPU is.
    busy = 60 + (int(time.time() * 7) + 13 * index) % 40
    return c_nvmlUtilization_t(gpu=busy, memory=busy // 2)


def nvmlDeviceGetMemoryInfo(handle: _Handle, version: int | None = None) -> c_nvmlMemory_t:
    index = _device(handle)
    used = (10 + index) * 1024**3
    return c_nvmlMemory_t(total=_TOTAL_MEMORY, free=_TOTAL_MEMORY - used, used=used)


def _power_supported() -> None:
    if os.environ.get("FAKE_NVML_POWER") == "unsupported":
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)


def nvmlDeviceGetPowerUsage(handle: _Handle) -> int:
    _device(handle)
    _power_supported()
    return _POWER_MW


def nvmlDeviceGetTotalEnergyConsumption(handle: _Handle) -> int:
    """Return millijoules since the driver was loaded: advances at the reported power."""
    _device(handle)
    _power_supported()
    return int((time.time() - _state["started"]) * _POWER_MW)


def _process_spec() -> str:
    spec = os.environ.get("FAKE_NVML_PROCESSES", "")
    path = os.environ.get("FAKE_NVML_PROCESSES_FILE")
    if path:
        try:
            with open(path) as f:
                spec = f.read()
        except OSError:
            spec = ""
    return spec


def nvmlDeviceGetComputeRunningProcesses(handle: _Handle) -> list[c_nvmlProcessInfo_t]:
    """Return the compute processes on the GPU with the memory each uses, as nvidia-ml-py does."""
    index = _device(handle)
    found = []
    for entry in filter(None, (part.strip() for part in _process_spec().split(","))):
        gpu, pid, used = entry.split(":")
        if int(gpu) == index:
            found.append(c_nvmlProcessInfo_t(pid=int(pid), usedGpuMemory=None if used == "-" else int(used)))
    return found


# The real library's versioned names of the same call.
nvmlDeviceGetComputeRunningProcesses_v3 = nvmlDeviceGetComputeRunningProcesses
nvmlDeviceGetComputeRunningProcesses_v2 = nvmlDeviceGetComputeRunningProcesses
