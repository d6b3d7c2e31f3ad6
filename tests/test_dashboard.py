"""The live dashboard: its pure parts (series, smoothing, ETA, efficiency, summary, pictures),
its widget state, and (marked integration) what a notebook user sees through a real kernel."""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nbtrain.config.arguments import parse_line
from nbtrain.config.machine import MachineFacts
from nbtrain.config.plan import plan_run
from nbtrain.dashboard.efficiency import NOT_MEASURABLE, device_peak_flops, efficiency, flops_per_device
from nbtrain.dashboard.fmt import clock
from nbtrain.dashboard.picture import final_png
from nbtrain.dashboard.store import MAX_POINTS, RunMetrics, Series, smooth
from nbtrain.dashboard.summary import rows_html, rows_text, summary_rows
from nbtrain.dashboard.svg import Line, line_chart
from nbtrain.rundir import RunDirectory
from nbtrain.rundir.layout import TIMELINE as TIMELINE_FILE
from tests.conftest import NOTEBOOK_SETUP, losses, only_run, status_of, wait_until_gone, worker_processes
from tests.kernel import Kernel

FAKES = Path(__file__).parent / "fakes"


# -- a run directory written the way the workers write it ----------------------------------------
def make_run(tmp_path: Path, engine: dict[str, Any] | None = None) -> RunDirectory:
    run = RunDirectory.create(tmp_path, "20261125-083705-test-c302", {"name": "test", "nproc": 2})
    if engine is not None:
        (run.path / "deepspeed.effective.json").write_text(json.dumps({"config": {}, "engine": engine}))
    return run


def append(path: Path, *records: dict[str, Any], partial: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + partial)


def step_records(step: int, loss: float, t: float = 1000.0, tokens_per_s: float | None = None) -> list[dict]:
    timing = {"step": step, "rank": 0, "time": t + step, "lr": 1e-3, "step_time_s": 0.5, "samples_per_s": 64.0}
    if tokens_per_s is not None:
        timing["tokens_per_s"] = tokens_per_s
    return [timing, {"step": step, "rank": 0, "time": t + step, "loss": loss}]


def util_record(rank: int, t: float, **more: Any) -> dict[str, Any]:
    return {"time": t, "rank": rank, "cpu_percent": 95.0, "rss_bytes": 300 * 2**20, "device": "cpu",
            "device_name": "AMD EPYC", **more}


def gpu_record(rank: int, t: float, energy_j: float, name: str = "NVIDIA H100 80GB HBM3") -> dict[str, Any]:
    return util_record(rank, t, device="gpu", device_name=name, gpu_index=rank, gpu_util=90.0,
                       gpu_mem_bytes=10 * 2**30, gpu_mem_total_bytes=80 * 2**30, power_w=350.0, energy_j=energy_j)


# -- pure parts ---------------------------------------------------------------------------------
def test_a_long_run_keeps_bounded_points_with_recent_ones_exact() -> None:
    series = Series()
    for step in range(1, 100_001):
        series.append(step, step * 2.0)
    assert len(series) <= MAX_POINTS, f"{len(series)} points kept for 100 000 steps"
    assert series.last == 200_000.0, "the latest value was altered"
    assert series.xs == sorted(series.xs), "points out of order"
    assert series.xs[0] < 500 and series.ys[-1] > 190_000, "the start or the end of the run is lost"
    gaps = [b - a for a, b in zip(series.xs, series.xs[1:], strict=False)]
    assert max(gaps[:-1]) <= 2 * min(gaps), "the resolution is not uniform over the run"


def test_smoothing_is_debiased_and_follows_a_change() -> None:
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0]), "a constant loss must stay constant"
    values = smooth([1.0] * 10 + [0.0] * 10)
    assert values[9] == pytest.approx(1.0) and 0.0 < values[12] < 1.0 and values[-1] < values[12]


def test_reading_skips_a_partial_last_record_and_picks_it_up_when_complete(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"max_steps": 10, "parameters": 1000, "world_size": 2})
    metrics = RunMetrics(run)
    assert metrics.update() is False and metrics.step == 0
    half = json.dumps(step_records(2, 1.5)[1])
    append(run.metrics_file(0), *step_records(1, 2.0), partial=half[:17])
    assert metrics.update() is True
    assert (metrics.step, metrics.loss.ys) == (1, [2.0]), "the torn record was read before it was complete"
    append(run.metrics_file(0), partial=half[17:] + "\n")
    metrics.update()
    assert metrics.loss.ys == [2.0, 1.5] and metrics.step == 2
    assert metrics.max_steps == 10 and metrics.eta_s == pytest.approx(8 * 0.5)


def test_tokens_and_flops_per_device_follow_six_n_d(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"max_steps": 10, "parameters": 1_000_000, "world_size": 2, "bf16": True})
    for step in range(1, 5):
        append(run.metrics_file(0), *step_records(step, 1.0, tokens_per_s=8000.0))
    metrics = RunMetrics(run)
    metrics.update()
    assert metrics.tokens_seen == pytest.approx(4 * 8000.0 * 0.5)
    assert flops_per_device(1_000_000, 8000.0, 2) == pytest.approx(2.4e10)
    assert efficiency(metrics).flops_per_device == pytest.approx(2.4e10)


def test_device_peaks_are_known_only_for_listed_gpus() -> None:
    assert device_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert device_peak_flops("NVIDIA H100 PCIe", "fp16") == 756e12
    assert device_peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert device_peak_flops("Tesla V100-SXM2-16GB", "bf16") is None, "V100 has no bf16 tensor cores"
    assert device_peak_flops("AMD EPYC 7B13", "fp32") is None
    assert device_peak_flops("NVIDIA GeForce GTX 1080", "fp32") is None


def test_mfu_and_energy_from_nvml_counters(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"max_steps": 10, "parameters": 1_000_000_000, "world_size": 2, "bf16": True})
    for step in range(1, 3):
        append(run.metrics_file(0), *step_records(step, 1.0, tokens_per_s=100_000.0))
    for rank in (0, 1):
        path = run.path / "utilization" / f"rank-{rank}.jsonl"
        append(path, *(gpu_record(rank, 1000.0 + i, energy_j=5000.0 + 350.0 * i) for i in range(6)))
    metrics = RunMetrics(run)
    metrics.update()
    eff = efficiency(metrics)
    assert eff.flops_per_device == pytest.approx(6 * 1e9 * 1e5 / 2)
    assert eff.mfu == pytest.approx(3e14 / 989e12)
    # Two GPUs, five seconds each at 350 W between their first and last counter readings.
    assert (eff.energy_j, eff.power_w, eff.energy_source) == (pytest.approx(3500.0), 700.0, "NVML")
    assert eff.energy_per_mtok_j == pytest.approx(3500.0 / (2 * 100_000 * 0.5) * 1e6)


def test_energy_from_rapl_when_only_the_cpu_reports_it(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"max_steps": 10, "parameters": 1000, "world_size": 1})
    path = run.path / "utilization" / "rank-0.jsonl"
    append(path, *(util_record(0, 1000.0 + i, cpu_energy_j=40.0 * i) for i in range(5)))
    metrics = RunMetrics(run)
    metrics.update()
    eff = efficiency(metrics)
    assert (eff.energy_j, eff.power_w) == (pytest.approx(160.0), pytest.approx(40.0))
    assert eff.energy_source.startswith("RAPL")
    assert eff.mfu is None and NOT_MEASURABLE in eff.mfu_note


def test_a_cpu_machine_without_counters_says_not_measurable_instead_of_a_number(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"max_steps": 4, "parameters": 1000, "world_size": 2})
    append(run.metrics_file(0), *step_records(1, 1.0))
    for rank in (0, 1):
        append(run.path / "utilization" / f"rank-{rank}.jsonl", util_record(rank, 1000.0))
    metrics = RunMetrics(run)
    metrics.update()
    rows = dict(summary_rows(metrics, "succeeded", "", 12.0))
    for label in ("MFU", "power", "energy this run", "energy per million tokens"):
        assert NOT_MEASURABLE in rows[label], f"{label}: {rows[label]!r}"
    assert "token" in rows["FLOP/s per device"], "FLOP/s without tokens must say it needs them"
    assert [u.label for u in metrics.utilization.values()] == ["rank 0 · CPU", "rank 1 · CPU"]


def test_summary_table_in_html_and_text(tmp_path: Path) -> None:
    run = make_run(tmp_path, {"max_steps": 3})
    for step in (1, 2, 3):
        append(run.metrics_file(0), *step_records(step, 1.0 / step))
    append(run.metrics_file(0), {"step": 3, "rank": 0, "time": 1004.0, "eval_loss": 0.42, "epoch": 1})
    metrics = RunMetrics(run)
    metrics.update()
    rows = summary_rows(metrics, "stopped", "stopped from the dashboard", 75.0)
    text, page = rows_text(rows, "run x"), rows_html(rows, "run x")
    assert "status" in text and "stopped (stopped from the dashboard)" in text
    assert "3 of 3" in text and "0.3333" in text and "eval loss" in text and "0.42" in text and "1:15" in text
    assert page.startswith("<table>") and "<th" in page and "0.42" in page
    assert "<script" not in rows_html([("x", "<script>alert(1)</script>")]), "values must be escaped"


def test_final_picture_is_a_png_of_the_curves(tmp_path: Path) -> None:
    from PIL import Image

    run = make_run(tmp_path, {"max_steps": 40})
    for step in range(1, 41):
        append(run.metrics_file(0), *step_records(step, 2.0 / step))
    append(run.path / "utilization" / "rank-0.jsonl", util_record(0, 1000.0), util_record(0, 1001.0))
    metrics = RunMetrics(run)
    metrics.update()
    image = Image.open(io.BytesIO(final_png(metrics, "run x: succeeded")))
    assert image.format == "PNG" and image.size[0] >= 640 and image.size[1] >= 400
    assert sum(1 for count in image.convert("L").histogram() if count) > 10, "the picture is blank"


def test_charts_are_well_formed_svg_and_an_empty_chart_says_why() -> None:
    empty = line_chart("loss", [Line("loss", Series())])
    assert "waiting for the first values" in empty
    series = Series()
    for step in range(1, 30):
        series.append(step, 1.0 / step)
    chart = line_chart("loss <raw>", [Line("loss", series), Line("other", Series())])
    root = ET.fromstring(chart)
    polylines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(polylines) == 1 and len(polylines[0].get("points", "").split()) == 29
    assert "loss &lt;raw&gt;" in chart


SVG = "{http://www.w3.org/2000/svg}"


def y_extent(polyline: ET.Element) -> float:
    ys = [float(point.split(",")[1]) for point in polyline.get("points", "").split()]
    return max(ys) - min(ys)


def texts(chart: str) -> list[str]:
    return [t.text or "" for t in ET.fromstring(chart).iter(f"{SVG}text")]


def test_samples_and_tokens_per_s_each_get_their_own_scale() -> None:
    # Regression: on one axis, samples/s (300) lay flat under tokens/s (20 000).
    samples, tokens = Series(), Series()
    for step in range(1, 21):
        samples.append(step, 300.0 + 10 * (step % 5))
        tokens.append(step, 20_000.0 + 600 * (step % 5))
    chart = line_chart("throughput", [Line("samples/s", samples), Line("tokens/s", tokens, right_axis=True)])
    samples_line, tokens_line = ET.fromstring(chart).findall(f"{SVG}polyline")
    plot_height = 170 - 30 - 24
    assert y_extent(samples_line) > 0.8 * plot_height, "samples/s does not use the chart's height"
    assert y_extent(tokens_line) > 0.8 * plot_height
    labels = texts(chart)
    assert "340" in labels and "22.4 k" in labels, f"each axis must show its own range: {labels}"
    assert "tokens/s (right axis)" in labels


def test_utilization_is_drawn_from_the_run_start_with_a_scale_that_fits_the_samples(tmp_path: Path) -> None:
    # Regressions: the time axis began at "-0.06097 seconds" (rank 1's first sample came before rank 0's),
    # and a first CPU % measured over milliseconds (974 %) flattened the real 50-110 % line.
    from nbtrain.dashboard import Dashboard

    run = make_run(tmp_path, {"max_steps": 10})
    run.write_status(state="running", started=1000.0)
    append(run.path / "utilization" / "rank-0.jsonl", util_record(0, 1000.7, cpu_percent=None),
           *(util_record(0, 1001.7 + i, cpu_percent=50.0 + 20 * i) for i in range(4)))
    append(run.path / "utilization" / "rank-1.jsonl", util_record(1, 999.9, cpu_percent=None),
           util_record(1, 1001.6, cpu_percent=80.0))
    dashboard = Dashboard(redraw_every_s=0.0)
    dashboard.started(run, plan())
    dashboard.progress(type("P", (), {"elapsed_s": 5.0})())
    cpu_chart = next(c for c in re.findall(r"<svg.*?</svg>", dashboard.charts.value) if "CPU % per rank" in c)
    labels = texts(cpu_chart)
    assert labels[labels.index("since the run started") - 2:labels.index("since the run started")] == ["0 s", "5 s"]
    assert "110" in labels and "0" in labels, f"the CPU scale is not 0 to the highest sample: {labels}"
    assert not any(label.startswith("-") for label in labels), labels
    assert dashboard.metrics is not None and dashboard.metrics.utilization[1].cpu_percent.ys == [80.0]


def test_the_widget_says_which_start_up_phase_runs_until_the_first_step(tmp_path: Path) -> None:
    from nbtrain.dashboard import Dashboard

    run = make_run(tmp_path, {"max_steps": 4})
    now = time.time()
    run.write_status(state="running", started=now - 40)
    timeline = run.path / TIMELINE_FILE
    dashboard = Dashboard(redraw_every_s=0.0)
    dashboard.started(run, plan())
    tick = type("P", (), {"elapsed_s": 40.0})()
    dashboard.progress(tick)
    assert "starting the worker processes" in dashboard.phase.value and "starting" in dashboard.status.value
    timeline.write_text(json.dumps({"python_started": now - 39, "job_received": now - 30, "prepare_called": now - 20,
                                    "ops": [{"name": "cpu_adam", "started": now - 12, "cached": False}]}))
    dashboard.progress(tick)
    shown = dashboard.phase.value
    assert "building DeepSpeed op cpu_adam (once for this environment: later runs reuse it) · 12 s" in shown, shown
    assert "done: workers started 1.0 s · imports 9.0 s · cell up to prepare 10 s" in shown, shown
    append(run.metrics_file(0), *step_records(1, 2.0))
    dashboard.progress(tick)
    assert dashboard.phase.value == "" and "running" in dashboard.status.value, "the phase stayed after step 1"


def test_every_view_gives_the_same_eta_for_one_run_directory(tmp_path: Path) -> None:
    # Regression: the cell said ETA 2:39 and the sidebar 3:21 for the same run at the same moment.
    from nbtrain.dashboard import Dashboard
    from nbtrain.launch.run import read_progress
    from nbtrain.server.runs import ProgressCache, summary

    run = make_run(tmp_path, {"max_steps": 200})
    run.write_status(state="running", started=990.0)
    for step in range(1, 31):
        timing = {"step": step, "rank": 0, "time": 1000.0 + step, "lr": 1e-3, "samples_per_s": 64.0,
                  "step_time_s": 12.0 if step == 1 else 0.5 + 0.2 * (step % 3)}  # a slow first step, then jitter
        append(run.metrics_file(0), timing, {"step": step, "rank": 0, "time": 1000.0 + step, "loss": 1.0})
    cell = read_progress(run)  # the cell's own reader, from status.json's start (990)
    dashboard = Dashboard(redraw_every_s=0.0)
    dashboard.started(run, plan())
    dashboard.progress(cell)
    assert dashboard.metrics is not None
    sidebar = summary(run, ProgressCache())
    assert cell.eta_s is not None and cell.eta_s == dashboard.metrics.eta_s == sidebar["eta_s"]
    assert cell.eta_s == pytest.approx(170 * 0.7), "not the median pace of the recent steps"
    eta_text = f"ETA {clock(cell.eta_s)}"
    assert eta_text in cell.line() and eta_text in dashboard.progress_text.value


# -- the widget, without a kernel ---------------------------------------------------------------
def plan() -> Any:
    return plan_run(parse_line("--nproc 2 --steps 4"), MachineFacts(gpu_count=0))


def test_widget_state_follows_the_run_directory(tmp_path: Path) -> None:
    from nbtrain.dashboard import Dashboard

    run = make_run(tmp_path, {"max_steps": 4})
    stops: list[bool] = []
    dashboard = Dashboard(redraw_every_s=0.0)
    dashboard.started(run, plan(), lambda: stops.append(True))
    assert "waiting" in dashboard.charts.value and not dashboard.stop_button.disabled
    run.write_status(state="running")
    append(run.metrics_file(0), *step_records(1, 2.0), *step_records(2, 1.0))
    append(run.path / "utilization" / "rank-0.jsonl", util_record(0, 1000.0))
    dashboard.progress(type("P", (), {"elapsed_s": 3.0})())
    assert (dashboard.bar.value, dashboard.bar.max) == (2, 4)
    assert "step 2/4" in dashboard.progress_text.value and "ETA 0:01" in dashboard.progress_text.value
    assert "running" in dashboard.status.value
    assert "<polyline" in dashboard.charts.value and "rank 0 · CPU" in dashboard.devices.value
    dashboard.stop_button.click()
    dashboard.stop_button.click()
    assert stops == [True], "Stop must call the run's stop exactly once"
    dashboard.progress(type("P", (), {"elapsed_s": 3.2})())  # the next tick shows it
    assert dashboard.stop_button.disabled and "stopping" in dashboard.status.value


def test_the_dashboard_turns_static_when_it_sees_the_run_end(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from nbtrain.dashboard import Dashboard

    run = make_run(tmp_path, {"max_steps": 2})
    dashboard = Dashboard(redraw_every_s=0.0)
    dashboard.started(run, plan(), lambda: None)
    append(run.metrics_file(0), *step_records(1, 2.0), *step_records(2, 1.0))
    run.finish("succeeded", "", timings={"total_s": 61.0})
    dashboard.progress(type("P", (), {"elapsed_s": 3.0})())  # a background run's last tick: no `finished` call
    shown = capsys.readouterr().out  # outside a kernel, displays are printed as text
    assert "<final curves of 20261125-083705-test-c302: succeeded>" in shown
    assert "2 of 2" in shown and "1:01" in shown
    dashboard.finished(None)  # type: ignore[arg-type]
    assert "final curves" not in capsys.readouterr().out, "the end was shown twice"


def test_attaching_without_a_plan_names_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nbtrain.dashboard import Dashboard

    Dashboard().started(make_run(tmp_path), None)
    assert "run 20261125-083705-test-c302: 2 processes" in capsys.readouterr().out


def test_without_a_stop_callback_the_button_is_disabled(tmp_path: Path) -> None:
    from nbtrain.dashboard import Dashboard

    dashboard = Dashboard()
    dashboard.started(make_run(tmp_path), plan())
    assert dashboard.stop_button.disabled


# -- through a real kernel -----------------------------------------------------------------------
Act = Callable[[dict[str, Any]], None]


def collect(kernel: Kernel, code: str, act: Act | None = None, timeout: float = 300) -> list[tuple[float, dict]]:
    """Run `code` as a cell; return (arrival time, message) for every iopub message it caused.

    `act` sees every iopub message as it arrives (e.g. to click a button, as a frontend would).
    """
    msg_id = kernel.client.execute(code)
    messages: list[tuple[float, dict]] = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            msg = kernel.client.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            continue
        if act is not None:
            act(msg)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return messages
        messages.append((time.time(), msg))
    raise AssertionError(f"the cell did not finish in {timeout} s")


def of_type(messages: list[tuple[float, dict]], kind: str) -> list[tuple[float, dict]]:
    return [(t, m) for t, m in messages if m["msg_type"] == kind]


def widget_values(messages: list[tuple[float, dict]]) -> list[tuple[float, str]]:
    """Return (time, value) of every widget `value` update, in order."""
    return [(t, str(m["content"]["data"]["state"]["value"])) for t, m in of_type(messages, "comm_msg")
            if m["content"]["data"].get("method") == "update" and "value" in m["content"]["data"].get("state", {})]


def click(kernel: Kernel, comm_id: str) -> None:
    """Send what a frontend sends when a Button is clicked."""
    msg = kernel.client.session.msg("comm_msg", {"comm_id": comm_id,
                                                 "data": {"method": "custom", "content": {"event": "click"}}})
    kernel.client.shell_channel.send(msg)


def png_of(messages: list[tuple[float, dict]]) -> bytes:
    pictures = [m["content"]["data"] for _, m in of_type(messages, "update_display_data")
                if "image/png" in m["content"]["data"]]
    assert pictures, "no static picture replaced the live dashboard"
    return base64.b64decode(pictures[-1]["image/png"])


def summary_of(messages: list[tuple[float, dict]]) -> dict[str, str]:
    tables = [m["content"]["data"] for _, m in messages if m["msg_type"] in ("display_data", "update_display_data")
              and "<table>" in m["content"]["data"].get("text/html", "")]
    assert tables, "no summary table was left in the output"
    return tables[-1]


SLOW_LOSS = """
import time
def slow_loss(model, batch):
    time.sleep(0.02)  # a step long enough to watch
    return loss_fn(model, batch)
"""


def train_slowly(kernel: Kernel, flags: str, before_fit: str = "") -> list[tuple[float, dict]]:
    """Run a 2-rank cell that fits with the slow loss (slow enough to watch); return its messages (see `collect`)."""
    kernel.execute(SLOW_LOSS)
    return collect(kernel, f"%%bigtrain --nproc 2 --micro-batch 4 {flags}\n{before_fit}"
                           "result = bigtrain.fit(make_model(), ToyData(), loss_fn=slow_loss)\n")


@pytest.mark.integration
def test_the_dashboard_updates_while_training_and_leaves_a_picture_and_a_table(kernel: Kernel,
                                                                                tmp_path: Path) -> None:
    messages = train_slowly(kernel, "--steps 100", "if bigtrain.is_main:\n    print('hello from rank 0', flush=True)\n")
    end = messages[-1][0]
    steps = sorted({(t, int(re.match(r"&nbsp;step (\d+)", v).group(1))) for t, v in widget_values(messages)
                    if v.startswith("&nbsp;step ")})
    during = {step for t, step in steps if 0 < step < 100}
    assert len(during) >= 3, f"the progress showed only steps {sorted(during)} during the run"
    charts = [t for t, v in widget_values(messages) if "<polyline" in v and ">loss<" in v]
    assert len(charts) >= 3 and charts[0] < end - 0.5, "the loss chart was not redrawn during the run"
    # Nothing of the cell's output is wiped: prints stay, the dashboard is replaced only in its own place.
    assert not of_type(messages, "clear_output")
    texts = "".join(m["content"]["text"] for _, m in of_type(messages, "stream"))
    assert "hello from rank 0" in texts and "bigtrain: run" in texts
    assert png_of(messages).startswith(b"\x89PNG\r\n\x1a\n")
    table = summary_of(messages)
    assert "succeeded" in table["text/plain"] and "100 of 100" in table["text/plain"], table["text/plain"]
    assert "final loss" in table["text/html"]
    devices = [v for _, v in widget_values(messages) if "rank 1 · CPU" in v]
    assert devices and "rank 0 · CPU" in devices[-1] and "no GPU" in devices[-1]
    run = next((tmp_path / "bigtrain-runs").iterdir())
    for rank in (0, 1):
        records = [json.loads(line) for line in (run / "utilization" / f"rank-{rank}.jsonl").read_text().splitlines()]
        assert records and all(r["device"] == "cpu" and r["rank"] == rank for r in records), records[:2]


@pytest.mark.integration
def test_a_starting_run_shows_each_start_up_phase_in_the_cell_until_its_first_step(kernel: Kernel,
                                                                                 tmp_path: Path) -> None:
    # Regression: a run sat at "step 0" with "waiting for the first values…" for 40 s while it started.
    messages = train_slowly(kernel, "--steps 20", "import time\ntime.sleep(2)  # the cell's own work before bigtrain.prepare\n")
    by_comm: dict[str, list[str]] = {}
    for _, m in of_type(messages, "comm_msg"):
        state = m["content"]["data"].get("state", {})
        if m["content"]["data"].get("method") == "update" and "value" in state:
            by_comm.setdefault(m["content"]["comm_id"], []).append(str(state["value"]))
    shown = next((values for values in by_comm.values() if any(v.startswith("<b>starting:</b>") for v in values)), [])
    labels = [re.sub(r" · .*", "", v.removeprefix("<b>starting:</b> ")) for v in shown if v]
    phases = list(dict.fromkeys(labels))  # in the order they were first shown
    assert "importing torch, DeepSpeed and accelerate" in phases, phases
    assert "running the cell up to bigtrain.prepare" in phases, phases
    assert phases.index("importing torch, DeepSpeed and accelerate") < phases.index(
        "running the cell up to bigtrain.prepare"), phases
    assert shown[-1] == "", "the start-up phase was still shown after the first step"
    timeline = json.loads((only_run(tmp_path) / TIMELINE_FILE).read_text())
    marks = ["python_started", "imports_done", "job_received", "prepare_called", "engine_built", "first_step"]
    assert [timeline[m] for m in marks] == sorted(timeline[m] for m in marks), timeline
    assert all(op["cached"] and op["ended"] >= op["started"] for op in timeline["ops"]), timeline["ops"]


@pytest.mark.integration
def test_with_nvml_the_dashboard_shows_each_ranks_gpu_and_energy(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The fake reaches the workers through the kernel's sys.path, which the launcher hands down.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(FAKES), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_NVML_GPUS", "2")
    kernel = Kernel(tmp_path)
    try:
        kernel.execute("%load_ext nbtrain")
        kernel.execute(NOTEBOOK_SETUP + SLOW_LOSS)
        messages = collect(kernel, "%%bigtrain --nproc 2 --steps 40 --micro-batch 4\n"
                                   "bigtrain.fit(make_model(), ToyData(), loss_fn=slow_loss)\n")
    finally:
        kernel.shutdown()
        wait_until_gone(str(tmp_path), timeout=30)
    values = [v for _, v in widget_values(messages)]
    devices = [v for v in values if "GPU 1" in v]
    assert devices, "no GPU row appeared"
    assert "rank 0 · GPU 0 (NVIDIA H100 80GB HBM3)" in devices[-1] and "rank 1 · GPU 1" in devices[-1]
    assert any("GPU utilization %" in v for v in values)
    table = summary_of(messages)["text/plain"]
    assert "700 W (NVML)" in table, table  # two GPUs at 350 W
    energy = next(line for line in table.splitlines() if "energy this run" in line)
    assert "(NVML)" in energy and NOT_MEASURABLE not in energy, energy


@pytest.mark.integration
def test_widget_clicks_reach_a_busy_cell_and_queued_cells_still_run_after(kernel: Kernel) -> None:
    cell = """
import ipywidgets, time
from nbtrain.dashboard.ui_poll import UiPoller
clicked = []
button = ipywidgets.Button(description="poll-test")
button.on_click(lambda _: clicked.append(True))
display(button)
poller = UiPoller.for_this_kernel()
deadline = time.time() + 60
while not clicked and time.time() < deadline:
    poller.poll()
    time.sleep(0.05)
print("clicked" if clicked else "never clicked")
"""
    second: list[str] = []

    def frontend(msg: dict[str, Any]) -> None:
        content = msg["content"]
        if msg["msg_type"] == "comm_open" and content.get("data", {}).get("state", {}).get("description") == "poll-test":
            second.append(kernel.client.execute("print('second cell ran')"))  # queued behind the busy cell
            click(kernel, content["comm_id"])

    messages = collect(kernel, cell, act=frontend, timeout=120)
    printed = "".join(m["content"]["text"] for _, m in of_type(messages, "stream"))
    assert printed.strip() == "clicked", printed
    assert second, "the button was never displayed"
    after = []
    deadline = time.time() + 60
    while time.time() < deadline and not any("second cell ran" in text for text in after):
        msg = kernel.client.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") == second[0] and msg["msg_type"] == "stream":
            after.append(msg["content"]["text"])
    assert "second cell ran" in "".join(after), "a cell queued while the first one polled was lost"


@pytest.mark.integration
def test_the_stop_button_ends_the_run_while_the_cell_is_busy(kernel: Kernel, tmp_path: Path) -> None:
    kernel.execute(SLOW_LOSS)
    seen: dict[str, Any] = {"stop": None, "clicked_at_step": None}

    def frontend(msg: dict[str, Any]) -> None:
        content = msg["content"]
        if msg["msg_type"] == "comm_open" and content["data"].get("state", {}).get("description") == "Stop":
            seen["stop"] = content["comm_id"]
        if msg["msg_type"] == "comm_msg" and seen["stop"] and seen["clicked_at_step"] is None:
            shown = re.match(r"&nbsp;step ([1-9]\d*)", str(content["data"].get("state", {}).get("value", "")))
            if shown:  # the user sees training steps, then clicks Stop
                seen["clicked_at_step"] = int(shown.group(1))
                click(kernel, seen["stop"])

    messages = collect(kernel, "%%bigtrain --nproc 2 --steps 100000 --micro-batch 4\n"
                               "bigtrain.fit(make_model(), ToyData(), loss_fn=slow_loss)\n", act=frontend)
    assert seen["clicked_at_step"], "the dashboard never showed a step to click Stop at"
    assert not worker_processes(str(tmp_path)), "workers outlived the stopped cell"
    run = only_run(tmp_path)
    status = status_of(run)
    assert status["state"] == "stopped" and "stopped from the notebook" in status["reason"], status
    kept = losses(run)
    assert seen["clicked_at_step"] <= len(kept) < 100_000, f"{len(kept)} losses kept"
    assert "stopped" in summary_of(messages)["text/plain"]
    assert png_of(messages).startswith(b"\x89PNG")


@pytest.mark.integration
def test_a_background_run_keeps_its_dashboard_live_and_ends_it_without_wait(kernel: Kernel, tmp_path: Path) -> None:
    kernel.execute(SLOW_LOSS)
    client = kernel.client
    started = client.execute("%%bigtrain --nproc 2 --steps 150 --micro-batch 4 --background\n"
                             "bigtrain.fit(make_model(), ToyData(), loss_fn=slow_loss)\n")
    other_cells: set[str] = set()
    updates, finals = 0, []
    deadline = time.time() + 240
    while time.time() < deadline and len(finals) < 2:
        if len(other_cells) < 400:
            other_cells.add(client.execute("1 + 1"))  # the user goes on working in the notebook
        try:
            msg = client.get_iopub_msg(timeout=0.3)
        except queue.Empty:
            continue
        data = msg["content"].get("data", {})
        if msg["msg_type"] == "comm_msg" and msg["parent_header"].get("msg_id") in other_cells:
            updates += "&nbsp;step " in str(data.get("state", {}).get("value", ""))
        if msg["msg_type"] == "update_display_data":
            finals.append(data)
    assert started and updates >= 2, f"only {updates} progress updates arrived while other cells ran"
    assert len(finals) == 2, "the picture and the table did not replace the live view when the run ended"
    assert "image/png" in finals[0] and "150 of 150" in finals[1]["text/plain"], finals[1].get("text/plain")
    assert status_of(only_run(tmp_path))["state"] == "succeeded"


# -- in a real JupyterLab, as a user sees it -----------------------------------------------------
@pytest.mark.browser
def test_jupyterlab_shows_the_live_dashboard_stops_the_run_and_keeps_a_picture_and_table(tmp_path: Path) -> None:
    from playwright import sync_api as playwright

    from tests.ui.lab import CHROMIUM, CHROMIUM_ARGS, JupyterLab, notebook

    root, home = tmp_path / "root", tmp_path / "home"
    root.mkdir()
    cell = "%%bigtrain --nproc 2 --steps 5000 --micro-batch 4\nresult = bigtrain.fit(make_model(), ToyData(), loss_fn=slow_loss)"
    (root / "dash.ipynb").write_text(notebook("%load_ext nbtrain", NOTEBOOK_SETUP + SLOW_LOSS, cell))
    artifacts = Path(os.environ.get("NBTRAIN_UI_ARTIFACTS") or tmp_path)
    lab = JupyterLab(root, home)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(240_000)  # generous: a loaded machine starts DeepSpeed slowly
            page.goto(f"{lab.url}/lab/tree/dash.ipynb?token={lab.token}")
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell")
            page.get_by_text("Python 3 (ipykernel) | Idle").wait_for()  # run-all before this is a no-op
            page.evaluate("() => { void window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
            output = page.locator(".jp-Cell").nth(2).locator(".jp-OutputArea")
            expect = playwright.Expect()  # its own timeout, not the shared default of other tests
            expect.set_options(timeout=240_000)
            expect(output.locator("button.widget-button", has_text="Stop")).to_be_visible()
            page.wait_for_function(  # a step in the progress line and a drawn loss curve, while it runs
                "() => /step [1-9]\\d*\\/5000/.test(document.body.innerText) && "
                "document.querySelector('.jp-OutputArea svg')?.querySelector('polyline') !== null")
            assert "rank 0 · CPU" in output.inner_text()
            output.screenshot(path=artifacts / "dashboard-live.png")
            output.locator("button.widget-button", has_text="Stop").click()  # while the cell is busy
            image = output.locator("img")
            expect(image).to_be_visible()  # the live view became the final picture
            expect(output.locator("table")).to_contain_text("stopped from the notebook")
            assert not worker_processes(str(root)), "workers outlived the Stop click"
            assert image.evaluate("img => img.naturalWidth") >= 640, "the final picture did not load"
            assert "bigtrain: run" in output.inner_text(), "the run's line above the dashboard was wiped"
            output.screenshot(path=artifacts / "dashboard-final.png")
            browser.close()
    finally:
        lab.stop()
        wait_until_gone(str(root), timeout=30)
