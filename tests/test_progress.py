"""Where a run stands (nbtrain/rundir/progress.py): step, ETA and the start-up phase every view shows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nbtrain.rundir import MetricWriter, RunDirectory
from nbtrain.rundir.layout import TIMELINE as TIMELINE_FILE
from nbtrain.rundir.progress import StepReader, eta_s, planned_steps, read_startup, startup
from nbtrain.worker.timeline import Timeline, _built_before

T0 = 1_795_595_825.0  # the run's start (status.json "started")
RUNNING = {"state": "running", "created": T0 - 0.1, "started": T0}


def test_eta_uses_the_recent_pace_of_the_remaining_steps() -> None:
    assert eta_s(10, 110, [0.5, 0.5, 0.6, 0.4, 0.5]) == pytest.approx(50.0)
    assert eta_s(10, None, [0.5]) is None, "no total, no ETA"
    assert eta_s(0, 100, []) is None, "no step yet, no ETA"
    assert eta_s(120, 100, [0.5]) == 0


def test_the_step_reader_follows_rank_0_and_forgets_the_slow_first_step(tmp_path: Path) -> None:
    path = tmp_path / "rank-0.jsonl"
    writer = MetricWriter(path, 0)
    writer.write(1, lr=1e-3, step_time_s=30.0, samples_per_s=2.0)  # the first step: compiling, warming caches
    for step in range(2, 40):
        writer.write(step, lr=1e-3, step_time_s=0.5, samples_per_s=128.0)
        writer.write(step, loss=1.0 / step)
    writer.close()
    reader = StepReader(path)
    assert len(reader.read()) == 77 and reader.read() == [], "records were read twice"
    assert (reader.step, reader.latest["loss"], reader.latest["samples_per_s"]) == (39, pytest.approx(1 / 39), 128.0)
    assert reader.eta_s(139) == pytest.approx(50.0), "the ETA must follow the recent pace, not the first step's"
    assert reader.first_step_time is not None


def test_malformed_records_are_skipped_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "rank-0.jsonl"
    path.write_text('{"step": "x"}\n[1, 2]\n{"step": true}\n{"step": 3, "rank": 0, "time": 1.0, "loss": NaN}\n')
    reader = StepReader(path)
    assert [r["step"] for r in reader.read()] == [3]
    assert str(reader.latest["loss"]) == "nan", "a diverged loss is shown as such"


def test_planned_steps_come_from_the_engine_else_from_the_flag() -> None:
    assert planned_steps({"engine": {"max_steps": 120}}, {"config": {"steps": None}}) == 120
    assert planned_steps(None, {"config": {"steps": 50}}) == 50
    assert planned_steps({"engine": {}}, {"config": {"epochs": 2}}) is None
    assert planned_steps({"engine": {"max_steps": True}}, None) is None


# -- start-up phases ------------------------------------------------------------------------------
def test_a_run_just_launched_is_starting_its_workers() -> None:
    found = startup(RUNNING, None)
    assert found is not None and found.current.key == "workers"
    assert found.line(T0 + 2.5) == "starting the worker processes · 2.5 s (2.5 s since the run started)"
    assert found.trail() == ""


def test_each_timeline_mark_begins_the_next_phase_with_its_time() -> None:
    marks = {"python_started": T0 + 0.4, "imports_done": T0 + 6.4, "launched": T0 + 0.1, "job_received": T0 + 7.0}
    assert startup(RUNNING, marks) is not None
    found = startup(RUNNING, {**marks, "prepare_called": T0 + 8.0})
    assert found is not None and found.current.label == "building the DeepSpeed engine"
    assert found.trail() == "workers started 0.4 s · imports 6.0 s · process group 0.6 s · cell up to prepare 1.0 s"
    assert found.line(T0 + 20) == "building the DeepSpeed engine · 12 s (20 s since the run started)"
    later = startup(RUNNING, {**marks, "prepare_called": T0 + 8.0, "engine_built": T0 + 9.0})
    assert later is not None and later.current.label == "running the first step"


def test_warm_workers_start_at_the_cell() -> None:
    found = startup(RUNNING, {"launched": T0 + 0.01, "job_received": T0 + 0.02})
    assert found is not None and found.current.key == "cell"
    assert found.trail() == "workers started 0.0 s"


def test_an_op_being_built_names_the_op_and_says_it_happens_once() -> None:
    ops = [{"name": "deepspeed_shm_comm", "started": T0 + 7.0, "ended": T0 + 7.2, "cached": True},
           {"name": "cpu_adam", "started": T0 + 8.5, "cached": False}]
    found = startup(RUNNING, {"python_started": T0 + 0.4, "prepare_called": T0 + 8.0, "ops": ops})
    assert found is not None and found.current.key == "op"
    assert found.current.label == "building DeepSpeed op cpu_adam (once for this environment: later runs reuse it)"
    assert found.line(T0 + 43.5) == ("building DeepSpeed op cpu_adam (once for this environment: later runs reuse it)"
                                     " · 35 s (44 s since the run started)")
    assert "op deepspeed_shm_comm loaded 0.2 s" in found.trail()
    ops[1]["ended"] = T0 + 44.0
    done = startup(RUNNING, {"python_started": T0 + 0.4, "prepare_called": T0 + 8.0, "ops": ops})
    assert done is not None and done.current.key == "engine" and "op cpu_adam built 36 s" in done.trail()


def test_no_phase_once_the_run_trains_or_ended() -> None:
    assert startup(RUNNING, {"python_started": T0, "first_step": T0 + 9}) is None
    assert startup(RUNNING, {"python_started": T0}, step=1) is None, "records of a step mean it trains"
    assert startup({**RUNNING, "state": "failed"}, {"python_started": T0}) is None
    assert startup({}, None) is None, "a folder without a start time has no phase"


def test_a_timeline_published_by_rank_0_is_what_every_view_reads(tmp_path: Path) -> None:
    run = RunDirectory.create(tmp_path, "20261125-083705-phase-c302", {"name": "phase"})
    run.write_status(state="running", started=T0)
    timeline = Timeline(run.path / TIMELINE_FILE)
    timeline.mark("python_started", T0 + 0.3)
    assert read_startup(run) is not None and read_startup(run).current.key == "imports"  # type: ignore[union-attr]
    timeline.mark("launched", float("nan"), publish=False)  # a runner-started worker knows no launch time
    timeline.mark("job_received", T0 + 5.0)
    timeline.op_started("cpu_adam", cached=False)
    found = read_startup(run)
    assert found is not None and found.current.label.startswith("building DeepSpeed op cpu_adam")
    timeline.op_ended("cpu_adam")
    timeline.mark("first_step")
    assert read_startup(run) is None
    written = json.loads((run.path / TIMELINE_FILE).read_text())
    assert "launched" not in written and written["ops"][0]["name"] == "cpu_adam" and "ended" in written["ops"][0]


def test_ranks_other_than_0_publish_nothing(tmp_path: Path) -> None:
    timeline = Timeline(None)
    timeline.mark("python_started")
    assert "python_started" in timeline and not list(tmp_path.iterdir())


def test_an_op_missing_from_the_build_cache_counts_as_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert _built_before("cpu_adam") is False
    (tmp_path / "cpu_adam" / "cpu_adam.so").write_bytes(b"")
    assert _built_before("cpu_adam") is True


@pytest.mark.integration
def test_deepspeeds_just_in_time_op_loads_are_recorded_by_name(tmp_path: Path) -> None:
    # In a process of its own: the watcher wraps DeepSpeed's OpBuilder for the life of the process.
    script = """
import os, sys
from pathlib import Path
from nbtrain.launch.launcher import ops_cache_dir
os.environ.setdefault("TORCH_EXTENSIONS_DIR", ops_cache_dir())  # where set-up built them, as for workers
from nbtrain.worker.timeline import Timeline, watch_op_builds
timeline = Timeline(Path(sys.argv[1]))
watch_op_builds(lambda: timeline)
watch_op_builds(lambda: timeline)  # a second call must not wrap twice
from deepspeed.ops.op_builder.cpu import CPUAdamBuilder
CPUAdamBuilder().load(verbose=False)
CPUAdamBuilder().load(verbose=False)  # DeepSpeed keeps a loaded op: no second load to record
"""
    out = tmp_path / "timeline.json"
    done = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    ops = json.loads(out.read_text())["ops"]
    assert [op["name"] for op in ops] == ["cpu_adam"], ops
    assert ops[0]["ended"] >= ops[0]["started"] and isinstance(ops[0]["cached"], bool)
