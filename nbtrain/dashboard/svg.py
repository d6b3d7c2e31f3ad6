"""Small line charts as SVG text: cheap to build (well under a millisecond per chart), no plotting library.

The live dashboard redraws these a few times a second; matplotlib would cost tens of
milliseconds per redraw on the kernel's main thread, which is also the thread that
supervises the workers.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass

from nbtrain.dashboard.fmt import si
from nbtrain.dashboard.store import Series

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
WIDTH, HEIGHT = 330, 170
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 10, 30, 24


@dataclass(frozen=True)
class Line:
    """One curve of a chart; a line on the right axis has a scale of its own (e.g. tokens/s next to samples/s)."""

    label: str
    series: Series
    color: str = PALETTE[0]
    width: float = 1.5
    dashed: bool = False
    opacity: float = 1.0
    right_axis: bool = False


def _default_format(value: float) -> str:
    return si(value, "").strip() if abs(value) >= 1000 else f"{value:.3g}"


def seconds_format(value: float) -> str:
    """Return a time-axis tick: "0 s", "45 s", "2:05"."""
    value = max(0.0, value)
    if value < 100:
        return f"{value:.0f} s"
    minutes, secs = divmod(int(round(value)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _step_format(value: float) -> str:
    return f"{value:.0f}" if abs(value - round(value)) < 1e-6 else f"{value:.4g}"


@dataclass(frozen=True)
class _Scale:
    low: float
    high: float

    @classmethod
    def of(cls, lines: list[Line], from_zero: bool) -> _Scale:
        low = min(min(line.series.ys) for line in lines)
        high = max(max(line.series.ys) for line in lines)
        if from_zero and low >= 0:
            low = 0.0
        if high == low:
            low, high = low - (abs(low) * 0.05 or 1.0), high + (abs(high) * 0.05 or 1.0)
        return cls(low, high)


def line_chart(title: str, lines: list[Line], y_format: Callable[[float], str] = _default_format,
               x_label: str = "step", empty_text: str = "waiting for the first values…",
               width: int = WIDTH, height: int = HEIGHT, time_axis: bool = False, y_from_zero: bool = False,
               right_format: Callable[[float], str] = _default_format) -> str:
    """Return an SVG chart of `lines`, with its title and legend.

    Lines share the left axis's scale, except those with `right_axis`, which share a scale of
    their own on the right. `time_axis`: x is seconds since the run started, shown from 0.
    `y_from_zero`: the scale starts at 0 for values that are never negative (CPU %, memory).
    """
    drawn = [line for line in lines if len(line.series)]
    left = [line for line in drawn if not line.right_axis]
    right = [line for line in drawn if line.right_axis]
    margin_right = _LEFT if right else _RIGHT
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" style="font: 11px sans-serif; background: #fff">',
             f'<text x="{_LEFT}" y="13" font-weight="bold">{html.escape(title)}</text>']
    plot_w, plot_h = width - _LEFT - margin_right, height - _TOP - _BOTTOM
    parts.append(f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>')
    if not drawn:
        parts.append(f'<text x="{_LEFT + plot_w / 2}" y="{_TOP + plot_h / 2}" text-anchor="middle" '
                     f'fill="#888">{html.escape(empty_text)}</text></svg>')
        return "".join(parts)
    x0 = 0.0 if time_axis else min(line.series.xs[0] for line in drawn)
    x1 = max(line.series.xs[-1] for line in drawn)
    x_span = (x1 - x0) or 1.0
    left_scale = _Scale.of(left, y_from_zero) if left else None
    right_scale = _Scale.of(right, y_from_zero) if right else None
    for line in drawn:
        scale = right_scale if line.right_axis else left_scale
        assert scale is not None
        y_span = scale.high - scale.low
        points = " ".join(f"{_LEFT + (x - x0) / x_span * plot_w:.1f},{_TOP + (scale.high - y) / y_span * plot_h:.1f}"
                          for x, y in zip(line.series.xs, line.series.ys, strict=True))
        dash = ' stroke-dasharray="4 3"' if line.dashed else ""
        if len(line.series) == 1:
            cx, cy = points.split(",")
            parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{line.color}"/>')
        else:
            parts.append(f'<polyline fill="none" stroke="{line.color}" stroke-width="{line.width}" '
                         f'stroke-opacity="{line.opacity}"{dash} points="{points}"/>')
    x_format = seconds_format if time_axis else _step_format
    parts += _x_axis(x_format(x0), x_format(x1), x_label, plot_w, plot_h)
    if left_scale is not None:
        color = left[0].color if right else "#000"
        parts += _y_axis(left_scale, y_format, _LEFT - 4, "end", color, plot_h)
    if right_scale is not None:
        parts += _y_axis(right_scale, right_format, _LEFT + plot_w + 4, "start", right[0].color, plot_h)
    parts += _legend(drawn, width)
    parts.append("</svg>")
    return "".join(parts)


def _y_axis(scale: _Scale, y_format: Callable[[float], str], x: float, anchor: str, color: str,
            plot_h: int) -> list[str]:
    return [f'<text x="{x}" y="{_TOP + 9}" text-anchor="{anchor}" fill="{color}">{html.escape(y_format(scale.high))}'
            "</text>",
            f'<text x="{x}" y="{_TOP + plot_h}" text-anchor="{anchor}" fill="{color}">'
            f"{html.escape(y_format(scale.low))}</text>"]


def _x_axis(first: str, last: str, x_label: str, plot_w: int, plot_h: int) -> list[str]:
    bottom = _TOP + plot_h
    return [
        f'<text x="{_LEFT}" y="{bottom + 14}">{html.escape(first)}</text>',
        f'<text x="{_LEFT + plot_w}" y="{bottom + 14}" text-anchor="end">{html.escape(last)}</text>',
        f'<text x="{_LEFT + plot_w / 2}" y="{bottom + 14}" text-anchor="middle" fill="#666">'
        f'{html.escape(x_label)}</text>',
    ]


def _legend(lines: list[Line], width: int) -> list[str]:
    if len(lines) < 2:
        return []
    parts, x = [], float(_LEFT)
    for line in lines:
        label = line.label + (" (right axis)" if line.right_axis else "")
        parts.append(f'<rect x="{x:.0f}" y="18" width="10" height="3" fill="{line.color}"/>'
                     f'<text x="{x + 13:.0f}" y="23" font-size="9">{html.escape(label)}</text>')
        x += 18 + 5.5 * len(label)
        if x > width - 40:
            break
    return parts
