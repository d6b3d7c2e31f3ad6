"""The words and figures of the dashboard: efficiency rows, utilization rows, the final summary table."""

from __future__ import annotations

import html
import statistics

from nbtrain.dashboard.efficiency import Efficiency, efficiency
from nbtrain.dashboard.fmt import clock, number, si, size
from nbtrain.dashboard.store import RunMetrics

Rows = list[tuple[str, str]]
KERNEL_GPU_LABEL = "kernel (this notebook)"


def efficiency_rows(eff: Efficiency, tokens_known: bool) -> Rows:
    """Return the efficiency figures as (label, text); a missing figure says why it is missing."""
    flops = si(eff.flops_per_device, "FLOP/s") if eff.flops_per_device is not None else eff.flops_note
    mfu = f"{eff.mfu:.1%} {eff.mfu_note}" if eff.mfu is not None else eff.mfu_note
    if eff.energy_j is None:
        power = energy = per_mtok = eff.energy_source
    else:
        power = f"{eff.power_w:.0f} W ({eff.energy_source})" if eff.power_w is not None else eff.energy_source
        energy = f"{si(eff.energy_j, 'J')} = {eff.energy_j / 3.6e6:.3g} kWh ({eff.energy_source})"
        per_mtok = si(eff.energy_per_mtok_j, "J") if eff.energy_per_mtok_j is not None else (
            "needs token counts (batches with input_ids)" if not tokens_known else "—")
    return [("FLOP/s per device", flops), ("MFU", mfu), ("power", power), ("energy this run", energy),
            ("energy per million tokens", per_mtok)]


def utilization_rows(metrics: RunMetrics) -> Rows:
    """Return one (rank label, latest reading) row per rank."""
    rows = []
    for util in metrics.utilization.values():
        if util.device == "gpu":
            total = f" of {size(util.gpu_mem_total_bytes)}" if util.gpu_mem_total_bytes else ""
            power = f", {util.power_w.last:.0f} W" if util.power_w.last is not None else ""
            text = (f"GPU {number(util.gpu_util.last, 3)} %, memory {size(util.gpu_mem_bytes.last)}{total}{power}; "
                    f"host CPU {number(util.cpu_percent.last, 3)} %")
        else:
            reason = f" (no GPU: {util.no_gpu_reason})" if util.no_gpu_reason else ""
            text = f"CPU {number(util.cpu_percent.last, 3)} % (100 = one core), memory {size(util.rss_bytes.last)}{reason}"
        rows.append((util.label, text))
    if kernel_holds_gpu_memory(metrics):
        rows.append((KERNEL_GPU_LABEL, f"GPU memory {size(metrics.kernel_gpu_mem_bytes.last)} held by the notebook's "
                     "own process (NVML per process), part of its GPU's memory above"))
    return rows or [("devices", "waiting for the workers' first utilization sample…")]


def kernel_holds_gpu_memory(metrics: RunMetrics) -> bool:
    """Return whether the kernel itself held GPU memory during the run (it ran CUDA: tensors, a model)."""
    return any(held > 0 for held in metrics.kernel_gpu_mem_bytes.ys)


def summary_rows(metrics: RunMetrics, state: str, reason: str, total_s: float | None) -> Rows:
    """Return the short table left in the notebook when a run ends."""
    rows: Rows = [("status", state + (f" ({reason})" if reason else "")),
                  ("steps", f"{metrics.step}" + (f" of {metrics.max_steps}" if metrics.max_steps else "")),
                  ("duration", clock(total_s))]
    if metrics.loss.last is not None:
        rows.append(("final loss", f"{number(metrics.loss.last)} (smoothed {number(metrics.loss_smooth.last)})"))
    if metrics.eval_loss.last is not None:
        rows.append(("eval loss", number(metrics.eval_loss.last)))
    if metrics.lr.last is not None:
        rows.append(("final learning rate", number(metrics.lr.last, 3)))
    for label, series, unit in (("throughput", metrics.samples_per_s, "samples/s"),
                                ("tokens", metrics.tokens_per_s, "tokens/s")):
        if len(series):
            rows.append((label, f"{statistics.median(series.ys[-20:]):.4g} {unit} (median of the last steps)"))
    peaks = _peak_memory(metrics)
    if peaks:
        rows.append(("peak memory per rank", peaks))
    rows += efficiency_rows(efficiency(metrics), tokens_known=bool(len(metrics.tokens_per_s)))
    return rows


def _peak_memory(metrics: RunMetrics) -> str:
    parts = []
    for util in metrics.utilization.values():
        series = util.gpu_mem_bytes if util.device == "gpu" else util.rss_bytes
        if len(series):
            kind = "GPU" if util.device == "gpu" else "CPU RSS"
            parts.append(f"rank {util.rank} {size(max(series.ys))} {kind}")
    if kernel_holds_gpu_memory(metrics):
        parts.append(f"{KERNEL_GPU_LABEL} {size(max(metrics.kernel_gpu_mem_bytes.ys))} GPU")
    return ", ".join(parts)


def rows_html(rows: Rows, title: str = "") -> str:
    caption = f"<caption style='text-align:left;font-weight:bold'>{html.escape(title)}</caption>" if title else ""
    body = "".join(f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
                   f"<td style='text-align:left'>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{caption}{body}</table>"


def rows_text(rows: Rows, title: str = "") -> str:
    width = max((len(k) for k, _ in rows), default=0)
    lines = [title] if title else []
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
