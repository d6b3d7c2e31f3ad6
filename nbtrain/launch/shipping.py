"""Send the notebook names a cell needs to fresh worker processes, by value.

Functions and classes defined in the notebook live in `__main__` of the kernel, which a
worker cannot import; cloudpickle sends them by value, with the globals they use. Only the
names the cell mentions are sent (plus, through cloudpickle, what those refer to), so a
large unrelated variable never slows a launch.

The source of earlier cells is sent along (the kernel's linecache entries), so that a
worker's traceback through a notebook-defined function shows its lines.

In the kernel, the notebook's functions and the cells share one namespace. In a worker they
do too: the globals that cloudpickle rebuilds for the notebook's functions become the cell's
namespace, so that a function from an earlier cell sees `bigtrain` and every other name the
cell has, as it would in the kernel.
"""

from __future__ import annotations

import ast
import builtins
import io
import linecache
import pickle
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nbtrain.errors import ShippingError

# Names the worker binds itself, or that belong to IPython's bookkeeping.
_RESERVED = {"bigtrain", "In", "Out", "get_ipython", "exit", "quit", "_", "__", "___"}


@dataclass
class Inputs:
    """What the workers receive: the names and the notebook's cell sources."""

    names: dict[str, Any]
    modules: dict[str, str] = field(default_factory=dict)  # alias -> module name, imported in the worker
    sources: dict[str, list[str]] = field(default_factory=dict)  # filename -> lines, for tracebacks
    # The globals of the notebook's functions once unpickled: the cell's namespace in a worker.
    namespace: dict[str, Any] = field(default_factory=dict)


def names_used(cell: str) -> set[str]:
    """Return the free names a cell reads (names it assigns before reading them are not needed).

    >>> sorted(names_used("model = make_model()\nfit(model, data)"))
    ['data', 'fit', 'make_model']
    """
    loaded: set[str] = set()
    bound: set[str] = set()
    for statement in ast.parse(cell).body:
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in bound:
                loaded.add(node.id)
            elif isinstance(node, (ast.Global, ast.Nonlocal)):
                loaded.update(node.names)
        # Only top-level statements that always bind count: a name bound in an `if`, a
        # loop or a `try` may still be read from the notebook.
        bound |= _always_bound(statement)
    return loaded


def _always_bound(statement: ast.stmt) -> set[str]:
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {statement.name}
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in statement.names}
    targets: list[ast.expr] = []
    if isinstance(statement, ast.Assign):
        targets = statement.targets
    elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
        targets = [statement.target]
    return {node.id for target in targets for node in ast.walk(target)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}


def collect(cell: str, namespace: Mapping[str, Any], extra: Iterable[str] = ()) -> Inputs:
    """Pick the names `cell` uses from the notebook's namespace."""
    wanted = (names_used(cell) | set(extra)) - _RESERVED
    inputs = Inputs(names={})
    for name in sorted(wanted):
        if name not in namespace or (hasattr(builtins, name) and namespace[name] is getattr(builtins, name)):
            continue
        value = namespace[name]
        if isinstance(value, types.ModuleType):
            inputs.modules[name] = value.__name__
        else:
            inputs.names[name] = value
    inputs.sources = _notebook_sources()
    return inputs


def _notebook_sources() -> dict[str, list[str]]:
    # IPython registers each executed cell in linecache under a name like
    # /tmp/ipykernel_123/456.py (or <ipython-input-1-...>).
    found = {}
    for filename, entry in list(linecache.cache.items()):
        if is_notebook_source(filename) and len(entry) >= 3:
            found[filename] = list(entry[2])
    return found


def is_notebook_source(filename: str) -> bool:
    """Whether `filename` names a notebook cell's code (how IPython registers it in linecache)."""
    return "ipykernel_" in filename or filename.startswith("<ipython-input")


def dumps(inputs: Inputs) -> bytes:
    """Serialise `inputs`; a name that cannot be sent raises ShippingError naming it."""
    try:
        return _by_value(inputs, notebook_globals=inputs.namespace)
    except Exception as whole:  # find which name broke it, then say so
        for name, value in inputs.names.items():
            try:
                _by_value(value)
            except Exception as e:  # any pickling failure is the user's to see
                raise ShippingError(
                    f"the cell uses {name!r} ({type(value).__name__}), which cannot be sent to the worker "
                    f"processes: {type(e).__name__}: {e}. Fix: create {name!r} inside the %%bigtrain cell "
                    "(or in a function the cell calls) instead of in an earlier cell."
                ) from e
        raise ShippingError(f"the cell's inputs cannot be sent to the workers: {whole}") from whole


def _by_value(value: Any, notebook_globals: dict[str, Any] | None = None) -> bytes:
    """Return cloudpickle's bytes of `value`, code objects keeping their file names.

    With `notebook_globals` (a dict pickled within `value`), the notebook's functions (those
    of `__main__`) get that dict as their globals once unpickled.
    """
    import cloudpickle

    class KeepFilenames(cloudpickle.Pickler):
        # cloudpickle writes every function's file name as '<dynamic-code>', which would
        # leave a worker's traceback through a notebook function without its lines.
        def __init__(self, file: io.BytesIO):
            super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
            self.copies: dict[int, types.CodeType] = {}  # held, so that their ids stay unique

        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, types.CodeType) and id(obj) not in self.copies:
                copy = obj.replace()
                self.copies[id(copy)] = copy
                return _with_filename, (copy, obj.co_filename)
            if notebook_globals is not None and isinstance(obj, types.FunctionType) \
                    and obj.__globals__.get("__name__") == "__main__":
                # cloudpickle gives the functions that shared one globals dict one new dict
                # (`globals_ref`, keyed by the old dict's id): make it ours.
                self.globals_ref.setdefault(id(obj.__globals__), notebook_globals)
            return super().reducer_override(obj)

    buffer = io.BytesIO()
    KeepFilenames(buffer).dump(value)
    return buffer.getvalue()


def _with_filename(code: types.CodeType, filename: str) -> types.CodeType:
    return code.replace(co_filename=filename)


def install(inputs: Inputs) -> dict[str, Any]:
    """In a worker: register the notebook's sources and return the cell's namespace.

    It is the namespace of the notebook's functions too: a name bound in it (`bigtrain`, the
    cell's own variables) is seen by them, as in the kernel.
    """
    import importlib

    for filename, lines in inputs.sources.items():
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
    namespace = inputs.namespace
    namespace.update({"__name__": "__main__", "__builtins__": builtins})
    for alias, module in inputs.modules.items():
        namespace[alias] = importlib.import_module(module)
    namespace.update(inputs.names)
    return namespace
