"""The `%bigtrain` line commands: finding runs, the runs table, attach, stop and compare.

The pure parts run on run directories written the way the workers write them; the rest
(marked integration) through real kernels with real DeepSpeed workers, as a user would.
"""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import re
import time
from pathlib import Path

import pytest
from IPython.core.error import UsageError

from nbtrain.commands import find_run, parse_command, runs_table
from nbtrain.compare import settings_table
from nbtrain.rundir import RunDirectory, write_json_atomic
from tests.conftest import status_of, wait_until_gone, worker_processes
from tests.kernel import Execution, Kernel


# -- run directories as the workers leave them -----------------------------------------------------
def finished_run(root: Path, run_id: str, name: str, lr: float, steps: int) -> RunDirectory:
    run = RunDirectory.create(root, run_id, {"name": name, "nproc": 2, "config": {"lr": lr, "steps": steps}})
    write_json_atomic(run.deepspeed_file, {"train_batch_size": 16,
                                           "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0}}})
    lines = [json.dumps({"step": s, "rank": 0, "time": 1000.0 + s, "loss": 2.0 - s / 100}) for s in range(1, steps + 1)]
    run.metrics_file(0).write_text("\n".join(lines) + "\n")
    run.write_status(state="running", started=1000.0)
    run.finish("succeeded", "")
    run.write_status(ended=1000.0 + 125)
    return run


@pytest.fixture
def root(tmp_path: Path) -> Path:
    finished_run(tmp_path, "20261126-090000-sweep-aaaa", "sweep", 0.01, 4)
    finished_run(tmp_path, "20261126-091500-sweep-bbbb", "sweep", 0.1, 4)
    finished_run(tmp_path, "20261126-093000-base-cccc", "base", 0.01, 6)
    return tmp_path


def test_a_run_is_found_by_id_prefix_name_or_latest(root: Path) -> None:
    assert find_run(root, "20261126-090000-sweep-aaaa").run_id.endswith("aaaa")
    assert find_run(root, "20261126-0915").run_id.endswith("bbbb")
    assert find_run(root, "latest").run_id.endswith("cccc")
    assert find_run(root, "sweep").run_id.endswith("bbbb"), "a name must give its newest run"


def test_an_unknown_or_ambiguous_run_names_it_the_folder_and_the_closest_ids(root: Path) -> None:
    with pytest.raises(UsageError) as unknown:
        find_run(root, "20261126-093000-bsae-cccc")
    message = str(unknown.value)
    assert "'20261126-093000-bsae-cccc'" in message and str(root) in message, message
    assert "closest: 20261126-093000-base-cccc" in message, message
    with pytest.raises(UsageError, match=r"ambiguous .* 3 run ids start with it"):
        find_run(root, "2026")
    with pytest.raises(UsageError, match=r"there are no runs under .*elsewhere.*--run-dir"):
        find_run(root / "elsewhere", "latest")


def test_runs_table_lists_every_column_newest_first(root: Path) -> None:
    table = runs_table(root, now=2000.0).splitlines()
    assert table[0] == f"3 run(s) under {root}, newest first:"
    assert table[1].split() == ["run", "name", "status", "steps", "last", "loss", "started", "duration"]
    first = table[2].split()
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1000.0)).split()
    assert first == ["20261126-093000-base-cccc", "base", "succeeded", "6/6", "1.94", *started, "2:05"], first
    assert [line.split()[0][-4:] for line in table[2:]] == ["cccc", "bbbb", "aaaa"]


def test_compare_puts_the_settings_that_differ_first(root: Path) -> None:
    runs = [find_run(root, "20261126-0900"), find_run(root, "20261126-0915")]
    rows = settings_table(runs)
    assert [(row.key, row.values) for row in rows if row.differs] == [("optimizer.params.lr", ("0.01", "0.1"))]
    assert rows[0].key == "optimizer.params.lr" and not rows[1].differs
    assert {row.key for row in rows} >= {"processes", "--steps", "train_batch_size", "optimizer.type"}


@pytest.mark.parametrize(("line", "words"), [
    ("stop", "stop needs a RUN"),
    ("compare --run-dir x", "compare: the following arguments are required: RUN"),
    ("attach latest --zero 3", "%bigtrain attach: unrecognized arguments: --zero 3"),
    ("atach latest", "invalid choice: 'atach'"),
    ("show 'latest", "cannot be split"),
])
def test_bad_command_lines_are_refused_with_the_usage(line: str, words: str) -> None:
    with pytest.raises(UsageError, match=re.escape(words)):
        parse_command(line)


def test_an_empty_line_lists_the_runs_and_every_command_takes_run_dir() -> None:
    assert parse_command("").command == "runs"
    for line in ("runs", "show x", "attach x", "stop x", "compare x y"):
        assert parse_command(f"{line} --run-dir /data/runs").run_dir == "/data/runs", line


# -- through real kernels --------------------------------------------------------------------------
SLOW_LOSS = """
import time
def slow_loss(model, batch):
    time.sleep(0.02)  # a step long enough to watch
    return loss_fn(model, batch)
"""
SHORT = "%%bigtrain --nproc 2 --steps 6 --micro-batch 8 --no-plot {flags}\nbigtrain.fit(make_model(), ToyData(), loss_fn=loss_fn)"
# --no-plot: the run's own cell shows a text line, so every widget update in the kernel is the attached dashboard's.
LONG = ("%%bigtrain --nproc 2 --steps 100000 --micro-batch 4 --background --no-plot --name long\n"
        "bigtrain.fit(make_model(), ToyData(), loss_fn=slow_loss)")


def second_kernel(cwd: Path) -> Kernel:
    """A new kernel in the same folder: it knows the run only from its directory."""
    other = Kernel(cwd)
    other.execute("%load_ext nbtrain")
    return other


def live_steps(kernel: Kernel, count: int = 3, timeout: float = 120) -> list[int]:
    """Return the steps an attached dashboard shows after its cell ended, until `count` different ones came."""
    steps: list[int] = []
    deadline = time.time() + timeout
    while len(set(steps)) < count and time.time() < deadline:
        try:
            msg = kernel.client.get_iopub_msg(timeout=0.5)
        except queue.Empty:
            continue
        value = str(msg["content"].get("data", {}).get("state", {}).get("value", ""))
        shown = re.match(r"&nbsp;step (\d+)", value)
        if msg["msg_type"] == "comm_msg" and shown:
            steps.append(int(shown.group(1)))
    return steps


def displayed(execution: Execution, mime: str) -> list[str]:
    """Return the `mime` parts of what a cell displayed (or updated in place), in order."""
    return [m.content["data"][mime] for m in execution.messages
            if m.kind in ("display_data", "update_display_data") and mime in m.content.get("data", {})]


def wait_for_steps(run_root: Path, steps: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = list(run_root.glob("*-long-*/metrics/rank-0.jsonl"))
        if metrics and metrics[0].read_text().count('"loss"') >= steps:
            return
        time.sleep(0.2)
    raise AssertionError(f"the run did not reach step {steps} in {timeout} s")


@pytest.mark.integration
def test_attach_shows_a_live_dashboard_in_this_kernel_and_in_a_new_one(kernel: Kernel, tmp_path: Path) -> None:
    kernel.execute(SLOW_LOSS)
    kernel.execute(LONG)
    wait_for_steps(tmp_path / "bigtrain-runs", 3)
    kernel.execute("%bigtrain attach long")
    here = live_steps(kernel)
    assert len(set(here)) >= 3 and here == sorted(here), f"the attached dashboard did not advance: {here}"
    other = second_kernel(tmp_path)
    try:
        attached = other.execute("%bigtrain attach latest")
        assert "bigtrain: run " in attached.text and "-long-" in attached.text, attached.text
        there = live_steps(other)
        assert len(set(there)) >= 3 and there == sorted(there), f"a new kernel's dashboard did not advance: {there}"
        # Stopped from the kernel that started it (its supervisor stops it, as the dashboard's Stop).
        stopped = kernel.execute("%bigtrain stop long").text
        assert re.search(r"stopped \(stopped from the notebook; workers stopped in [\d.]+ s\)", stopped), stopped
        # Finished: the picture and the summary a finished cell leaves, at once.
        final = other.execute("%bigtrain attach long")
        assert any(base64.b64decode(png).startswith(b"\x89PNG") for png in displayed(final, "image/png")), final.text
        assert any("status" in t and "stopped" in t for t in displayed(final, "text/plain")), final.text
        again = other.execute("%bigtrain stop long").text
        assert "has already ended: stopped" in again and "Traceback" not in again, again
    finally:
        other.shutdown()
    assert not worker_processes(str(tmp_path)), "a worker outlived the stopped run"


@pytest.mark.integration
def test_stop_from_another_kernel_ends_a_run_on_warm_workers(kernel: Kernel, tmp_path: Path) -> None:
    kernel.execute(SLOW_LOSS)
    kernel.execute(SHORT.format(flags="--name first"))  # leaves warm workers: the next run starts in them
    kernel.execute(LONG)
    kernel.execute("handle = _")
    wait_for_steps(tmp_path / "bigtrain-runs", 3)
    long_run = next(p for p in (tmp_path / "bigtrain-runs").iterdir() if "-long-" in p.name)
    assert "warm" in status_of(long_run)["workers"]["note"], "the test needs a run on warm workers"
    other = second_kernel(tmp_path)
    try:
        out = other.execute("%bigtrain stop long").text
    finally:
        other.shutdown()
    status = status_of(long_run)
    assert status["state"] == "stopped", status
    assert status["reason"].startswith("stopped with %bigtrain stop; workers stopped in"), status["reason"]
    assert status["reason"] in out, out
    # Warm workers were started for the first run: their command line names that one.
    wait_until_gone(str(tmp_path), timeout=10)
    ended = kernel.execute("handle.wait()", allow_error=True)
    assert ended.error is not None and "stopped with %bigtrain stop" in ended.error.text, ended.text


def stop_button(kernel: Kernel, code: str) -> str:
    """Run `code` (an attach) and return the comm id of the Stop button it shows."""
    msg_id = kernel.client.execute(code)
    found, disabled = None, True
    while True:
        msg = kernel.client.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        state = msg["content"].get("data", {}).get("state", {})
        if msg["msg_type"] == "comm_open" and state.get("description") == "Stop":
            found = msg["content"]["comm_id"]
        if found == msg["content"].get("comm_id") and "disabled" in state:
            disabled = state["disabled"]
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            assert found and not disabled, f"the attached dashboard has no enabled Stop button ({found})"
            return found


@pytest.mark.integration
def test_the_stop_button_of_a_dashboard_attached_in_another_kernel_stops_the_run(kernel: Kernel,
                                                                                  tmp_path: Path) -> None:
    kernel.execute(SLOW_LOSS)
    kernel.execute(LONG)
    wait_for_steps(tmp_path / "bigtrain-runs", 3)
    other = second_kernel(tmp_path)
    try:
        button = stop_button(other, "%bigtrain attach long")
        # What a frontend sends when the button is clicked.
        other.client.shell_channel.send(other.client.session.msg(
            "comm_msg", {"comm_id": button, "data": {"method": "custom", "content": {"event": "click"}}}))
        picture = False
        deadline = time.time() + 60
        while not picture and time.time() < deadline:
            with contextlib.suppress(queue.Empty):
                msg = other.client.get_iopub_msg(timeout=0.5)
                picture = msg["msg_type"] == "update_display_data" and "image/png" in msg["content"]["data"]
        assert picture, "the attached dashboard did not turn into the final picture"
    finally:
        other.shutdown()
    status = status_of(next((tmp_path / "bigtrain-runs").iterdir()))
    assert status["state"] == "stopped", status
    assert status["reason"].startswith("stopped from an attached dashboard; workers stopped in"), status
    assert not worker_processes(str(tmp_path)), "a worker outlived the stop"


@pytest.mark.integration
def test_runs_show_and_compare_read_the_run_dir_given(kernel: Kernel, tmp_path: Path) -> None:
    for lr in ("0.01", "0.3"):
        kernel.execute(SHORT.format(flags=f"--lr {lr} --name lr{lr} --run-dir sweeps"))
    table = kernel.execute("%bigtrain runs --run-dir sweeps").text.splitlines()
    assert table[0] == f"2 run(s) under {tmp_path / 'sweeps'}, newest first:", table
    assert [line.split()[1:4] for line in table[2:]] == [["lr0.3", "succeeded", "6/6"], ["lr0.01", "succeeded", "6/6"]]
    assert "no runs under" in kernel.execute("%bigtrain runs").text, "the default root is ./bigtrain-runs"
    shown = kernel.execute("%bigtrain show lr0.01 --run-dir sweeps").value()
    assert "succeeded" in shown and "steps 6" in shown, shown
    compared = kernel.execute("%bigtrain compare lr0.01 lr0.3 --run-dir sweeps")
    assert any(base64.b64decode(png).startswith(b"\x89PNG") for png in displayed(compared, "image/png")), \
        "compare drew no plot"
    table = next(t for t in displayed(compared, "text/plain") if t.startswith("settings of 2 runs"))
    assert table.splitlines()[2].split() == ["*", "optimizer.params.lr", "0.01", "0.3"], table
    bad = kernel.execute("%bigtrain compare lr0.01 lr0.5 --run-dir sweeps", allow_error=True)
    assert bad.error is not None and "no run 'lr0.5' under" in bad.text and "closest: lr0.3" in bad.text, bad.text
    assert "Traceback" not in bad.text


def test_the_magics_help_documents_the_line_commands_and_keeps_the_flags() -> None:
    from nbtrain.magic import BigTrainMagics

    text = BigTrainMagics.bigtrain.__doc__ or ""
    for usage in ("%bigtrain runs", "%bigtrain show RUN", "%bigtrain attach RUN", "%bigtrain stop RUN",
                  "%bigtrain compare RUN RUN...", "--run-dir DIR", "latest"):
        assert usage in text, f"%bigtrain? does not mention {usage!r}"
    assert "--offload-optimizer" in text and "--keep-warm" in text, "the flags' help is gone"


def test_compare_refuses_a_run_named_twice(root: Path) -> None:
    from nbtrain.commands import LineCommands
    from nbtrain.launch.run import KernelState

    with pytest.raises(UsageError, match=r"20261126-091500-sweep-bbbb named more than once \(sweep 20261126-0915\)"):
        LineCommands(KernelState()).run(f"compare sweep 20261126-0915 --run-dir {root}")
