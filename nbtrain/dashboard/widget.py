"""`Dashboard`: the live view of a run in the cell output (standard ipywidgets only).

It is a `ProgressSink` (see `nbtrain.launch.run`): the supervising loop calls `progress()` five
times a second on the kernel's main thread, which is also the only thread that writes
widget state. Each tick reads the run directory's new bytes; the text parts change when
their values do, the charts (SVG strings, see `svg.py`) are redrawn at most twice a
second. The dashboard is one display of its own: rank 0's prints go to the cell's stdout
after it and nothing is ever cleared. When the run ends the same display becomes a PNG
of the final curves, and a summary table is added below, so that a saved notebook shows
the result where widgets do not render (GitHub, nbconvert, nbval).
"""

from __future__ import annotations

import base64
import html
import sys
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as w
from IPython.display import DisplayHandle, display

from nbtrain.config.plan import RunPlan
from nbtrain.dashboard import svg
from nbtrain.dashboard.efficiency import efficiency
from nbtrain.dashboard.fmt import clock, number, si, size
from nbtrain.dashboard.picture import final_png
from nbtrain.dashboard.store import RunMetrics
from nbtrain.dashboard.summary import (
    KERNEL_GPU_LABEL,
    efficiency_rows,
    kernel_holds_gpu_memory,
    rows_html,
    rows_text,
    summary_rows,
    utilization_rows,
)
from nbtrain.dashboard.ui_poll import UiPoller
from nbtrain.result import RunResult
from nbtrain.rundir import FINAL_STATES, RunDirectory
from nbtrain.rundir.progress import Startup

REDRAW_EVERY_S = 0.5  # charts: twice a second
STATE_COLORS = {"starting": "#b8860b", "running": "#1f77b4", "succeeded": "#2ca02c", "failed": "#d62728", "stopped": "#ff7f0e"}


class Dashboard:
    """Show a run live: curves, progress and ETA, per-rank utilization, efficiency, and a Stop button.

    >>> start_run(plan, cell, namespace, Dashboard())       # doctest: +SKIP
    """

    reads_run_directory = True  # RunMetrics reads the metrics: the supervisor need not (nbtrain.launch.run)

    def __init__(self, redraw_every_s: float = REDRAW_EVERY_S):
        self.redraw_every_s = redraw_every_s
        self.metrics: RunMetrics | None = None
        self.redraws = 0
        self._stop: Callable[[], Any] | None = None
        self._handle: DisplayHandle | None = None
        self._summary_handle: DisplayHandle | None = None
        self._final = False
        self._poller: UiPoller | None = None
        self._last_draw = 0.0
        self._elapsed = 0.0
        self._stopping = False
        self._unseen = False  # records read but not drawn yet
        self._build()

    # -- the widgets -----------------------------------------------------------------------
    def _build(self) -> None:
        self.status = w.HTML(layout=w.Layout(flex="1 1 auto"))
        self.stop_button = w.Button(description="Stop", icon="stop", button_style="danger", disabled=True,
                                    tooltip="End the run: every worker stops, metrics are kept",
                                    layout=w.Layout(width="90px"))
        self.stop_button.on_click(self._on_stop)
        self.bar = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="320px"))
        self.progress_text = w.HTML()
        self.phase = w.HTML()  # the start-up phase, until the first step
        self.charts = w.HTML()
        self.devices = w.HTML()
        self.efficiency = w.HTML()
        self.view = w.VBox([
            w.HBox([self.status, self.stop_button]),
            w.HBox([self.bar, self.progress_text]),
            self.phase,
            self.charts,
            w.HTML("<b>Devices</b>"), self.devices,
            w.HTML("<b>Efficiency</b>"), self.efficiency,
        ])

    # -- ProgressSink ------------------------------------------------------------------------
    def started(self, run: RunDirectory, plan: RunPlan | None, stop: Callable[[], Any] | None = None) -> None:
        """Show the dashboard of `run`; `plan` is None when attaching to a run started elsewhere."""
        for notice in plan.notices if plan is not None else ():
            print(f"bigtrain: {notice}")
        nproc = plan.world_size if plan is not None else run.run_info().get("nproc", "?")
        print(f"bigtrain: run {run.run_id}: {nproc} processes, run directory {run.path}", flush=True)
        self.metrics = RunMetrics(run)
        self._stop = stop
        self.stop_button.disabled = stop is None
        self._poller = UiPoller.for_this_kernel()
        self._set_status("starting")
        self._draw()
        self._handle = display(self.view, display_id=True)
        # An empty place for the summary table, right under the dashboard.
        self._summary_handle = display({"text/html": "", "text/plain": ""}, raw=True, display_id=True)

    def output(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def progress(self, progress: Any) -> None:
        """Take what the workers wrote since the last tick; redraw the charts at most twice a second."""
        if self.metrics is None or self._final:
            return
        self._elapsed = float(getattr(progress, "elapsed_s", self._elapsed))
        self._unseen = self.metrics.update() or self._unseen
        state = str(self.metrics.run.status().get("state", "running"))
        if state in FINAL_STATES:
            self._finalize()
            return
        startup = self.metrics.startup() if self.metrics.step == 0 else None
        if self._stopping:
            self._show_stopping()
        else:
            self._set_status("starting" if startup is not None else state)
        self._set_phase(startup)
        self._set_progress()
        now = time.monotonic()
        if self._unseen and now - self._last_draw >= self.redraw_every_s:
            self._last_draw, self._unseen = now, False
            self._draw()

    def poll_ui(self) -> None:
        """Deliver waiting widget messages (a Stop click) while the cell runs; call from the main thread."""
        if self._poller is not None:
            self._poller.poll()

    def finished(self, result: RunResult) -> None:
        """Replace the live view by a PNG of the final curves, with the summary table under it."""
        self._finalize()

    def _finalize(self) -> None:
        # Called when the run's final state is seen (a background run may never get `finished`).
        if self.metrics is None or self._final:
            return
        self._final = True
        run = self.metrics.run
        self.metrics.update()
        status = run.status()
        state, reason = str(status.get("state", "unknown")), str(status.get("reason", ""))
        total_s = (status.get("timings") or {}).get("total_s", self._elapsed)
        title = f"{run.run_id}: {state}"
        png = final_png(self.metrics, title)
        picture = {"image/png": base64.b64encode(png).decode(), "text/plain": f"<final curves of {title}>"}
        rows = summary_rows(self.metrics, state, reason, total_s)
        table = {"text/html": rows_html(rows, f"bigtrain run {run.run_id}"),
                 "text/plain": rows_text(rows, f"bigtrain run {run.run_id}")}
        # Updates by display id land in the run's own cell, even when another cell is running now.
        for handle, bundle in ((self._handle, picture), (self._summary_handle, table)):
            if handle is not None:
                handle.update(bundle, raw=True)
            else:
                display(bundle, raw=True)
        _close(self.view)  # its views are gone from the output; free the comms too

    # -- parts -----------------------------------------------------------------------------
    def _on_stop(self, _button: Any) -> None:
        # Runs on the kernel's main thread; widget state is written by the ticks only (one writer).
        if self._stop is None or self._stopping:
            return
        self._stopping = True
        self._stop()

    def _show_stopping(self) -> None:
        self.stop_button.disabled = True
        self.stop_button.description = "Stopping…"
        self._set_status("stopping")

    def _set_status(self, state: str) -> None:
        assert self.metrics is not None
        color = STATE_COLORS.get(state, "#555")
        self.status.value = (f"<b>bigtrain</b> {self.metrics.run.run_id} · "
                             f"<b style='color:{color}'>{state}</b>")

    def _set_phase(self, startup: Startup | None) -> None:
        """Say what a starting run is doing and how long each phase took (the same words as JupyterLab's)."""
        if startup is None:
            text = ""
        else:
            trail = startup.trail()
            text = (f"<b>starting:</b> {html.escape(startup.line(time.time()))}"
                    + (f"<br><small style='color:#666'>done: {html.escape(trail)}</small>" if trail else ""))
        if self.phase.value != text:
            self.phase.value = text

    def _set_progress(self) -> None:
        m = self.metrics
        assert m is not None
        total = m.max_steps
        self.bar.max = max(1, total or m.step or 1)
        self.bar.value = min(m.step, self.bar.max)
        parts = [f"step {m.step}" + (f"/{total}" if total else "")]
        if m.loss.last is not None:
            parts.append(f"loss {number(m.loss.last)}")
        if m.lr.last is not None:
            parts.append(f"lr {number(m.lr.last, 3)}")
        if m.samples_per_s.last is not None:
            parts.append(f"{number(m.samples_per_s.last, 4)} samples/s")
        if m.tokens_per_s.last is not None:
            parts.append(f"{si(m.tokens_per_s.last, 'tokens/s')}")
        parts.append(f"elapsed {clock(self._elapsed)}")
        if m.eta_s is not None:
            parts.append(f"ETA {clock(m.eta_s)}")
        self.progress_text.value = "&nbsp;" + " · ".join(parts)

    def _draw(self) -> None:
        """Redraw the charts and tables (a few milliseconds; see benchmarks)."""
        m = self.metrics
        assert m is not None
        self.redraws += 1
        self.charts.value = "".join([
            svg.line_chart("loss", [svg.Line("loss", m.loss, svg.PALETTE[0], 1.0, opacity=0.35),
                                    svg.Line("smoothed", m.loss_smooth, svg.PALETTE[0], 2.0),
                                    svg.Line("eval loss", m.eval_loss, svg.PALETTE[1], 2.0, dashed=True)]),
            svg.line_chart("learning rate", [svg.Line("lr", m.lr, svg.PALETTE[2])]),
            # tokens/s is ~100x samples/s: a scale of its own, or samples/s lies flat at the bottom
            svg.line_chart("throughput", [svg.Line("samples/s", m.samples_per_s, svg.PALETTE[3]),
                                          svg.Line("tokens/s", m.tokens_per_s, svg.PALETTE[4], right_axis=True)]),
        ]) + self._utilization_charts()
        self.devices.value = rows_html(utilization_rows(m))
        self.efficiency.value = rows_html(efficiency_rows(efficiency(m), tokens_known=bool(len(m.tokens_per_s))))

    def _utilization_charts(self) -> str:
        m = self.metrics
        assert m is not None
        ranks = list(m.utilization.values())
        if m.on_gpu:
            util = [svg.Line(u.label, u.gpu_util, svg.PALETTE[i % 8]) for i, u in enumerate(ranks)]
            mem = [svg.Line(u.label, u.gpu_mem_bytes, svg.PALETTE[i % 8]) for i, u in enumerate(ranks)]
            if kernel_holds_gpu_memory(m):  # a notebook that ran CUDA: its own share, apart from the ranks'
                mem.append(svg.Line(KERNEL_GPU_LABEL, m.kernel_gpu_mem_bytes, "#555555", dashed=True))
            titles = ("GPU utilization %", "GPU memory")
        else:
            util = [svg.Line(f"rank {u.rank}", u.cpu_percent, svg.PALETTE[i % 8]) for i, u in enumerate(ranks)]
            mem = [svg.Line(f"rank {u.rank}", u.rss_bytes, svg.PALETTE[i % 8]) for i, u in enumerate(ranks)]
            titles = ("CPU % per rank (100 = one core)", "CPU memory (RSS) per rank")
        waiting = "waiting for the first sample…"
        x_label = "since the run started"
        return (svg.line_chart(titles[0], util, x_label=x_label, empty_text=waiting, time_axis=True, y_from_zero=True)
                + svg.line_chart(titles[1], mem, y_format=size, x_label=x_label, empty_text=waiting, time_axis=True,
                                 y_from_zero=True))


def _close(widget: w.Widget) -> None:
    for child in getattr(widget, "children", ()):
        _close(child)
    widget.close()
