"""One ipywidgets input per panel field, read and written as plain values."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from nbtrain.panel.fields import Field

_BIG = 2**62  # bounded widgets need a maximum; nothing real comes near it
LABEL_WIDTH = "12em"


class FieldInput:
    """The input widget of one field, its label and its inline message, as one row."""

    def __init__(self, field: Field):
        self.field = field
        self.parts = _make(field)
        self.message = w.HTML(layout=w.Layout(margin="0 0 0 0.5em"))
        label = w.HTML(f"<span title='{html.escape(field.help)}'>{html.escape(field.label)}</span>",
                       layout=w.Layout(width=LABEL_WIDTH, min_width="8em"))
        # Wrapping rows keep the panel readable in a narrow notebook column.
        self.row = w.HBox([label, *self.parts, self.message],
                          layout=w.Layout(flex_flow="row wrap", align_items="center"))

    @property
    def value(self) -> Any:
        kind = self.field.kind
        if kind == "pair":
            return [float(p.value) for p in self.parts]
        if kind == "optional_int":
            text = str(self.parts[0].value).strip()
            if not text:
                return None
            try:
                return int(text)
            except ValueError:
                return text  # DeepSpeed's scheduler then refuses it, and the panel says so
        return self.parts[0].value

    @value.setter
    def value(self, value: Any) -> None:
        kind = self.field.kind
        if value is None and kind != "optional_int":
            return  # nothing derived yet (e.g. a scheduler not chosen): keep what is shown
        if kind == "pair":
            for part, item in zip(self.parts, value, strict=True):
                part.value = float(item)
        elif kind == "optional_int":
            self.parts[0].value = "" if value is None else str(value)
        elif kind == "float":
            self.parts[0].value = float(value)
        else:
            self.parts[0].value = value

    def observe(self, callback: Callable[[Any], None]) -> None:
        for part in self.parts:
            part.observe(callback, names="value")

    def set_options(self, options: tuple[Any, ...]) -> None:
        """Offer only `options` (a choice field); disabled when there is nothing to choose."""
        widget = self.parts[0]
        if tuple(widget.options) != tuple(options):
            current = widget.value
            widget.options = list(options)
            widget.value = current if current in options else options[0]
        widget.disabled = len(options) < 2

    def set_disabled(self, disabled: bool) -> None:
        for part in self.parts:
            part.disabled = disabled

    def show(self, visible: bool) -> None:
        self.row.layout.display = None if visible else "none"


def _make(field: Field) -> list[w.Widget]:
    lowest = field.minimum if field.minimum is not None else -_BIG
    width = w.Layout(width="11em")
    if field.kind == "int":
        return [w.BoundedIntText(min=int(lowest), max=_BIG, layout=width)]
    if field.kind == "float":
        return [w.BoundedFloatText(min=float(lowest), max=1e30, layout=width)]
    if field.kind == "bool":
        return [w.Checkbox(indent=False, layout=w.Layout(width="auto"))]
    if field.kind == "text":
        return [w.Text(placeholder="/local/nvme/dir", layout=w.Layout(width="16em"))]
    if field.kind == "optional_int":
        return [w.Text(placeholder="same as the first", layout=width)]
    if field.kind == "pair":
        return [w.BoundedFloatText(min=0.0, max=1.0, layout=w.Layout(width="6em")) for _ in range(2)]
    if field.name == "zero":
        return [w.ToggleButtons(options=list(field.choices), style={"button_width": "3em"})]
    return [w.Dropdown(options=list(field.choices), layout=width)]
