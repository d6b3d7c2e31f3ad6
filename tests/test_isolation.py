"""What a warm worker puts back after a run (nbtrain.worker.isolation), in this process."""

from __future__ import annotations

import functools
import json
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nbtrain.config.tree import DEFAULT_HANG_TIMEOUT_S
from nbtrain.launch.pool import LaunchShape
from nbtrain.worker.isolation import ProcessState, UserCode, library_roots


@pytest.fixture
def library() -> Iterator[types.ModuleType]:
    """A module that looks installed (its functions' code lives under site-packages)."""
    module = types.ModuleType("fake_library")
    source = "def helper():\n    return 'library'\ncounter = 1\nregistry = {'a': 1}\ncache = None\nflag = False\n"
    exec(compile(source, os.path.join(torch.__path__[0], "fake_library.py"), "exec"), module.__dict__)
    sys.modules["fake_library"] = module
    yield module
    del sys.modules["fake_library"]


def test_a_users_monkeypatch_of_a_function_or_a_method_is_undone(library: types.ModuleType) -> None:
    state = ProcessState.capture()
    original_helper, original_forward = library.helper, torch.nn.Tanh.forward
    library.helper = lambda: "patched"
    torch.nn.Tanh.forward = functools.wraps(original_forward)(lambda self, x: x * 0)  # wrapped, still the user's
    json.user_added = lambda: 1
    changed = state.restore()
    assert library.helper is original_helper and torch.nn.Tanh.forward is original_forward
    assert not hasattr(json, "user_added")
    assert {"fake_library.helper", "torch.nn.modules.activation.Tanh.forward", "json.user_added"} <= set(changed)


def test_what_a_library_sets_up_once_during_a_run_is_kept(library: types.ModuleType) -> None:
    state = ProcessState.capture()
    library.counter = 5                      # an id counter: ids must not repeat
    library.registry = {"a": 1, "b": 2}      # a registry that grew
    library.cache = object()                 # lazy initialisation
    library.flag = True                      # "done once"
    wrapped = functools.wraps(library.helper)(lambda: "decorated")  # decorated in place by the library
    wrapped.__code__ = library.helper.__code__
    library.helper = wrapped
    library.added_by_import = {"x": 1}       # a side effect of an import during the run
    assert state.restore() == []
    assert (library.counter, library.flag, library.helper) == (5, True, wrapped)
    assert library.added_by_import == {"x": 1}


def test_a_library_patch_that_replaces_a_function_is_undone() -> None:
    # DeepSpeed's ZeRO-3 leaves torch.nn.functional.linear replaced by its own wrapper.
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    state = ProcessState.capture()
    original = torch.nn.functional.linear
    torch.nn.functional.linear = zero3_linear_wrap
    assert state.restore() == ["torch.nn.functional.linear"]
    assert torch.nn.functional.linear is original


def test_environment_directory_path_and_torch_settings_come_back(tmp_path: Path) -> None:
    state = ProcessState.capture()
    cwd, path = os.getcwd(), list(sys.path)
    os.environ["NBTRAIN_ISOLATION_TEST"] = "1"
    os.chdir(tmp_path)
    sys.path.insert(0, str(tmp_path))
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(False)
    changed = state.restore()
    assert "NBTRAIN_ISOLATION_TEST" not in os.environ and os.getcwd() == cwd and sys.path == path
    assert torch.get_default_dtype() == torch.float32 and torch.is_grad_enabled()
    assert {"os.environ['NBTRAIN_ISOLATION_TEST']", "the working directory", "torch default_dtype",
            "torch grad_enabled"} <= set(changed)


def test_threads_a_run_leaves_running_are_named() -> None:
    import threading

    state = ProcessState.capture()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="users-prefetcher", daemon=True)
    thread.start()
    try:
        assert state.leftover_threads() == ["users-prefetcher"]
    finally:
        stop.set()
        thread.join()
    assert state.leftover_threads() == []


SHAPE = LaunchShape(nproc=2, hosts=("localhost",), backend="gloo", threads=1,
                    collective_timeout_s=2 * DEFAULT_HANG_TIMEOUT_S, python=sys.executable, environment="abc")


@pytest.mark.parametrize(("change", "says"), [
    ({"nproc": 4}, "--nproc changed from 2 to 4"),
    ({"backend": "nccl"}, "the backend changed from gloo to nccl"),
    ({"collective_timeout_s": 120.0}, "the collective timeout (from --hang-timeout) changed from 600.0 to 120.0"),
    ({"environment": "def"}, "the kernel's environment variables or sys.path changed since the workers started"),
])
def test_a_different_launch_shape_is_named(change: dict, says: str) -> None:
    import dataclasses

    assert SHAPE.difference(SHAPE) is None
    assert says in str(SHAPE.difference(dataclasses.replace(SHAPE, **change)))


def test_a_class_stored_in_a_module_is_not_mistaken_for_a_function() -> None:
    # Regression (issue 14): `json.FT = types.FunctionType` made restore read `co_filename` of
    # the class's `__code__` descriptor; the AttributeError killed the warm worker (exit 1).
    state = ProcessState.capture()
    json.FT = types.FunctionType  # type: ignore[attr-defined]
    json.MT = types.MethodType  # type: ignore[attr-defined]  # its __func__ is a descriptor too
    try:
        assert state.restore() == []
        assert json.FT is types.FunctionType, "a name that is not the user's function must be kept"
    finally:
        del json.FT, json.MT  # type: ignore[attr-defined]


def write_module(folder: Path, name: str) -> None:
    """A module that, when imported, adds a function to json and sets a hook of `plugins` (as libraries do)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(
        "import json, plugins\n"
        "def hook():\n    return 'hooked'\n"
        f"json.{name}_hook = hook\n"
        "plugins.slot = hook\n")


@pytest.fixture
def importable(tmp_path: Path) -> Iterator[Path]:
    """tmp_path/libs on sys.path (as PYTHONPATH puts it there), and a `plugins` module with an empty slot."""
    libs = tmp_path / "libs"
    sys.path.insert(0, str(libs))
    plugins = types.ModuleType("plugins")
    plugins.slot = None  # type: ignore[attr-defined]  # set up lazily, by whoever imports first
    sys.modules["plugins"] = plugins
    try:
        yield libs
    finally:
        sys.path.remove(str(libs))
        del sys.modules["plugins"]
        for name in [n for n in sys.modules if n.endswith("lib")]:
            if getattr(sys.modules[name], "__file__", "").startswith(str(tmp_path)):
                del sys.modules[name]
        for name in [n for n in vars(json) if n.endswith("_hook")]:
            delattr(json, name)


def test_a_library_found_through_pythonpath_is_library_code(importable: Path, tmp_path: Path) -> None:
    # Regression (issue 14): only sysconfig's folders counted as libraries, so what a module on
    # PYTHONPATH set up at import was deleted after the run, though its import would not run again.
    write_module(importable, "pathlib_lib")
    venv_site = tmp_path / "notebook" / ".venv" / "site-packages"  # a virtual environment in the notebook folder
    write_module(venv_site, "venv_lib")
    sys.path.insert(0, str(venv_site))
    try:
        state = ProcessState.capture()
        import pathlib_lib  # type: ignore[import-not-found]  # noqa: F401
        import venv_lib  # type: ignore[import-not-found]  # noqa: F401

        assert state.restore(notebook_dir=str(tmp_path / "notebook")) == []
        assert json.pathlib_lib_hook() == json.venv_lib_hook() == "hooked"  # type: ignore[attr-defined]
        assert sys.modules["plugins"].slot.__module__ == "venv_lib", "a library's set-up must be kept"
    finally:
        sys.path.remove(str(venv_site))


def test_a_module_of_the_notebooks_own_folder_is_user_code(importable: Path, tmp_path: Path) -> None:
    notebook = tmp_path / "notebook"
    write_module(notebook, "notebook_lib")
    sys.path.insert(0, str(notebook))  # the workers' PYTHONPATH starts with the kernel's directory
    try:
        state = ProcessState.capture()
        import notebook_lib  # type: ignore[import-not-found]  # noqa: F401

        changed = state.restore(notebook_dir=str(notebook))
        assert set(changed) == {"plugins.slot", "json.notebook_lib_hook"}
        assert sys.modules["plugins"].slot is None and not hasattr(json, "notebook_lib_hook")
    finally:
        sys.path.remove(str(notebook))


def test_the_user_site_is_library_code() -> None:
    import site

    users = UserCode(library_roots([]), "/nowhere/")
    assert users.is_library(os.path.join(site.getusersitepackages(), "pkg", "mod.py"))
    assert not users.is_library("<bigtrain cell>") and not users.is_library("/tmp/ipykernel_1/2.py")


def test_the_put_back_note_counts_the_names_it_leaves_out() -> None:
    # Regression: it showed 200 names and then said "and {n - 20} more".
    from nbtrain.worker.entry import put_back_note

    note = put_back_note([f"m.f{i}" for i in range(250)])
    assert note.endswith("m.f199 and 50 more") and "m.f200" not in note
    assert put_back_note(["m.f"]) == "nbtrain: put back after the run: m.f"
