"""The wheel carries everything: built from the sources, installed in a fresh environment, used there.

Outside the repository (a temporary folder): the tracked and new files are copied as a fresh
clone would have them, `pip wheel` builds ONE wheel (npm builds the lab extension), a new
virtual environment gets torch's CPU wheel first (as .ci/setup-env does) and then the wheel
with its dependencies from the configured registry. That environment's own `jupyter` must
list the lab and server extensions as OK, its server must list the tutorials, and a
`%%bigtrain` cell must train in one of its kernels. Each step's seconds are printed
(`make test-package` shows them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import NOTEBOOK_SETUP, wait_until_gone
from tests.ui.lab import free_port, notebook

pytestmark = pytest.mark.package

REPO = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the CPU wheel on this disk, as .ci/setup-env installs it
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Env:
    """A fresh virtual environment in `root`, and the commands run in it (timed)."""

    def __init__(self, root: Path):
        self.root, self.venv = root, root / "venv"
        self.timings: dict[str, float] = {}
        self.wheel = root / "dist" / "nbtrain-0.1.0-py3-none-any.whl"
        # Its own Jupyter folders, its own op cache: nothing of this machine's other environments.
        self.env = {key: value for key, value in os.environ.items()
                    if key not in ("PYTHONPATH", "VIRTUAL_ENV", "JUPYTER_PATH", "JUPYTER_CONFIG_PATH")}
        self.env.update(VIRTUAL_ENV=str(self.venv), PATH=f"{self.venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
                        JUPYTER_CONFIG_DIR=str(root / "jupyter-config"), JUPYTER_DATA_DIR=str(root / "jupyter-data"),
                        JUPYTER_RUNTIME_DIR=str(root / "jupyter-runtime"), PIP_DISABLE_PIP_VERSION_CHECK="1")

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(self, step: str, *args: str, cwd: Path | None = None, timeout: float = 1200) -> str:
        """Run a command in the environment; return its output (stdout and stderr), ANSI colours removed."""
        begun = time.monotonic()
        done = subprocess.run(args, cwd=cwd or self.root, env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        self.timings[step] = time.monotonic() - begun
        print(f"PACKAGE {step}: {self.timings[step]:.0f} s")
        output = ANSI.sub("", done.stdout)
        assert done.returncode == 0, f"{step} failed ({' '.join(args)}, exit {done.returncode}):\n{output[-4000:]}"
        return output


def copy_sources(target: Path) -> None:
    """Copy what a fresh clone has (tracked and new, not ignored files), as they are in the work tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, stdout=subprocess.PIPE).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # a deleted, not yet committed file is still listed
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    env = Env(tmp_path_factory.mktemp("package"))
    assert REPO not in env.root.parents, "the environment must live outside the repository"
    sources, dist = env.root / "src", env.root / "dist"
    copy_sources(sources)
    env.run("venv", sys.executable, "-m", "venv", str(env.venv))
    env.run("install torch", env.bin("python"), "-m", "pip", "install", "-q", TORCH)
    env.run("build the wheel", env.bin("python"), "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(sources))
    wheels = list(dist.glob("*.whl"))
    assert wheels == [env.wheel], f"expected one wheel, got {wheels}"
    env.run("install the wheel", env.bin("python"), "-m", "pip", "install", "-q", str(env.wheel))
    yield env
    print("PACKAGE total: " + ", ".join(f"{step} {s:.0f} s" for step, s in env.timings.items())
          + f"; {sum(env.timings.values()):.0f} s in all")


def test_the_wheel_holds_the_extensions_and_the_tutorials_without_their_outputs(installed: Env) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    data = "nbtrain-0.1.0.data/data/"
    for needed in ("nbtrain/magic.py", "nbtrain/dashboard/widget.py", "nbtrain/panel/config_panel.py",
                   "nbtrain/config/_deepspeed_schema.json", f"{data}share/jupyter/labextensions/nbtrain/package.json",
                   # the extension's settings (poll intervals): JupyterLab finds them only here
                   f"{data}share/jupyter/labextensions/nbtrain/schemas/nbtrain/plugin.json",
                   f"{data}etc/jupyter/jupyter_server_config.d/nbtrain.json",
                   f"{data}share/nbtrain/notebooks/data/owl_and_pussycat.txt"):
        assert needed in names, f"the wheel lacks {needed}"
    assert any(n.startswith(f"{data}share/jupyter/labextensions/nbtrain/static/remoteEntry.") for n in names)
    shipped = sorted(n.removeprefix(f"{data}share/nbtrain/notebooks/") for n in names
                     if n.startswith(f"{data}share/nbtrain/notebooks/") and "/" not in n.removeprefix(
                         f"{data}share/nbtrain/notebooks/"))
    assert shipped == sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb")), (
        f"the wheel's tutorials {shipped} are not notebooks/*.ipynb: update pyproject's shared-data")
    assert not [n for n in names if "bigtrain-runs" in n or n.endswith("hosts.txt")], "the wheel carries run outputs"


def test_the_environment_runs_the_installed_nbtrain_not_the_checkout(installed: Env) -> None:
    where = installed.run("import", installed.bin("python"), "-c", "import nbtrain; print(nbtrain.__file__)").strip()
    assert Path(where).is_relative_to(installed.venv), f"nbtrain imported from {where}, not from the new environment"


def test_jupyter_lists_the_lab_and_server_extensions_as_ok(installed: Env) -> None:
    labs = installed.run("labextension list", installed.bin("jupyter"), "labextension", "list")
    share = installed.venv / "share" / "jupyter" / "labextensions"
    assert str(share) in labs and re.search(r"^\s+nbtrain v[\d.]+ enabled OK", labs, re.M), labs
    servers = installed.run("server extension list", installed.bin("jupyter"), "server", "extension", "list")
    assert re.search(r"nbtrain\.server enabled", servers), servers
    assert re.search(r"nbtrain\.server .*OK", servers), servers
    auto = installed.venv / "etc" / "jupyter" / "jupyter_server_config.d" / "nbtrain.json"
    assert json.loads(auto.read_text())["ServerApp"]["jpserver_extensions"]["nbtrain.server"] is True


def api(url: str, method: str = "GET") -> dict:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def test_its_server_lists_the_five_tutorials_and_copies_one_with_its_data(installed: Env) -> None:
    workspace, port, token = installed.root / "server-root", free_port(), "package-test-token"
    workspace.mkdir()
    log = (installed.root / "server.log").open("wb")
    server = subprocess.Popen([installed.bin("jupyter"), "server", "--no-browser", "--ServerApp.ip=127.0.0.1",
                               f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
                               f"--IdentityProvider.token={token}", "--ServerApp.allow_root=True",
                               f"--ServerApp.root_dir={workspace}"],
                              cwd=workspace, env=installed.env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/nbtrain/api/tutorials"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                listed = api(f"{url}?token={token}")["tutorials"]
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, (
                    f"the server did not answer:\n{(installed.root / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        expected = sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))
        assert len(expected) == 5 and [t["name"] for t in listed] == expected, listed
        assert all(t["title"] != Path(t["name"]).stem for t in listed), f"a tutorial without its title: {listed}"
        copied = api(f"{url}/01_quickstart.ipynb?token={token}", method="POST")
        assert (workspace / copied["path"]).is_file(), copied
        assert (workspace / "data" / "owl_and_pussycat.txt").is_file(), "the tutorial's data was not copied"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_a_bigtrain_cell_trains_in_a_kernel_of_that_environment(installed: Env) -> None:
    work = installed.root / "kernel-work"
    work.mkdir()
    (work / "run.ipynb").write_text(notebook(
        "%load_ext nbtrain", NOTEBOOK_SETUP,
        # SGD: the first run JIT-builds only the comm op (~20 s) into this environment, not also Adam's (~30 s).
        "%%bigtrain --nproc 2 --steps 3 --optimizer sgd --name package\n"
        "result = bigtrain.fit(make_model(), ToyData(), loss_fn=loss_fn)",
        "import nbtrain\nprint('nbtrain from', nbtrain.__file__)"))
    try:
        installed.run("first %%bigtrain run", installed.bin("jupyter"), "nbconvert", "--to", "notebook", "--execute",
                      "--ExecutePreprocessor.timeout=900", "--output", "ran.ipynb", "run.ipynb", cwd=work)
    finally:
        wait_until_gone(str(work), timeout=60)
    cells = json.loads((work / "ran.ipynb").read_text())["cells"]
    text = ["".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                    for o in c.get("outputs", [])) for c in cells]
    assert re.search(r"RunResult \S+-package-\S+: succeeded", text[2]), text[2][-3000:]
    assert str(installed.venv) in text[3], text[3]
    status = json.loads(next((work / "bigtrain-runs").glob("*-package-*/status.json")).read_text())
    assert status["state"] == "succeeded", status
    built = sorted(p.parent.name for p in (installed.venv / "var" / "torch_extensions").glob("*/*.so"))
    assert built == ["deepspeed_shm_comm"], f"ops built in the new environment's own cache: {built}"
