"""The run directory (docs/run-directory.md): crash-safe writes and tolerant reads."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from nbtrain.rundir import (
    FORMAT_VERSION,
    MetricWriter,
    RunDirectory,
    list_runs,
    new_run_id,
    read_json,
    read_records,
    write_json_atomic,
)
from nbtrain.rundir.heartbeats import heartbeat_file, read_heartbeats
from nbtrain.worker.heartbeat import Heartbeat


@pytest.fixture
def run(tmp_path: Path) -> RunDirectory:
    return RunDirectory.create(tmp_path / "runs", new_run_id("t"), {"name": "t", "nproc": 2})


def test_run_ids_have_the_documented_form_and_sort_by_start_time() -> None:
    first = new_run_id("gpt2", now=1_795_000_000)
    later = new_run_id(None, now=1_795_000_001)
    assert re.fullmatch(r"\d{8}-\d{6}-gpt2-[0-9a-f]{4}", first), first
    assert re.fullmatch(r"\d{8}-\d{6}-run-[0-9a-f]{4}", later), later
    assert sorted([later, first]) == [first, later]


def test_create_writes_the_layout_and_a_starting_status(run: RunDirectory) -> None:
    for sub in ("metrics", "logs", "errors", "results", "checkpoints"):
        assert (run.path / sub).is_dir(), sub
    info = run.run_info()
    assert (info["format_version"], info["run_id"], info["nproc"]) == (FORMAT_VERSION, run.run_id, 2)
    status = run.status()
    assert (status["state"], status["run_id"], status["format_version"]) == ("starting", run.run_id, FORMAT_VERSION)


def test_a_failed_write_leaves_the_old_document_whole(tmp_path: Path) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("the writer died mid-document")

    path = tmp_path / "status.json"
    write_json_atomic(path, {"state": "running", "big": "x" * 100_000})
    with pytest.raises(RuntimeError):
        write_json_atomic(path, {"state": "failed", "big": "y" * 100_000, "z": Unprintable()})
    assert read_json(path)["state"] == "running"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"], "a temporary file was left behind"


def test_a_reader_never_sees_half_a_status(run: RunDirectory) -> None:
    # A large document takes several write() calls: written in place, a reader would catch it half-way.
    torn: list[str] = []
    done = threading.Event()

    def read_all_the_time() -> None:
        while not done.is_set():
            text = run.status_file.read_text()
            try:
                json.loads(text)
            except ValueError:
                torn.append(text[-40:])

    reader = threading.Thread(target=read_all_the_time)
    reader.start()
    try:
        for i in range(150):
            run.write_status(step=i, padding="p" * 200_000)
    finally:
        done.set()
        reader.join()
    assert not torn, f"a reader saw {len(torn)} partial documents, e.g. ...{torn[0]!r}"


def test_the_first_final_state_wins(run: RunDirectory) -> None:
    run.write_status(state="running", pids=[1, 2])
    run.finish("failed", "rank 1 raised ZeroDivisionError", failed_rank=1)
    after = run.finish("stopped", "interrupted")
    assert (after["state"], after["reason"], after["failed_rank"]) == ("failed", "rank 1 raised ZeroDivisionError", 1)
    assert run.status()["pids"] == [1, 2], "the other fields are kept"


def test_a_late_running_does_not_undo_an_end(run: RunDirectory) -> None:
    # Regression: write_status(state="running") after a quick failure used to revive the run.
    run.finish("failed", "rank 0 raised")
    status = run.write_status(state="running", pids=[7], port=4000)
    assert (status["state"], status["reason"], status["pids"]) == ("failed", "rank 0 raised", [7])
    assert run.write_status(timings={"total_s": 1.0})["timings"] == {"total_s": 1.0}


def test_read_records_leaves_a_partial_last_line_for_later(tmp_path: Path) -> None:
    path = tmp_path / "rank-0.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    records, offset = read_records(path)
    assert [r["step"] for r in records] == [1, 2]
    # The writer completes the line (or a restarted reader comes back): it is read then, once.
    with open(path, "ab") as f:
        f.write(b'ss": 1.2}\n{"step": 4')
    more, offset = read_records(path, offset)
    assert more == [{"step": 3, "loss": 1.2}]
    assert read_records(path, offset)[0] == []


def test_read_records_skips_a_torn_line_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "rank-0.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    assert [r["step"] for r in read_records(path)[0]] == [1, 3]


def test_read_records_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_records(tmp_path / "nope.jsonl", 5) == ([], 5)


def test_metric_writer_lines_are_complete_json_as_soon_as_written(run: RunDirectory) -> None:
    import torch

    writer = MetricWriter(run.metrics_file(0), rank=0)
    try:
        for step in range(1, 4):
            writer.write(step, loss=torch.tensor(1.0 / step), lr=1e-3)
            # Not closed, not flushed by hand: a killed worker would leave exactly this on disk.
            records, _ = read_records(run.metrics_file(0))
            assert len(records) == step
        writer.write(4, loss=float("nan"), grad_norm=float("inf"))
    finally:
        writer.close()
    raw = run.metrics_file(0).read_text()
    assert raw.endswith("\n")
    lines = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
             for line in raw.splitlines()]
    assert [(r["step"], r["rank"]) for r in lines] == [(1, 0), (2, 0), (3, 0), (4, 0)]
    assert lines[1]["loss"] == pytest.approx(0.5) and isinstance(lines[1]["time"], float)
    assert (lines[3]["loss"], lines[3]["grad_norm"]) == (None, None), "NaN must be null: JSON has no NaN"


def test_records_and_errors_of_every_rank(run: RunDirectory) -> None:
    for rank in (1, 0):
        writer = MetricWriter(run.metrics_file(rank), rank=rank)
        writer.write(1, loss=float(rank))
        writer.close()
    write_json_atomic(run.error_file(1), {"rank": 1, "type": "ValueError"})
    assert run.ranks() == [0, 1]
    assert sorted((r["rank"], r["loss"]) for r in run.metric_records()) == [(0, 0.0), (1, 1.0)]
    assert run.errors() == {1: {"rank": 1, "type": "ValueError"}}


def test_list_runs_newest_first_and_only_real_runs(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    old = RunDirectory.create(root, new_run_id("a", now=time.time() - 3600), {})
    new = RunDirectory.create(root, new_run_id("b"), {})
    (root / "not-a-run").mkdir()
    assert [r.run_id for r in list_runs(root)] == [new.run_id, old.run_id]
    assert list(list_runs(tmp_path / "missing")) == []


def test_a_heartbeat_is_rewritten_in_place_and_always_reads_whole(tmp_path: Path) -> None:
    """A beat is one write into the same file (was: a new file and a rename each second, ~0.3 ms
    of a worker's CPU on ext4); a shorter beat over a longer one still reads as itself."""
    beat = Heartbeat(tmp_path, 1)
    beat.context = SimpleNamespace(engine=SimpleNamespace(global_steps=123456789))
    beat.start()
    beat.stop()
    assert read_heartbeats(tmp_path, 2)[1]["step"] == 123456789
    inode = heartbeat_file(tmp_path, 1).stat().st_ino
    beat.context.engine.global_steps = 7
    beat._beat()
    beat.stop()
    assert read_heartbeats(tmp_path, 2)[1]["step"] == 7
    assert heartbeat_file(tmp_path, 1).stat().st_ino == inode
    assert [p.name for p in (tmp_path / "heartbeats").iterdir()] == ["rank-1.json"], "no temporary file"
