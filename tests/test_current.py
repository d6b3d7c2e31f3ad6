"""`from nbtrain import bigtrain`: the run in progress for the user's own modules (nbtrain/current.py)."""

from __future__ import annotations

import pickle

import pytest

import nbtrain
from nbtrain import bigtrain
from nbtrain.current import running


class Context:
    rank = 1
    device = "cpu"


def test_in_the_kernel_using_it_says_where_it_exists() -> None:
    with pytest.raises(RuntimeError, match=r"bigtrain.device: nbtrain.bigtrain exists only inside a %%bigtrain "
                                           r"cell's workers while a run is in progress"):
        bigtrain.device  # noqa: B018
    assert "no run in progress" in repr(bigtrain)
    assert not hasattr(bigtrain, "_repr_html_"), "IPython's display probes must not raise"


def test_during_a_run_it_is_that_run_and_afterwards_nothing() -> None:
    first, second = Context(), Context()
    second.rank = 0
    with running(first):
        assert (bigtrain.rank, bigtrain.device) == (1, "cpu")
    with running(second):  # a warm worker's next run
        assert bigtrain.rank == 0
    with pytest.raises(RuntimeError):
        bigtrain.rank  # noqa: B018


def test_it_is_unset_even_when_the_run_fails() -> None:
    with pytest.raises(ValueError), running(Context()):
        raise ValueError("the cell failed")
    with pytest.raises(RuntimeError):
        bigtrain.rank  # noqa: B018


def test_it_travels_by_reference() -> None:
    assert pickle.loads(pickle.dumps(bigtrain)) is nbtrain.bigtrain

