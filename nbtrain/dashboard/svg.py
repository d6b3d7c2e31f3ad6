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
    """One curve of a chart."""

    label: str
    series: Series
    color: str = PALETTE[0]
    width: float = 1.5
    dashed: bool = False
    opacity: float = 1.0


def _default_format(value: float) -> str:
    return si(value, "").strip() if abs(value) >= 1000 else f"{value:.3g}"


def line_chart(title: str, lines: list[Line], y_format: Callable[[float], str] = _default_format,
               x_label: str = "step", empty_text: str = "waiting for the first values…",
               width: int = WIDTH, height: int = HEIGHT) -> str:
    """Return an SVG chart of `lines` (each scaled into one shared box), with its title and legend."""
    drawn = [line for line in lines if len(line.series)]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" style="font: 11px sans-serif; background: #fff">',
             f'<text x="{_LEFT}" y="13" font-weight="bold">{html.escape(title)}</text>']
    plot_w, plot_h = width - _LEFT - _RIGHT, height - _TOP - _BOTTOM
    parts.append(f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>')
    if not drawn:
        parts.append(f'<text x="{_LEFT + plot_w / 2}" y="{_TOP + plot_h / 2}" text-anchor="middle" '
                     f'fill="#888">{html.escape(empty_text)}</text></svg>')
        return "".join(parts)
    x0 = min(line.series.xs[0] for line in drawn)
    x1 = max(line.series.xs[-1] for line in drawn)
    y0 = min(min(line.series.ys) for line in drawn)
    y1 = max(max(line.series.ys) for line in drawn)
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) * 0.05 or 1.0), y1 + (abs(y1) * 0.05 or 1.0)
    x_span, y_span = (x1 - x0) or 1.0, y1 - y0

    def point(x: float, y: float) -> str:
        return f"{_LEFT + (x - x0) / x_span * plot_w:.1f},{_TOP + (y1 - y) / y_span * plot_h:.1f}"

    for line in drawn:
        points = " ".join(point(x, y) for x, y in zip(line.series.xs, line.series.ys, strict=True))
        dash = ' stroke-dasharray="4 3"' if line.dashed else ""
        if len(line.series) == 1:
            cx, cy = points.split(",")
            parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{line.color}"/>')
        else:
            parts.append(f'<polyline fill="none" stroke="{line.color}" stroke-width="{line.width}" '
                         f'stroke-opacity="{line.opacity}"{dash} points="{points}"/>')
    parts += _axes(x0, x1, y0, y1, y_format, x_label, plot_w, plot_h)
    parts += _legend(drawn, width)
    parts.append("</svg>")
    return "".join(parts)


def _axes(x0: float, x1: float, y0: float, y1: float, y_format: Callable[[float], str], x_label: str,
          plot_w: int, plot_h: int) -> list[str]:
    bottom = _TOP + plot_h
    return [
        f'<text x="{_LEFT - 4}" y="{_TOP + 9}" text-anchor="end">{html.escape(y_format(y1))}</text>',
        f'<text x="{_LEFT - 4}" y="{bottom}" text-anchor="end">{html.escape(y_format(y0))}</text>',
        f'<text x="{_LEFT}" y="{bottom + 14}">{x0:.4g}</text>',
        f'<text x="{_LEFT + plot_w}" y="{bottom + 14}" text-anchor="end">{x1:.4g}</text>',
        f'<text x="{_LEFT + plot_w / 2}" y="{bottom + 14}" text-anchor="middle" fill="#666">'
        f'{html.escape(x_label)}</text>',
    ]


def _legend(lines: list[Line], width: int) -> list[str]:
    if len(lines) < 2:
        return []
    parts, x = [], float(_LEFT)
    for line in lines:
        parts.append(f'<rect x="{x:.0f}" y="18" width="10" height="3" fill="{line.color}"/>'
                     f'<text x="{x + 13:.0f}" y="23" font-size="9">{html.escape(line.label)}</text>')
        x += 18 + 5.5 * len(line.label)
        if x > width - 40:
            break
    return parts
