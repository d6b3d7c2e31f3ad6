"""Sending the notebook names a cell uses to fresh worker processes, by value."""

from __future__ import annotations

import linecache
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from nbtrain.errors import ShippingError
from nbtrain.launch.shipping import collect, dumps, names_used

REPO = Path(__file__).resolve().parents[1]
# How the kernel names a cell's code: tracebacks in the worker point at these lines.
CELL_FILE = "/tmp/ipykernel_4711/2093118412.py"
EARLIER_CELL = textwrap.dedent('''
    import math as m

    SCALE = 3

    class Doubler:
        def __init__(self, k):
            self.k = k
        def __call__(self, x):
            return 2 * self.k * x

    def make_model():
        return Doubler(SCALE)

    def broken():
        return 1 / 0  # the line a traceback must show
''')


def notebook_namespace() -> dict[str, Any]:
    """Run EARLIER_CELL the way a kernel does: in `__main__`, registered in linecache."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    lines = EARLIER_CELL.splitlines(keepends=True)
    linecache.cache[CELL_FILE] = (len(EARLIER_CELL), None, lines, CELL_FILE)
    exec(compile(EARLIER_CELL, CELL_FILE, "exec"), namespace)
    return namespace


def run_in_fresh_process(payload: bytes, code: str, tmp_path: Path) -> str:
    """Load `payload` with nbtrain.launch.shipping.install in a new Python and run `code` there."""
    (tmp_path / "inputs.pkl").write_bytes(payload)
    child = textwrap.dedent('''
        import pickle, sys
        from nbtrain.launch import shipping
        ns = shipping.install(pickle.loads(open(sys.argv[1], "rb").read()))
        import __main__
        assert not hasattr(__main__, "Doubler"), "the child's __main__ must not know the notebook"
    ''') + textwrap.dedent(code)
    done = subprocess.run([sys.executable, "-c", child, str(tmp_path / "inputs.pkl")], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_names_used_finds_the_free_names() -> None:
    cell = textwrap.dedent('''
        model = make_model()
        engine, loader = bigtrain.prepare(model, data)
        for batch in loader:
            loss = loss_fn(engine, batch)
        total = total + 1
        if rare:
            extra = 1
        print(extra, math.pi)
    ''')
    # `batch` and `extra` are bound only inside a loop or an `if`: the notebook's value may be read.
    assert names_used(cell) == {"make_model", "bigtrain", "data", "loss_fn", "total", "rare", "extra",
                                "batch", "print", "math"}


def test_a_name_assigned_before_use_is_not_taken_from_the_notebook() -> None:
    # A stale `model` in the kernel (maybe large, maybe unpicklable) must not be shipped.
    namespace = {"model": threading.Lock(), "make_model": len}
    inputs = collect("model = make_model([])\nprint(model)", namespace)
    assert inputs.names == {"make_model": len}


def test_collect_takes_only_what_the_cell_uses_and_modules_by_name() -> None:
    namespace = notebook_namespace()
    namespace["unrelated"] = bytearray(10**6)
    inputs = collect("y = make_model()(m.pi)\nbigtrain.log(y=y)", namespace)
    assert sorted(inputs.names) == ["make_model"]
    assert inputs.modules == {"m": "math"}
    assert CELL_FILE in inputs.sources


def test_notebook_functions_and_classes_travel_by_value(tmp_path: Path) -> None:
    namespace = notebook_namespace()
    inputs = collect("model = make_model()\nd = Doubler(1)", namespace)
    out = run_in_fresh_process(dumps(inputs), '''
        model = ns["make_model"]()
        print(type(model).__name__, model(5), ns["Doubler"](1)(1))
    ''', tmp_path)
    assert out.split() == ["Doubler", "30", "2"]


def test_worker_tracebacks_show_the_notebook_lines(tmp_path: Path) -> None:
    inputs = collect("broken()", notebook_namespace())
    out = run_in_fresh_process(dumps(inputs), '''
        import traceback
        try:
            ns["broken"]()
        except ZeroDivisionError:
            print(traceback.format_exc())
    ''', tmp_path)
    assert CELL_FILE in out and "return 1 / 0  # the line a traceback must show" in out, out


@pytest.mark.parametrize("make_value", [threading.Lock, lambda: (i for i in range(3))],
                         ids=["lock", "generator"])
def test_an_unpicklable_value_is_named(make_value: Any) -> None:
    namespace = {"fine": 1, "handle": make_value()}
    with pytest.raises(ShippingError) as err:
        dumps(collect("print(fine, handle)", namespace))
    message = str(err.value)
    assert "'handle'" in message and type(namespace["handle"]).__name__ in message, message
    assert "create 'handle' inside the %%bigtrain cell" in message


def test_a_notebook_function_sees_the_names_the_worker_binds_in_the_cell(tmp_path: Path) -> None:
    # Regression (issue 14): a loss_fn from an earlier cell using `bigtrain.device` raised
    # NameError in the worker: the notebook's functions had globals of their own there.
    namespace = notebook_namespace()
    exec(compile("def where():\n    return bigtrain, SCALE, cell_value\n", CELL_FILE, "exec"), namespace)
    inputs = collect("print(where(), make_model())", namespace)
    out = run_in_fresh_process(dumps(inputs), '''
        ns["bigtrain"] = "the run context"
        ns["cell_value"] = 7
        print(ns["where"]())
    ''', tmp_path)
    assert out.strip() == "('the run context', 3, 7)", out
