"""The config panel: an ipywidgets form that edits a `%%bigtrain` run's settings.

Imports ipywidgets; reach it as `nbtrain.ConfigPanel`, which loads it on first use.
"""

from __future__ import annotations

from nbtrain.panel.config_panel import ConfigPanel

__all__ = ["ConfigPanel"]
