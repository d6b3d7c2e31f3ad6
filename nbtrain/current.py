"""`from nbtrain import bigtrain`: the run in progress, for code in the user's own modules.

Inside a `%%bigtrain` cell (and in every notebook function it calls) the name `bigtrain` is
the run's context already. A module of the user's own has no such name; it imports this
stand-in, which forwards to the context of the run this worker process is running now.
There is no run between runs nor in the kernel: using it there raises a RuntimeError that
says so. The stand-in itself holds nothing, so a warm worker's next run is seen at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

NO_RUN = ("nbtrain.bigtrain exists only inside a %%bigtrain cell's workers while a run is in progress "
          "(it is the cell's `bigtrain`); here there is none. Use it in code that a %%bigtrain cell calls.")


class _Runs:
    """Which run this process is running now (a worker runs one cell at a time)."""

    context: Any = None


class RunContextProxy:
    """Forward attribute reads to the context of the run in progress (`bigtrain.rank`, `.device`, ...)."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        context = _Runs.context
        if context is None:
            if name.startswith("_"):  # probes by pickle, IPython's display and hasattr() stay quiet
                raise AttributeError(name)
            raise RuntimeError(f"bigtrain.{name}: {NO_RUN}")
        return getattr(context, name)

    def __dir__(self) -> list[str]:
        return dir(_Runs.context) if _Runs.context is not None else []

    def __repr__(self) -> str:
        context = _Runs.context
        return repr(context) if context is not None else "<nbtrain.bigtrain: no run in progress in this process>"

    def __reduce__(self) -> str:
        return "bigtrain"  # by reference: a notebook function that uses it ships the worker's stand-in


bigtrain = RunContextProxy()


@contextmanager
def running(context: Any) -> Iterator[None]:
    """Make `context` what `nbtrain.bigtrain` forwards to, for the duration of one run."""
    _Runs.context = context
    try:
        yield
    finally:
        _Runs.context = None
