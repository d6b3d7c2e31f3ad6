"""The static picture of a run's final curves (PNG), left in the notebook for viewers without widgets."""

from __future__ import annotations

import io
from typing import Any

from nbtrain.dashboard.store import RunMetrics, Series
from nbtrain.dashboard.svg import PALETTE


def final_png(metrics: RunMetrics, title: str, dpi: int = 80) -> bytes:
    """Return a PNG of loss, learning rate, throughput and per-rank utilization."""
    # The object API with the Agg canvas: no pyplot, so the kernel's own figures and backend are untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 6.2), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(title, fontsize=10)
    loss, lr, speed, util = figure.subplots(2, 2).flat
    _plot(loss, "loss", [("loss", metrics.loss, 0.35), ("smoothed", metrics.loss_smooth, 1.0),
                         ("eval loss", metrics.eval_loss, 1.0)], "step")
    _plot(lr, "learning rate", [("lr", metrics.lr, 1.0)], "step")
    _plot(speed, "throughput", [("samples/s", metrics.samples_per_s, 1.0)], "step")
    if len(metrics.tokens_per_s):  # ~100x samples/s: a scale of its own, or samples/s lies flat
        tokens = speed.twinx()
        tokens.plot(metrics.tokens_per_s.xs, metrics.tokens_per_s.ys, color=PALETTE[1], linewidth=1.2)
        tokens.set_ylabel("tokens/s", fontsize=8, color=PALETTE[1])
        tokens.tick_params(labelsize=7, colors=PALETTE[1])
        speed.set_ylabel("samples/s", fontsize=8, color=PALETTE[0])
    gpu = metrics.on_gpu
    curves = [(u.label, u.gpu_util if gpu and u.device == "gpu" else u.cpu_percent, 1.0)
              for u in metrics.utilization.values()]
    _plot(util, "GPU utilization %" if gpu else "CPU % per rank (100 = one core)", curves, "seconds since the run started")
    util.set_xlim(left=0)
    util.set_ylim(bottom=0)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _plot(axes: Any, title: str, curves: list[tuple[str, Series, float]], x_label: str) -> None:
    axes.set_title(title, fontsize=9)
    axes.set_xlabel(x_label, fontsize=8)
    axes.tick_params(labelsize=7)
    drawn = 0
    for i, (label, series, alpha) in enumerate(curves):
        if len(series):
            marker = "o" if len(series) == 1 else None
            axes.plot(series.xs, series.ys, label=label, alpha=alpha, color=PALETTE[i % len(PALETTE)],
                      marker=marker, linewidth=1.2)
            drawn += 1
    if drawn > 1:
        axes.legend(fontsize=7)
    if not drawn:
        axes.text(0.5, 0.5, "not recorded in this run", ha="center", va="center", color="#888",
                  transform=axes.transAxes)
