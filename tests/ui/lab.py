"""A real `jupyter lab` or `jupyter notebook` for browser tests: free port, token, its own root and settings."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# Debian's Chromium, quiet on a closed network (see DEEPSPEED_ON_CPU.md).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class JupyterServer:
    """A Jupyter front end (`jupyter lab` or `jupyter notebook`) serving `root`, with news and update
    checks off and the app exposed to tests as `window.jupyterapp`."""

    command = "lab"
    app_class = "LabApp"
    app_args: tuple[str, ...] = ("--LabApp.news_url=",)  # Notebook 7 has no news feed to turn off

    def __init__(self, root: Path, home: Path, **bigtrain: object):
        self.root, self.port, self.token = root, free_port(), secrets.token_hex(16)
        settings = home / "settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True)
        # No "get notified about Jupyter news?" toast over the page, no fetching from outside.
        (settings / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        # Start a notebook's own kernel without asking, even when the kernel specs load late, and
        # keep every cell in the page (no windowing), so that what a test reads is what is there.
        notebooks = home / "settings" / "@jupyterlab" / "notebook-extension"
        notebooks.mkdir(parents=True)
        (notebooks / "tracker.jupyterlab-settings").write_text(
            json.dumps({"autoStartDefaultKernel": True, "windowingMode": "none"}))
        self.log = home / f"jupyter-{self.command}.log"
        app = self.app_class
        args = [sys.executable, "-m", "jupyter", self.command, "--no-browser", "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
                "--ServerApp.allow_root=True", f"--ServerApp.root_dir={root}",
                f"--{app}.user_settings_dir={home / 'settings'}", f"--{app}.workspaces_dir={home / 'workspaces'}",
                f"--{app}.expose_app_in_browser=True", *self.app_args,
                *[f"--BigTrain.{key}={value}" for key, value in bigtrain.items()]]
        env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(args, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self._wait_ready()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter {self.command} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"jupyter {self.command} did not answer in {timeout} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Shut the server down (it shuts its kernels down), killing it if it hangs."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


class JupyterLab(JupyterServer):
    """`jupyter lab` (JupyterLab 4)."""


class JupyterNotebook(JupyterServer):
    """`jupyter notebook` (Notebook 7): the same settings, its own app class and pages (/tree, /notebooks/…)."""

    command = "notebook"
    app_class = "JupyterNotebookApp"
    app_args: tuple[str, ...] = ()


def notebook(*sources: str) -> str:
    """Return an .ipynb (JSON text) with one code cell per source, for the lab to open."""
    cells = [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [], "source": s}
             for s in sources]
    return json.dumps({"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                   "language": "python"}},
                       "nbformat": 4, "nbformat_minor": 5})
