"""Copying a tutorial into the workspace brings the data it reads by relative path."""

from __future__ import annotations

import json
from pathlib import Path

from nbtrain.server.tutorials import copy_tutorial

REPO_TUTORIALS = Path(__file__).resolve().parents[1] / "notebooks"


def test_a_copied_tutorial_finds_its_data_without_overwriting_the_users(tmp_path: Path) -> None:
    # Bug guarded: "Open tutorial…" copied the notebook alone, and its first cells failed on
    # Path("data/owl_and_pussycat.txt") in the user's workspace.
    workspace = tmp_path / "work"
    (workspace / "data").mkdir(parents=True)
    (workspace / "data" / "mine.txt").write_text("the user's own file")
    assert copy_tutorial(REPO_TUTORIALS, "01_quickstart.ipynb", workspace) == "01_quickstart.ipynb"
    source = "".join("".join(c["source"]) for c in json.loads((workspace / "01_quickstart.ipynb").read_text())["cells"])
    assert 'Path("data/owl_and_pussycat.txt")' in source, "the tutorial no longer reads this file: update the test"
    copied = workspace / "data" / "owl_and_pussycat.txt"
    assert copied.read_text() == (REPO_TUTORIALS / "data" / "owl_and_pussycat.txt").read_text()

    copied.write_text("edited by the user")
    assert copy_tutorial(REPO_TUTORIALS, "01_quickstart.ipynb", workspace) == "01_quickstart-1.ipynb"
    assert copied.read_text() == "edited by the user", "a second copy overwrote the user's data"
    assert (workspace / "data" / "mine.txt").read_text() == "the user's own file"
