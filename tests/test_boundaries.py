"""The boundaries the layout promises: pure config and run-directory code, a server that never touches worker code."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import nbtrain

PACKAGE = Path(nbtrain.__file__).parent
HEAVY = ("torch", "deepspeed", "IPython", "ipywidgets", "nbtrain.launch", "nbtrain.worker")

# Imports every module of config/ and rundir/ in a fresh interpreter and lists what got loaded.
PROBE = """
import importlib, json, pkgutil, sys
import nbtrain.config, nbtrain.rundir
for package in (nbtrain.config, nbtrain.rundir):
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
print(json.dumps(sorted(sys.modules)))
"""


def test_config_and_rundir_import_nothing_heavy_nor_the_kernel_or_worker_side() -> None:
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True).stdout
    loaded = json.loads(out)
    leaked = [name for name in loaded if name.split(".")[0] in HEAVY or name.startswith(HEAVY)]
    assert not leaked, f"importing nbtrain.config and nbtrain.rundir loaded {leaked}: the pure side grew a heavy import"


def _nbtrain_imports(path: Path) -> set[str]:
    """Return the nbtrain modules `path` imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nbtrain"):
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("nbtrain")}
    return found


def test_the_server_imports_no_worker_or_launch_code() -> None:
    crossing = {f"{path.name}: {name}" for path in (PACKAGE / "server").glob("*.py")
                for name in _nbtrain_imports(path) if name.startswith(("nbtrain.worker", "nbtrain.launch"))}
    assert not crossing, f"the server reaches into the kernel's or the workers' code: {sorted(crossing)}"


def test_the_relay_and_rundir_use_only_the_standard_library() -> None:
    # The relay runs on remote hosts before anything else is imported; rundir is read everywhere.
    allowed = {"nbtrain"}
    for package in ("relay", "rundir"):
        for path in (PACKAGE / package).glob("*.py"):
            tree = ast.parse(path.read_text())
            for node in tree.body:  # module level: what importing it pulls in
                names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                for name in names:
                    top = name.split(".")[0]
                    if top == "nbtrain":  # the relay writes run directories: it may use rundir's layout
                        assert name.startswith((f"nbtrain.{package}", "nbtrain.rundir")) or name in allowed, \
                            f"{package}/{path.name} imports {name}"
                    else:
                        assert top in sys.stdlib_module_names or top == "__future__", \
                            f"{package}/{path.name} imports {name}, which is not in the standard library"


def test_the_kernel_side_never_imports_worker_code() -> None:
    # worker/ runs in the worker processes only (nbtrain/worker/__init__.py says so): the kernel
    # starts it by name (`python -m nbtrain.worker`) and reads what it writes through rundir/.
    crossing = {f"{path.relative_to(PACKAGE)}: {name}" for path in PACKAGE.rglob("*.py")
                if "worker" not in path.relative_to(PACKAGE).parts[:1]
                for name in _nbtrain_imports(path) if name.startswith("nbtrain.worker")}
    assert not crossing, f"kernel-side modules import worker code: {sorted(crossing)}"
