"""The live training dashboard of a `%%bigtrain` cell (ipywidgets), and its pure parts.

`Dashboard` (in `widget.py`, imported on first use so that the pure modules stay
importable without ipywidgets) is the `ProgressSink` the magic uses unless `--no-plot`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Dashboard"]


def __getattr__(name: str) -> Any:
    if name == "Dashboard":
        from nbtrain.dashboard.widget import Dashboard

        return Dashboard
    raise AttributeError(name)
