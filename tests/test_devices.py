"""Device readings and the workers' utilization sampler: psutil for real, NVML through a fake
of nvidia-ml-py (tests/fakes/pynvml.py) that behaves like the real library, RAPL on a powercap tree."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest

from nbtrain.devices import MIN_CPU_INTERVAL_S, Gpus, ProcessMeter, Rapl, gpu_index_for
from nbtrain.rundir import RunDirectory
from nbtrain.worker.utilization import UtilizationSampler, start_sampler, utilization_file

FAKE = Path(__file__).parent / "fakes" / "pynvml.py"


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Make `import pynvml` give the fake (a fresh copy: the fake keeps init state like the real one)."""
    spec = importlib.util.spec_from_file_location("pynvml", FAKE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    spec.loader.exec_module(module)
    for name in ("FAKE_NVML_GPUS", "FAKE_NVML_NAME", "FAKE_NVML_DRIVER", "FAKE_NVML_POWER", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    return module


# -- the fake keeps the real library's manners -----------------------------------------------------
def test_fake_nvml_raises_like_the_real_library(fake_nvml: ModuleType) -> None:
    with pytest.raises(fake_nvml.NVMLError_Uninitialized):
        fake_nvml.nvmlDeviceGetCount()
    error = fake_nvml.NVMLError(fake_nvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    assert isinstance(error, fake_nvml.NVMLError_LibraryNotFound) and str(error) == "NVML Shared Library Not Found"
    fake_nvml.nvmlInit()
    with pytest.raises(fake_nvml.NVMLError_InvalidArgument):
        fake_nvml.nvmlDeviceGetHandleByIndex(7)
    handle = fake_nvml.nvmlDeviceGetHandleByIndex(1)
    first = fake_nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    time.sleep(0.01)
    assert fake_nvml.nvmlDeviceGetTotalEnergyConsumption(handle) > first, "the energy counter must advance"
    fake_nvml.nvmlShutdown()
    with pytest.raises(fake_nvml.NVMLError_Uninitialized):
        fake_nvml.nvmlDeviceGetName(handle)


# -- readers ---------------------------------------------------------------------------------------
def test_gpus_are_read_through_nvml(fake_nvml: ModuleType) -> None:
    gpus = Gpus()
    assert (gpus.count, gpus.problem) == (2, "")
    reading = gpus.read(1)
    assert reading is not None and reading.name == "NVIDIA H100 80GB HBM3"
    assert 0 <= reading.util_percent <= 100 and 0 < reading.mem_used_bytes < reading.mem_total_bytes
    assert reading.power_w == 350.0 and reading.energy_j is not None and reading.energy_j > 0
    assert gpus.read(2) is None and gpus.read(-1) is None, "a GPU that is not there reads as None"
    gpus.close()


def test_no_driver_means_no_gpu_with_the_reason(fake_nvml: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NVML_DRIVER", "missing")
    gpus = Gpus()
    assert gpus.count == 0 and gpus.problem == "Driver Not Loaded" and gpus.read(0) is None


def test_no_nvml_package_means_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # what `import` does when a package is absent
    gpus = Gpus()
    assert gpus.count == 0 and "not installed" in gpus.problem


def test_gpus_without_power_readings_still_report_utilization(fake_nvml: ModuleType,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NVML_POWER", "unsupported")
    reading = Gpus().read(0)
    assert reading is not None and reading.power_w is None and reading.energy_j is None
    assert reading.util_percent > 0


@pytest.mark.parametrize(("local_rank", "count", "visible", "expected"), [
    (0, 2, None, 0), (1, 2, None, 1), (2, 2, None, None),
    (0, 4, "2,3", 2), (1, 4, "2,3", 3), (2, 4, "2,3", None),
    (0, 4, "", None), (0, 4, "-1", None), (0, 4, "GPU-5d3c", None),
])
def test_a_rank_uses_the_gpu_that_cuda_visible_devices_maps_it_to(local_rank: int, count: int,
                                                                  visible: str | None, expected: int | None) -> None:
    assert gpu_index_for(local_rank, count, visible) == expected


def write_zone(root: Path, name: str, label: str, energy_uj: int, span: int = 1_000_000) -> Path:
    zone = root / name
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "name").write_text(label + "\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{span}\n")
    return zone


def test_rapl_sums_packages_and_survives_a_counter_wrap(tmp_path: Path) -> None:
    package0 = write_zone(tmp_path, "intel-rapl:0", "package-0", 900_000)
    write_zone(tmp_path, "intel-rapl:1", "package-1", 100_000)
    write_zone(tmp_path, "intel-rapl:0:0", "core", 5)  # a sub-zone: inside package 0, not added again
    rapl = Rapl(tmp_path)
    assert rapl.readable and rapl.read_j() == 0.0
    (package0 / "energy_uj").write_text("200000\n")  # wrapped past 1 000 000 µJ: 300 000 µJ used
    assert rapl.read_j() == pytest.approx(0.3)


def test_rapl_unreadable_or_missing_is_not_measurable(tmp_path: Path) -> None:
    assert not Rapl(tmp_path / "missing").readable
    zone = write_zone(tmp_path, "intel-rapl:0", "package-0", 5)
    (zone / "energy_uj").unlink()  # as for a non-root user on most kernels
    assert not Rapl(tmp_path).readable


def test_process_meter_sees_this_process_work() -> None:
    meter = ProcessMeter(os.getpid())
    deadline = time.monotonic() + MIN_CPU_INTERVAL_S
    while time.monotonic() < deadline:
        pass
    cpu, rss = meter.read()
    assert cpu is not None and 0 < cpu <= 100 * (os.cpu_count() or 1) + 5 and rss > 10 * 2**20


def test_process_meter_gives_no_cpu_figure_measured_over_milliseconds() -> None:
    # Regression: the sampler's first record, taken milliseconds after it started, read 974 % on 2 cores.
    meter = ProcessMeter(os.getpid())
    assert meter.read()[0] is None, "a CPU % over a few milliseconds is clock-tick noise"
    time.sleep(MIN_CPU_INTERVAL_S)
    measured = meter.read()[0]
    assert measured is not None and meter.read()[0] == measured, "a reading right after a measurement repeats it"


# -- the sampler ------------------------------------------------------------------------------------
def test_without_a_gpu_records_say_cpu(fake_nvml: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_NVML_DRIVER", "missing")
    record = UtilizationSampler(rank=1, local_rank=1).record()
    assert record["device"] == "cpu" and record["device_name"] and record["rank"] == 1
    assert record["no_gpu_reason"] == "Driver Not Loaded"
    assert "gpu_util" not in record and record["rss_bytes"] > 0


def test_with_gpus_each_rank_records_its_own(fake_nvml: ModuleType) -> None:
    record = UtilizationSampler(rank=3, local_rank=1).record()
    assert (record["device"], record["gpu_index"], record["device_name"]) == ("gpu", 1, "NVIDIA H100 80GB HBM3")
    for key in ("gpu_util", "gpu_mem_bytes", "power_w", "energy_j", "rss_bytes", "time"):
        assert record[key] is not None, key
    assert record["cpu_percent"] is None, "the first record comes too soon after the start for a CPU %"


def test_sampler_thread_appends_records_to_the_run_directory(tmp_path: Path, fake_nvml: ModuleType) -> None:
    run = RunDirectory.create(tmp_path, "20261125-083705-util-c302", {})
    stop = threading.Event()
    start_sampler(run, 0, every_s=0.02, stop=stop)
    path = utilization_file(run, 0)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and (not path.exists() or path.read_text().count("\n") < 3):
            time.sleep(0.02)
    finally:
        stop.set()
    records = [json.loads(line) for line in path.read_text().splitlines()[:3]]
    assert len(records) == 3 and [r["rank"] for r in records] == [0, 0, 0]
    assert records[0]["time"] < records[2]["time"] and records[2]["energy_j"] > records[0]["energy_j"]


@pytest.mark.gpu
def test_real_nvml_reads_this_machines_gpus() -> None:
    gpus = Gpus()
    if gpus.count == 0:  # like every gpu test: skipped with the reason where there is no GPU
        pytest.skip(f"no NVIDIA GPU visible here (NVML: {gpus.problem})")
    reading = gpus.read(0)
    assert reading is not None and reading.name.startswith(("NVIDIA", "Tesla", "Quadro"))
    assert 0 <= reading.util_percent <= 100 and 0 < reading.mem_used_bytes <= reading.mem_total_bytes
    record = UtilizationSampler(rank=0, local_rank=0).record()
    assert record["device"] == "gpu" and record["gpu_index"] == 0
    gpus.close()
