"""The efficiency figures say truthfully why MFU is missing, from the machine facts the run keeps.

Regression (issue 14): `--nproc 2` on a one-GPU machine, rank 1 died, and the summary said
"MFU not measurable on this machine (no GPU, CPU peak unknown)" on a GPU machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nbtrain.config.machine import MachineFacts
from nbtrain.dashboard.efficiency import BEFORE_FIRST_STEP, NOT_MEASURABLE, efficiency
from nbtrain.dashboard.store import RunMetrics
from nbtrain.dashboard.summary import summary_rows
from nbtrain.rundir import RunDirectory

H100 = "NVIDIA H100 80GB HBM3"


def make_run(tmp_path: Path, machine: MachineFacts | None, engine: dict[str, Any] | None = None) -> RunDirectory:
    """A run directory as the kernel writes it (run.json with the machine facts, unless an older run)."""
    info: dict[str, Any] = {"name": "mfu", "nproc": 2}
    if machine is not None:
        info["machine"] = machine.as_record()
    run = RunDirectory.create(tmp_path, "20261126-120000-mfu-a1b2", info)
    if engine is not None:
        (run.path / "deepspeed.effective.json").write_text(json.dumps({"config": {}, "engine": engine}))
    return run


def sample(run: RunDirectory, rank: int, **record: Any) -> None:
    path = run.path / "utilization" / f"rank-{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"time": 1000.0, "rank": rank, "cpu_percent": 50.0, "rss_bytes": 2**30, **record}) + "\n")


def gpu_sample(run: RunDirectory, rank: int, name: str = H100) -> None:
    sample(run, rank, device="gpu", device_name=name, gpu_index=rank, gpu_util=80.0, gpu_mem_bytes=2**33)


def mfu_note(run: RunDirectory) -> str:
    metrics = RunMetrics(run)
    metrics.update()
    eff = efficiency(metrics)
    assert eff.mfu is None
    return eff.mfu_note


def test_a_gpu_run_whose_rank_died_at_start_says_so_not_no_gpu(tmp_path: Path) -> None:
    # The run: rank 0 on GPU 0, rank 1 without a GPU of its own; it died before step 1.
    run = make_run(tmp_path, MachineFacts(gpu_count=1))
    gpu_sample(run, 0)
    sample(run, 1, device="cpu", device_name="AMD EPYC")
    run.finish("failed", "rank 1 raised ValueError: device_id cuda:1 is out of range")
    assert mfu_note(run) == BEFORE_FIRST_STEP


def test_a_gpu_run_that_died_before_any_reading_names_the_machines_gpus(tmp_path: Path) -> None:
    run = make_run(tmp_path, MachineFacts(gpu_count=1, cuda_visible_devices="0"))
    run.finish("failed", "rank 1 raised ValueError")
    note = mfu_note(run)
    assert note == f"{BEFORE_FIRST_STEP}; this machine has 1 GPU (CUDA_VISIBLE_DEVICES=0)", note
    rows = dict(summary_rows(RunMetrics(run), "failed", "rank 1 raised ValueError", 3.0))
    assert "no GPU" not in rows["MFU"], rows["MFU"]


def test_a_gpu_run_before_its_first_reading_is_waiting(tmp_path: Path) -> None:
    run = make_run(tmp_path, MachineFacts(gpu_count=2))
    run.write_status(state="running")
    assert mfu_note(run) == "waiting for the ranks' first GPU reading (this machine has 2 GPUs)"


def test_gpus_nvml_cannot_map_to_ranks_leave_the_peak_unknown_not_absent(tmp_path: Path) -> None:
    # CUDA_VISIBLE_DEVICES by UUID: the ranks train on GPUs, but no NVML index is known for them.
    run = make_run(tmp_path, MachineFacts(gpu_count=1, cuda_visible_devices="GPU-8f6c2a0e"),
                   {"parameters": 1000, "world_size": 1})
    sample(run, 0, device="cpu", device_name="AMD EPYC")
    (run.path / "metrics").mkdir(exist_ok=True)
    with open(run.metrics_file(0), "a") as f:
        f.write(json.dumps({"step": 1, "rank": 0, "time": 1001.0, "loss": 1.0}) + "\n")
    run.finish("succeeded", "")
    note = mfu_note(run)
    assert note.startswith("this machine has 1 GPU (CUDA_VISIBLE_DEVICES=GPU-8f6c2a0e), but no rank's GPU "
                           "could be read through NVML"), note


def test_a_gpu_of_unknown_peak_says_so(tmp_path: Path) -> None:
    run = make_run(tmp_path, MachineFacts(gpu_count=1), {"bf16": {"enabled": True}})
    gpu_sample(run, 0, name="NVIDIA Mystery 9000")
    assert mfu_note(run) == "peak bf16 FLOP/s of NVIDIA Mystery 9000 unknown"


def test_a_cpu_machine_still_says_no_gpu(tmp_path: Path) -> None:
    for facts in (MachineFacts(gpu_count=0), None):  # None: a run written before run.json kept the facts
        run = make_run(tmp_path / str(facts is None), facts)
        sample(run, 0, device="cpu", device_name="AMD EPYC", no_gpu_reason="Driver Not Loaded")
        run.finish("failed", "rank 0 raised ValueError")
        assert mfu_note(run) == NOT_MEASURABLE + " (no GPU, CPU peak unknown)"
