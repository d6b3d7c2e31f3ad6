"""What a warm worker puts back after a run, so that the next run behaves as on fresh workers.

A run can change the process it runs in: rebind a module's names (monkeypatching
`torch.nn.functional.gelu`, or a library's own global such as transformers' "ZeRO-3 is on"
reference), replace a class's method, set environment variables, change directory, change
torch's global settings, create process groups, start child processes. `ProcessState` records
the process once, warm and before any run, and `restore` puts it back after each run.
The user's code (whose monkeypatches are always undone, and whose added names go) is the
cell's, the notebook's and that of modules in the notebook's folder; anything else importable
from sys.path is a library's (`UserCode`).

What cannot be put back from Python (objects changed in place, C-level state) is why a user
has `--cold`; a run that leaves threads running retires its workers (see `leftover_threads`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import site
import sys
import sysconfig
import threading
import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

_MISSING = object()
# ids of the process groups of the last run, destroyed after it (see `_undo`).
_destroyed_groups: set[int] = set()


@dataclass
class ProcessState:
    """A record of the process-wide state that a run may change."""

    modules: dict[str, tuple[ModuleType, dict[str, Any]]] = field(default_factory=dict)
    classes: list[tuple[type, dict[str, Any]]] = field(default_factory=list)
    environ: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    path: list[str] = field(default_factory=list)
    warning_filters: list[Any] = field(default_factory=list)
    torch_settings: dict[str, Any] = field(default_factory=dict)
    process_groups: set[Any] = field(default_factory=set)
    threads: set[int] = field(default_factory=set)

    @classmethod
    def capture(cls) -> ProcessState:
        """Record the process as it is now (about 40 ms with torch, DeepSpeed and transformers)."""
        state = cls(environ=dict(os.environ), cwd=os.getcwd(), path=list(sys.path),
                    warning_filters=list(warnings.filters), torch_settings=_torch_settings(),
                    process_groups=_process_groups(), threads={t.ident or 0 for t in threading.enumerate()})
        with warnings.catch_warnings():  # reading a deprecated name warns (torch.distributed.reduce_op)
            warnings.simplefilter("ignore")
            for name, module in list(sys.modules.items()):
                names = getattr(module, "__dict__", None)
                if not isinstance(names, dict) or name == "__main__" or name.split(".")[0] == "nbtrain":
                    continue
                state.modules[name] = (module, dict(names))
                # Each class once: the one its defining module holds.
                state.classes += [(value, dict(vars(value))) for value in list(names.values())
                                  if isinstance(value, type) and getattr(value, "__module__", None) == name]
        # Leaving catch_warnings rebinds warnings.filters (its contents are restored on their own).
        state.modules["warnings"][1]["filters"] = warnings.filters
        return state

    def restore(self, notebook_dir: str | None = None) -> list[str]:
        """Put the recorded state back; return what a run had changed ("torch.nn.functional.relu", ...).

        Functions count as the user's when they come from the cell, the notebook or the
        notebook's folder (`notebook_dir`, by default the folder the process started in);
        anything importable from the recorded sys.path is library code.
        """
        users = UserCode(library_roots(self.path), os.path.join(os.path.abspath(notebook_dir or self.cwd), ""))
        changed: list[str] = []
        for name, (module, recorded) in self.modules.items():
            changed += [f"{name}.{key}" for key in _put_back(module.__dict__, recorded, users)]
        for cls, recorded in self.classes:
            changed += [f"{cls.__module__}.{cls.__qualname__}.{key}" for key in _put_back_class(cls, recorded, users)]
        if dict(os.environ) != self.environ:
            changed += [f"os.environ[{key!r}]" for key in sorted(set(os.environ) ^ set(self.environ)
                                                                  | {k for k in self.environ
                                                                     if os.environ.get(k) != self.environ[k]})]
            os.environ.clear()
            os.environ.update(self.environ)
        if os.getcwd() != self.cwd:
            changed.append("the working directory")
            os.chdir(self.cwd)
        sys.path[:] = self.path
        warnings.filters[:] = self.warning_filters  # type: ignore[index]  # a list at run time
        warnings._filters_mutated()  # type: ignore[attr-defined]  # drop the caches keyed on the old filters
        changed += _restore_torch_settings(self.torch_settings)
        return changed

    def destroy_new_process_groups(self) -> int:
        """Destroy the process groups a run created (ZeRO's data-parallel groups, hpZ's); return how many."""
        import torch.distributed as dist

        new = _process_groups() - self.process_groups
        for group in new:
            dist.destroy_process_group(group)
        # Whatever still refers to them (DeepSpeed's `groups` module) goes back to its recorded value.
        _destroyed_groups.clear()
        _destroyed_groups.update(id(group) for group in new)
        return len(new)

    def leftover_threads(self) -> list[str]:
        """Return the names of threads a run started and left running (they cannot be stopped from outside)."""
        return [t.name for t in threading.enumerate() if (t.ident or 0) not in self.threads and t.is_alive()]


def _changes(current: Mapping[str, Any], recorded: dict[str, Any], users: UserCode) -> tuple[list[str], list[str]]:
    """Return the names a run rebound that go back, and the names it added that go."""
    changed = [key for key, value in recorded.items()
               if current.get(key, _MISSING) is not value and _undo(value, current.get(key, _MISSING), users)]
    # Names a run added: only the user's own functions go. A library may add names as a
    # side effect of an import during the run, and that import will not run again.
    added = [key for key in current.keys() - recorded.keys() if users.wrote(current[key])]
    return changed, added


def _put_back(names: dict[str, Any], recorded: dict[str, Any], users: UserCode) -> list[str]:
    """Undo a run's changes to a module's names; return the names put back."""
    changed, added = _changes(names, recorded, users)
    for key in changed:
        names[key] = recorded[key]
    for key in added:
        del names[key]
    return changed + added


def _put_back_class(cls: type, recorded: dict[str, Any], users: UserCode) -> list[str]:
    """Undo a run's changes to a class's attributes; return the names put back."""
    changed, added = _changes(vars(cls), recorded, users)
    for key in changed:
        with contextlib.suppress(AttributeError, TypeError):  # read-only attributes of built-in types
            setattr(cls, key, recorded[key])
    for key in added:
        with contextlib.suppress(AttributeError, TypeError):
            delattr(cls, key)
    return changed + added


def _undo(old: Any, new: Any, users: UserCode) -> bool:
    """Decide whether a name rebound during a run goes back to `old`.

    The user's own code (a monkeypatch, wrapped or not) and library patches such as
    DeepSpeed's ZeRO-3 `torch.nn.functional.linear` are undone. Kept are the changes a
    library makes once and relies on afterwards: lazy initialisation (from None), a function
    wrapped in place (torch's compiler decorates lazily), a counter that grew (ids must not
    repeat), a flag set once, a registry that grew.
    """
    if new is _MISSING or users.wrote(new) or id(new) in _destroyed_groups:
        return True
    if old is None or getattr(new, "__wrapped__", None) is old:
        return False
    if type(old) is int and type(new) is int and new > old:
        return False
    if old is False and new is True:
        return False
    if isinstance(old, dict) and isinstance(new, dict) and old.keys() <= new.keys():
        return False
    if isinstance(old, (set, frozenset)) and isinstance(new, (set, frozenset)) and old <= new:
        return False
    return True


@dataclass(frozen=True)
class UserCode:
    """Tell the user's functions (the cell's, the notebook's, its folder's) from a library's."""

    library: tuple[str, ...]  # folders of importable code, each ending with a separator
    notebook: str  # the notebook's folder, ending with a separator

    def wrote(self, value: Any) -> bool:
        """Whether `value` is a function (or method) of the user's, not of a library."""
        if isinstance(value, (types.MethodType, staticmethod, classmethod)):
            value = value.__func__
        # Only a real function's __code__ is a code object: a class that merely has such an
        # attribute (types.FunctionType itself, stored in a module) has a descriptor there.
        if not isinstance(value, types.FunctionType):
            return False
        return not self.is_library(value.__code__.co_filename)

    def is_library(self, filename: str) -> bool:
        """Whether code from `filename` is a library's: the deepest folder holding it decides."""
        if filename.startswith("<frozen "):
            return True
        holders = [root for root in (*self.library, self.notebook) if filename.startswith(root)]
        # A virtual environment inside the notebook's folder is still a library.
        return bool(holders) and max(holders, key=len) != self.notebook


def library_roots(path: list[str]) -> tuple[str, ...]:
    """Return the folders of library code: `path` (sys.path, PYTHONPATH included), the interpreter's, the user site."""
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs.add(site.getusersitepackages())  # pip install --user, common on clusters
    dirs.update(entry for entry in path if entry and os.path.isabs(entry))
    dirs.add(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # nbtrain itself
    return tuple(os.path.join(os.path.normpath(d), "") for d in dirs)


def _torch_settings() -> dict[str, Any]:
    import torch

    return {"default_dtype": torch.get_default_dtype(), "num_threads": torch.get_num_threads(),
            "grad_enabled": torch.is_grad_enabled(), "deterministic": torch.are_deterministic_algorithms_enabled(),
            "anomaly": torch.is_anomaly_enabled(), "matmul_precision": torch.get_float32_matmul_precision()}


def _restore_torch_settings(recorded: dict[str, Any]) -> list[str]:
    import torch

    setters: dict[str, Callable[[Any], Any]] = {"default_dtype": torch.set_default_dtype, "num_threads": torch.set_num_threads,
               "grad_enabled": torch.set_grad_enabled, "deterministic": torch.use_deterministic_algorithms,
               "anomaly": torch.set_anomaly_enabled, "matmul_precision": torch.set_float32_matmul_precision}
    now = _torch_settings()
    changed = [key for key in recorded if now[key] != recorded[key]]
    for key in changed:
        setters[key](recorded[key])
    return [f"torch {key}" for key in changed]


def _process_groups() -> set[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return set()
    world = dist.distributed_c10d._world  # private, but the only list of a process's groups
    return {group for group in world.pg_map if group is not dist.group.WORLD}


def kill_children() -> list[int]:
    """End the child processes a run left behind (DataLoader workers, subprocesses); return their pids."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=5)
    return [child.pid for child in children]


def release_memory() -> None:
    """Give the memory of the finished run back: Python objects, cached device memory, freed heap pages."""
    gc.collect()
    import torch

    if torch.cuda.is_initialized():  # never create a CUDA context just to empty it
        torch.cuda.empty_cache()  # the caching allocator's free blocks go back to the driver
        torch.cuda.ipc_collect()  # and memory that was shared with other processes
    try:
        # glibc keeps freed heap pages mapped; an idle warm worker should not hold them.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
