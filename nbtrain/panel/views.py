"""The panel's read-only outputs as plain text, HTML and PNG: no widgets here, so tests read them."""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

from nbtrain.config.estimate import GIB, estimate
from nbtrain.config.render import get_path
from nbtrain.config.schedules import LrCurve
from nbtrain.errors import Problem

REFERENCE_SIZES = (125_000_000, 1_300_000_000, 7_000_000_000)


def count_parameters(model: Any) -> int | None:
    """Return the parameter count of a torch module (or an int given as is); None without one."""
    if model is None:
        return None
    if isinstance(model, int):
        return model
    return int(sum(p.numel() for p in model.parameters()))


def memory_rows(ds: Mapping[str, Any], nproc: int, param_count: int | None) -> list[tuple[str, float, float]]:
    """Return (state, on-device, in host memory) per process: GiB with a model, else bytes per parameter."""
    est = estimate(ds, nproc)
    zero = dict(ds.get("zero_optimization") or {})
    # estimate() folds everything offloaded into one `host` number; the same dict without
    # offload tells which state that host memory holds.
    kept = estimate({**ds, "zero_optimization": {k: v for k, v in zero.items() if not k.startswith("offload_")}},
                    nproc)
    # Whatever offload took off the device went to host memory.
    host = [kept.params - est.params, kept.grads - est.grads, kept.optimizer - est.optimizer]
    scale = param_count / GIB if param_count else 1.0
    rows = [("parameters", est.params, host[0]), ("gradients", est.grads, host[1]),
            ("optimizer states", est.optimizer, host[2])]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    return [(name, device * scale, host * scale) for name, device, host in rows]


def memory_unit(rows: list[tuple[str, float, float]], param_count: int | None) -> tuple[str, float]:
    """Return the unit to show `rows` in and the factor from their GiB: MiB for small models."""
    if not param_count:
        return "bytes/parameter", 1.0
    _, device, host = rows[-1]
    return ("GiB", 1.0) if device + host >= 1 else ("MiB", 1024.0)


def deepspeed_estimate(ds: Mapping[str, Any], nproc: int, model: Any) -> tuple[str, float, float] | None:
    """Return (function, device GiB, host GiB) from DeepSpeed's own estimator, where it covers the case.

    DeepSpeed's `estimate_zero{2,3}_model_states_mem_needs` assume 16-bit training with Adam on
    one machine, count host memory for the whole machine with a 1.5x buffer, and (stage 3)
    need the model's largest layer.
    """
    stage = get_path(ds, "zero_optimization.stage", 0)
    mixed = get_path(ds, "bf16.enabled") is True or get_path(ds, "fp16.enabled") is True
    adam = str(get_path(ds, "optimizer.type", "")).lower() in ("adam", "adamw")
    devices = {k: get_path(ds, f"zero_optimization.{k}.device", "none") for k in ("offload_optimizer", "offload_param")}
    if stage not in (2, 3) or not mixed or not adam or "nvme" in devices.values() or not hasattr(model, "modules"):
        return None
    total = count_parameters(model) or 0
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as zero2

        host, device = zero2(total, num_gpus_per_node=nproc, cpu_offload=devices["offload_optimizer"] == "cpu")
        return "estimate_zero2_model_states_mem_needs", device / GIB, host / GIB
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as zero3

    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    # nbtrain builds the engine without zero.Init (accelerate's zero3_init_flag=False).
    host, device, _ = zero3(total, largest, num_gpus_per_node=nproc, cpu_offload=devices["offload_optimizer"] == "cpu",
                         cpu_offload_params=devices["offload_param"] == "cpu", zero_init=False)
    return "estimate_zero3_model_states_mem_needs", device / GIB, host / GIB


def memory_html(ds: Mapping[str, Any], nproc: int, param_count: int | None, model: Any = None) -> str:
    """Return the per-process memory table of model states (activations excluded)."""
    table_rows = memory_rows(ds, nproc, param_count)
    unit, factor = memory_unit(table_rows, param_count)
    stage = get_path(ds, "zero_optimization.stage", 0)
    head = (f"{param_count:,} parameters" if param_count else "per parameter (pass model= for GiB)")
    rows = "".join(f"<tr><td>{name}</td><td>{device * factor:.3f}</td><td>{host * factor:.3f}</td></tr>"
                   for name, device, host in table_rows)
    table = (f"<b>Memory per process</b> — {head}; ZeRO-{stage}, {nproc} processes; activations not included"
             f"<table class='nbtrain-memory'><tr><th></th><th>on device ({unit})</th>"
             f"<th>host memory ({unit})</th></tr>{rows}</table>")
    official = deepspeed_estimate(ds, nproc, model)
    if official is not None:
        name, device, host = official
        table += (f"<div style='color:#666'>DeepSpeed's own <code>{name}</code> (16-bit Adam, its buffers included; "
                  f"host for the whole machine): {device * factor:.3f} {unit} per device, "
                  f"{host * factor:.3f} {unit} host</div>")
    if param_count:
        return table
    refs = []
    for size in REFERENCE_SIZES:
        total = memory_rows(ds, nproc, size)[-1]
        refs.append(f"<li>{size / 1e9:g}B parameters: {total[1]:.2f} GiB device, {total[2]:.2f} GiB host</li>")
    return table + f"<ul>{''.join(refs)}</ul>"


def memory_text(ds: Mapping[str, Any], nproc: int, param_count: int | None) -> str:
    """Return the memory estimate's total line as plain text."""
    rows = memory_rows(ds, nproc, param_count)
    unit, factor = memory_unit(rows, param_count)
    _, device, host = rows[-1]
    return (f"memory per process: {device * factor:.3f} {unit} on the device, "
            f"{host * factor:.3f} {unit} in host memory")


def problems_html(problems: Sequence[Problem]) -> str:
    """Return the list of every problem, or an empty string."""
    if not problems:
        return ""
    items = "".join(f"<li><code>{escape(p.where)}</code> = {escape(repr(p.value))}: "
                    f"{escape(p.rule)}. <i>Fix:</i> {escape(p.fix)}</li>" for p in problems)
    head = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
    return (f"<div style='color:#b00020'><b>{head}</b> — the panel keeps its last valid settings until "
            f"this is fixed:<ul>{items}</ul></div>")


def field_message_html(problems: Sequence[Problem]) -> str:
    """Return the inline message next to one field."""
    return "<br>".join(f"<span style='color:#b00020'>{escape(p.rule)}. Fix: {escape(p.fix)}</span>"
                       for p in problems)


def escape(text: str) -> str:
    return html.escape(text, quote=False)  # messages are element text; keep their quotes readable


def curve_png(curve: LrCurve) -> bytes:
    """Return a small PNG plot of the LR schedule (matplotlib's Agg backend, no display needed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 2.2), dpi=96)
    ax = fig.add_subplot()
    ax.plot(curve.steps, curve.lrs, color="#1f77b4")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(curve.scheduler, fontsize=9)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def summary(ds: Mapping[str, Any], nproc: int, steps: int, line: str) -> str:
    """Return the one-paragraph plain-text summary (what a saved notebook shows without widgets)."""
    stage = get_path(ds, "zero_optimization.stage", 0)
    offload = [f"{kind.split('_')[1]} offload to {get_path(ds, f'zero_optimization.{kind}.device')}"
               for kind in ("offload_optimizer", "offload_param")
               if get_path(ds, f"zero_optimization.{kind}.device", "none") != "none"]
    precision = "bf16" if get_path(ds, "bf16.enabled") is True else "fp16" if get_path(ds, "fp16.enabled") is True \
        else "fp32"
    micro, accum = ds.get("train_micro_batch_size_per_gpu"), ds.get("gradient_accumulation_steps", 1)
    batch = f"micro-batch {micro} x grad-accum {accum} x {nproc} processes"
    if isinstance(micro, int):
        batch += f" = global batch {micro * accum * nproc}"
    scheduler = get_path(ds, "scheduler.type") or "constant LR"
    parts = [f"ZeRO-{stage}", *offload, precision, batch,
             f"{get_path(ds, 'optimizer.type')} lr {get_path(ds, 'optimizer.params.lr')}",
             f"{scheduler} over {steps} steps"]
    return f"ConfigPanel: {', '.join(parts)}\n%%bigtrain {line}"
