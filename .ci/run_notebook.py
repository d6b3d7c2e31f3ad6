#!/usr/bin/env python
"""Execute a notebook headlessly in a real kernel, streaming its outputs to the terminal.

    .ci/run_notebook.py notebooks/01_quickstart.ipynb                # run, show, exit 1 on a failing cell
    .ci/run_notebook.py --save notebooks/01_quickstart.ipynb         # ...and write the outputs back in place
    .ci/run_notebook.py --html build/demo/01.html notebooks/01_quickstart.ipynb   # ...and an HTML copy

The kernel starts in the notebook's folder, as it would in JupyterLab. Each cell's prints,
displays and result are printed as they arrive; a display that is updated in place (the
`%%bigtrain` progress line) is redrawn on one terminal line. `--save` is how the saved
outputs that nbval compares are refreshed (`make notebooks`).
"""

from __future__ import annotations

import argparse
import html
import re
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

CELL_TIMEOUT_S = 900
# A redirected terminal (CI log) gets a progress update at most this often.
LOG_UPDATE_EVERY_S = 5.0


WIDGET = "application/vnd.jupyter.widget-view+json"
PROGRESS = re.compile(r"step \d+")
FINAL_STEP = re.compile(r"step (\d+)/\1\b")


def _text_of(content: dict[str, Any]) -> str:
    """Return what a terminal can show of a display: its plain text, or a note on its kind."""
    data = content.get("data", {})
    if WIDGET in data:
        return "<live widget: see it in JupyterLab; progress follows below>"
    if "text/plain" in data:
        return str(data["text/plain"])
    kinds = ", ".join(sorted(data)) or "nothing"
    return f"<display: {kinds}>"


class StreamingClient(NotebookClient):
    """A NotebookClient that echoes every output to the terminal as the kernel sends it."""

    def __init__(self, nb: Any, out: Any = sys.stdout, **kw: Any):
        super().__init__(nb, **kw)
        self._out = out
        self._tty = bool(getattr(out, "isatty", lambda: False)())
        self._live_line = False
        self._last_update = 0.0
        self._last_line = ""

    def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
        self._echo(msg)
        return super().process_message(msg, cell, cell_index)

    def _echo(self, msg: dict[str, Any]) -> None:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "update_display_data" and "image/png" not in content.get("data", {}):
            self._update(_text_of(content))
            return
        if kind == "comm_msg":
            self._widget_update(content.get("data", {}))
            return
        if kind == "stream":
            text = content["text"]
        elif kind in ("display_data", "execute_result", "update_display_data"):
            text = _text_of(content) + "\n"
        elif kind == "error":
            text = "\n".join(content["traceback"]) + "\n"
        else:
            return
        self._end_live_line()
        self._out.write(text)
        self._out.flush()

    def _widget_update(self, data: dict[str, Any]) -> None:
        """Echo a widget's new text when it is a progress line (the live dashboard's)."""
        value = data.get("state", {}).get("value") if data.get("method") == "update" else None
        if isinstance(value, str):
            text = html.unescape(re.sub(r"<[^>]+>", "", value)).strip()
            if PROGRESS.match(text):
                self._update(text)

    def _update(self, text: str) -> None:
        line = text.splitlines()[0] if text else ""
        if self._tty:
            self._out.write("\r\033[K" + line)
            self._live_line = True
        elif line != self._last_line and (time.monotonic() - self._last_update >= LOG_UPDATE_EVERY_S
                                          or FINAL_STEP.search(line)):
            self._last_update, self._last_line = time.monotonic(), line
            self._out.write(line + "\n")
        self._out.flush()

    def _end_live_line(self) -> None:
        if self._live_line:
            self._out.write("\n")
            self._live_line = False


def static_view_problems(nb: Any) -> list[str]:
    """Return why a run's dashboard did not leave its static picture and summary, one line per cell.

    nbval never sees display updates, so it cannot check what the saved notebook shows after a
    run: the final-curves PNG (where widgets do not render) and the summary table below it.
    """
    problems = []
    for number, cell in enumerate((c for c in nb.cells if c.cell_type == "code"), start=1):
        shown = [o.get("data", {}) for o in cell.get("outputs", []) if "data" in o]
        texts = [str(d.get("text/plain", "")) for d in shown]
        if any(WIDGET in d and t.startswith("VBox(") for d, t in zip(shown, texts, strict=True)):
            problems.append(f"cell {number}: a run's live dashboard never turned into its final picture")
        pictures = [d for d, t in zip(shown, texts, strict=True) if t.startswith("<final curves of ")]
        if any("image/png" not in d for d in pictures):
            problems.append(f"cell {number}: a run's final curves have no PNG")
        if pictures and not any(t.startswith("bigtrain run ") for t in texts):
            problems.append(f"cell {number}: a run left no summary table")
    return problems


def run(path: Path, save: bool, html: Path | None) -> int:
    """Execute the notebook at `path`; return the process exit code."""
    nb = nbformat.read(path, as_version=4)
    # No widget state in the saved file: the config panel alone is ~700 KB of it, and every
    # widget output also carries a text/plain form (the panel's summary, the run's PNG).
    client = StreamingClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False,
                             store_widget_state=False,
                             resources={"metadata": {"path": str(path.parent.resolve())}})
    started = time.monotonic()
    code_cells = [c for c in nb.cells if c.cell_type == "code"]

    def announce(cell: Any, cell_index: int, **_: Any) -> None:
        if cell.cell_type == "code":
            number = code_cells.index(cell) + 1
            print(f"\n\033[1m── {path.name} cell {number}/{len(code_cells)} "
                  f"({time.monotonic() - started:.0f} s)\033[0m", flush=True)

    client.on_cell_start = announce
    failed = None
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
        failed = e
    client._end_live_line()
    elapsed = time.monotonic() - started
    if failed is not None:
        print(f"\n{path}: a cell failed after {elapsed:.0f} s; nothing was saved.\n{str(failed)[-2000:]}",
              file=sys.stderr)
        return 1
    problems = static_view_problems(nb)
    if problems:
        print(f"\n{path}: the outputs are incomplete; nothing was saved.\n" + "\n".join(problems), file=sys.stderr)
        return 1
    if save:
        nbformat.write(nb, path)
        print(f"\n{path}: saved with fresh outputs", flush=True)
    if html is not None:
        write_html(nb, html)
        print(f"{path}: HTML copy with its plots at {html.resolve()}", flush=True)
    print(f"{path}: every cell ran in {elapsed:.0f} s", flush=True)
    return 0


def write_html(nb: Any, html: Path) -> None:
    """Write the executed notebook as a self-contained HTML page (plots embedded)."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nb)
    html.parent.mkdir(parents=True, exist_ok=True)
    html.write_text(body, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--save", action="store_true", help="write the executed notebook back in place")
    parser.add_argument("--html", type=Path, help="also write an HTML copy of the executed notebook here")
    args = parser.parse_args(argv)
    if not args.notebook.is_file():
        parser.error(f"no notebook at {args.notebook}")
    return run(args.notebook, args.save, args.html)


if __name__ == "__main__":
    sys.exit(main())
