"""The jupyter-server extension behind JupyterLab's BigTrain sidebar (enabled on install).

It reads run directories (docs/run-directory.md) and never imports torch or deepspeed, so
the BigTrain views keep working whatever happened to the kernel that started a run.
Settings, e.g. in jupyter_server_config.py: `c.BigTrain.run_roots = ["/data/runs"]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
from traitlets import Float, List, Unicode
from traitlets.config import LoggingConfigurable

from nbtrain.server.runs import ProgressCache, RunRoots
from nbtrain.server.tutorials import default_tutorial_dirs
from nbtrain.server.workers import WorkerSampler


class BigTrain(LoggingConfigurable):
    """The state and settings of the BigTrain API in one server."""

    run_roots = List(Unicode(), help="More folders holding run directories (relative ones are "
                     "taken from the server's root). The root's bigtrain-runs/ and the bigtrain-runs/ "
                     "next to each open notebook are always searched.").tag(config=True)
    tutorials_dir = Unicode("", help="Folder of the tutorial notebooks that 'Open tutorial…' offers "
                            "(default: the installed ones, else notebooks/ of a source checkout).").tag(config=True)
    stop_grace_s = Float(5.0, help="Seconds between SIGTERM and SIGKILL when a run is stopped.").tag(config=True)

    def __init__(self, serverapp: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.serverapp = serverapp
        self.workspace = Path(serverapp.root_dir).expanduser().absolute()
        self.progress = ProgressCache()
        self.sampler = WorkerSampler()
        self._roots = RunRoots()
        self._roots.add(self.workspace / "bigtrain-runs")
        for root in self.run_roots:
            self._roots.add(self.workspace / Path(root).expanduser())

    async def roots(self) -> RunRoots:
        """Return the run roots, with the bigtrain-runs/ of every notebook that has a session."""
        try:
            sessions = await self.serverapp.session_manager.list_sessions()
        except Exception:  # noqa: BLE001 - the listing of runs must not depend on the sessions service
            sessions = []
        for session in sessions:
            path = str(session.get("path") or "")
            folder = (self.workspace / path).parent
            if path and not path.startswith("/") and folder.resolve().is_relative_to(self.workspace.resolve()):
                self._roots.add(folder / "bigtrain-runs")  # kept once seen, also after the kernel is gone
        return self._roots

    def tutorials_folder(self) -> Path | None:
        """Return the folder of tutorial notebooks, or None where none is installed."""
        candidates = [Path(self.tutorials_dir)] if self.tutorials_dir else default_tutorial_dirs()
        return next((c for c in candidates if any(c.glob("*.ipynb"))), None)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "nbtrain.server"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Register the BigTrain API routes with the server."""
    from nbtrain.server.handlers import routes

    bigtrain = BigTrain(serverapp, parent=serverapp, config=serverapp.config)
    psutil.cpu_percent(None)  # start the CPU measurement, so that the first answer is not 0
    serverapp.web_app.settings["nbtrain"] = bigtrain
    serverapp.web_app.add_handlers(".*$", routes(serverapp.web_app.settings["base_url"]))
    serverapp.log.info("nbtrain: BigTrain API at %snbtrain/api, run roots %s", serverapp.base_url,
                       [str(r) for r in bigtrain._roots.roots])
