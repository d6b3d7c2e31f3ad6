"""`%bigtrain compare`: several runs' loss curves on one plot, and their settings side by side.

The settings are read from each run directory: the process count and the run-length flags
from run.json, everything else from the DeepSpeed config the engine ran with (the planned
one for a run that never started), flattened to dotted keys. The settings that differ come
first, so a sweep over one flag shows that flag at the top.
"""

from __future__ import annotations

import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nbtrain.dashboard.store import RunMetrics
from nbtrain.dashboard.svg import PALETTE
from nbtrain.result import RunResult
from nbtrain.rundir import RunDirectory

# Flags that are not DeepSpeed keys but change what a run trains.
RUN_SETTINGS = ("steps", "epochs", "seed", "qat")


@dataclass(frozen=True)
class SettingRow:
    """One setting across the compared runs (`None`: the run did not set it)."""

    key: str
    values: tuple[str | None, ...]

    @property
    def differs(self) -> bool:
        return len(set(self.values)) > 1


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """Return a nested DeepSpeed dict as {dotted.key: value as JSON text}."""
    if not isinstance(config, dict) or not config:
        return {prefix: json.dumps(config, default=str)} if prefix else {}
    flat: dict[str, str] = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def settings_of(run: RunDirectory) -> dict[str, str]:
    """Return one run's settings as {name: text}: processes, the run-length flags, then DeepSpeed keys."""
    info = run.run_info()
    flags = info.get("config") or {}
    settings = {"processes": json.dumps(info.get("nproc"))}
    settings |= {f"--{name}": json.dumps(flags[name]) for name in RUN_SETTINGS if flags.get(name) is not None}
    return settings | flatten(RunResult(run.path).config)


def settings_table(runs: Sequence[RunDirectory]) -> list[SettingRow]:
    """Return the settings of `runs` side by side: the rows that differ first, each group in its own order."""
    per_run = [settings_of(run) for run in runs]
    keys = list(dict.fromkeys(key for settings in per_run for key in settings))
    rows = [SettingRow(key, tuple(settings.get(key) for settings in per_run)) for key in keys]
    return [row for row in rows if row.differs] + [row for row in rows if not row.differs]


def table_bundle(runs: Sequence[RunDirectory], rows: list[SettingRow]) -> dict[str, str]:
    """Return the settings table as HTML and as text (for viewers without HTML)."""
    ids = [run.run_id for run in runs]
    changed = sum(row.differs for row in rows)
    title = f"settings of {len(runs)} runs: {changed} differ (first), {len(rows) - changed} the same"
    head = "".join(f"<th style='text-align:left'>{html.escape(i)}</th>" for i in ids)
    body = []
    for row in rows:
        style = " style='background:#fff3cd'" if row.differs else ""
        cells = "".join(f"<td style='text-align:left'>{html.escape(v or '—')}</td>" for v in row.values)
        body.append(f"<tr{style}><th style='text-align:left'>{html.escape(row.key)}</th>{cells}</tr>")
    table = (f"<table><caption style='text-align:left;font-weight:bold'>{html.escape(title)}</caption>"
             f"<tr><th style='text-align:left'>setting</th>{head}</tr>{''.join(body)}</table>")
    text_rows = [("setting", *ids), *((("* " if r.differs else "  ") + r.key, *(v or "—" for v in r.values))
                                      for r in rows)]
    widths = [max(len(r[i]) for r in text_rows) for i in range(len(ids) + 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in text_rows]
    return {"text/html": table, "text/plain": "\n".join([title + " (* = differs)", *lines])}


def loss_png(runs: Sequence[RunDirectory], dpi: int = 80) -> bytes:
    """Return a PNG of the runs' loss curves on one plot (raw faint, smoothed strong, eval dashed)."""
    # The object API with the Agg canvas, as the dashboard's picture: the kernel's pyplot is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4.8), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.set_title(f"loss of {len(runs)} runs", fontsize=10)
    axes.set_xlabel("step", fontsize=8)
    axes.tick_params(labelsize=7)
    for i, run in enumerate(runs):
        metrics = RunMetrics(run)
        metrics.update()
        color = PALETTE[i % len(PALETTE)]
        final = f" (final {metrics.loss.last:.4g})" if metrics.loss.last is not None else " (no loss logged)"
        axes.plot(metrics.loss.xs, metrics.loss.ys, color=color, alpha=0.3, linewidth=1.0)
        axes.plot(metrics.loss_smooth.xs, metrics.loss_smooth.ys, color=color, linewidth=1.6,
                  label=run.run_id + final)
        if len(metrics.eval_loss):
            axes.plot(metrics.eval_loss.xs, metrics.eval_loss.ys, color=color, linestyle="--", marker="o",
                      linewidth=1.2, label=f"{run.run_id} eval")
    axes.legend(fontsize=7)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def show_comparison(runs: Sequence[RunDirectory]) -> None:
    """Display the loss plot of `runs` and, under it, their settings table."""
    import base64

    from IPython.display import display

    png = loss_png(runs)
    display({"image/png": base64.b64encode(png).decode(),
             "text/plain": f"<loss curves of {', '.join(run.run_id for run in runs)}>"}, raw=True)
    display(table_bundle(runs, settings_table(runs)), raw=True)
