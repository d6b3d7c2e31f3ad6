"""A kernel that uses the GPU itself (issue 14, the real case behind "CUDA already initialized").

Its %%bigtrain cell still runs (workers are fresh processes; nothing on the kernel's side
calls into torch.cuda), and the dashboard's memory view shows the kernel's own GPU memory,
read through NVML per process (the kernel's pid), apart from the ranks'. No GPU exists here:
NVML is the fake of tests/fakes/pynvml.py listing the kernel's pid among its compute processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nbtrain.dashboard.store import RunMetrics
from nbtrain.dashboard.summary import KERNEL_GPU_LABEL, summary_rows, utilization_rows
from nbtrain.devices import Gpus, ProcessGpuMemory, gpu_memory_of
from nbtrain.rundir import RunDirectory
from tests.conftest import NOTEBOOK_SETUP, status_of, wait_until_gone
from tests.kernel import Kernel
from tests.nvml import fake_nvml_environment, use_fake_nvml

GIB = 2**30


def test_nvml_reports_each_processes_gpu_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    me = os.getpid()
    use_fake_nvml(monkeypatch, gpus=2, FAKE_NVML_PROCESSES=f"0:{me}:{GIB},1:{me}:{2 * GIB},1:4242:-")
    gpus = Gpus()
    assert gpus.process_memory() == {me: {0: GIB, 1: 2 * GIB}, 4242: {1: None}}
    gpus.close()
    assert gpu_memory_of([me, 99999]) == {me: {0: GIB, 1: 2 * GIB}, 99999: {}}
    reader = ProcessGpuMemory(me, every_s=3600)
    assert reader.read() == 3 * GIB
    assert reader.read() is None, "a second read within every_s must not ask NVML again"


def test_without_gpus_nothing_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_nvml(monkeypatch, gpus=1, FAKE_NVML_DRIVER="missing")
    assert gpu_memory_of([os.getpid()]) is None
    assert ProcessGpuMemory(os.getpid()).read() is None


def gpu_run(tmp_path: Path) -> RunDirectory:
    """A run whose kernel is this process, with one rank's GPU reading."""
    run = RunDirectory.create(tmp_path, "20261126-120000-kernel-a1b2", {"name": "kernel", "nproc": 1,
                                                                         "kernel_pid": os.getpid()})
    run.write_status(state="running", started=1000.0)
    path = run.path / "utilization" / "rank-0.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"time": 1001.0, "rank": 0, "cpu_percent": 50.0, "rss_bytes": GIB, "device": "gpu",
                                "device_name": "NVIDIA H100 80GB HBM3", "gpu_index": 0, "gpu_util": 70.0,
                                "gpu_mem_bytes": 14 * GIB, "gpu_mem_total_bytes": 80 * GIB}) + "\n")
    return run


def test_the_memory_view_shows_the_kernels_share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_nvml(monkeypatch, gpus=1, FAKE_NVML_PROCESSES=f"0:{os.getpid()}:{3 * GIB},0:4242:{11 * GIB}")
    metrics = RunMetrics(gpu_run(tmp_path))
    metrics.update()
    assert metrics.kernel_gpu_mem_bytes.last == 3 * GIB, "the kernel's own share, not the GPU's or a rank's"
    rows = dict(utilization_rows(metrics))
    assert rows[KERNEL_GPU_LABEL].startswith("GPU memory 3 GiB held by the notebook's own process"), rows
    peak = dict(summary_rows(metrics, "succeeded", "", 10.0))["peak memory per rank"]
    assert peak == f"rank 0 14 GiB GPU, {KERNEL_GPU_LABEL} 3 GiB GPU", peak


def test_a_kernel_that_holds_no_gpu_memory_gets_no_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_nvml(monkeypatch, gpus=1, FAKE_NVML_PROCESSES=f"0:4242:{11 * GIB}")
    metrics = RunMetrics(gpu_run(tmp_path))
    metrics.update()
    assert metrics.kernel_gpu_mem_bytes.last == 0
    assert KERNEL_GPU_LABEL not in dict(utilization_rows(metrics))


# Stands for a kernel that ran torch.cuda.init() and holds tensors there: NVML lists the kernel
# with 3 GiB, and every torch.cuda entry point raises, so that a kernel-side call into CUDA fails the run.
KERNEL_ON_THE_GPU = """
import os, torch
os.environ["FAKE_NVML_PROCESSES"] = f"0:{os.getpid()}:{3 * 2**30}"
cuda_calls = []
def _refuse(*args, **kwargs):
    cuda_calls.append(args)
    raise AssertionError("the kernel-side path called into torch.cuda")
for _name in ("init", "_lazy_init", "is_available", "device_count", "current_device", "set_device",
              "synchronize", "empty_cache", "memory_allocated", "get_device_name"):
    setattr(torch.cuda, _name, _refuse)
"""


@pytest.mark.integration
def test_a_kernel_using_the_gpu_runs_a_cell_and_sees_its_share(tmp_path: Path) -> None:
    kernel = Kernel(tmp_path, env=fake_nvml_environment(gpus=1))
    try:
        kernel.execute("%load_ext nbtrain")
        kernel.execute(NOTEBOOK_SETUP + KERNEL_ON_THE_GPU)
        shown = kernel.execute("%%bigtrain --nproc 1 --steps 30 --micro-batch 8 --out model_state\n"
                               "result = bigtrain.fit(make_model(), ToyData(), loss_fn=loss_fn)\n"
                               "model_state = result.state_dict\n").text
        checked = kernel.execute("print(len(cuda_calls), sorted(model_state)[:1])").text
    finally:
        kernel.shutdown()
        wait_until_gone(str(tmp_path), timeout=30)
    (run,) = (tmp_path / "bigtrain-runs").iterdir()
    assert status_of(run)["state"] == "succeeded"
    assert checked.strip() == "0 ['0.bias']", checked
    assert f"{KERNEL_GPU_LABEL} 3 GiB GPU" in shown, shown[-3000:]
