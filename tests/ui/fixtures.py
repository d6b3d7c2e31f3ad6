"""Fixtures every browser test module uses: a folder for screenshots, and one taken when a test fails.

tests/conftest.py loads them as a plugin; a browser test module asks for the screenshot with
`pytestmark = pytest.mark.usefixtures("screenshot_on_failure")` and provides the `page` it is taken of.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
from playwright import sync_api as playwright

from tests.conftest import wait_until_gone
from tests.ui.lab import CHROMIUM, CHROMIUM_ARGS, JupyterServer


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("NBTRAIN_UI_ARTIFACTS") or tmp_path_factory.mktemp("ui-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nUI screenshots in {folder}")
    return folder


@pytest.fixture
def screenshot_on_failure(request: pytest.FixtureRequest, page: playwright.Page, artifacts: Path) -> Iterator[None]:
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        module = request.module.__name__.rpartition(".")[2]
        page.screenshot(path=artifacts / f"FAILED-{module}-{request.node.name}.png")


S = TypeVar("S", bound=JupyterServer)


@contextmanager
def serving(server: S, workspace: Path) -> Iterator[S]:
    """Yield a started server; stop it after, and wait until no process of `workspace` is left."""
    try:
        yield server
    finally:
        server.stop()
        wait_until_gone(str(workspace), timeout=30)


@contextmanager
def chromium_tab(height: int, wait_ms: int) -> Iterator[playwright.Page]:
    """Yield a page of headless Debian Chromium, 1400 px wide, that waits up to `wait_ms` for what it looks for."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        tab = browser.new_page(viewport={"width": 1400, "height": height})
        tab.set_default_timeout(wait_ms)
        yield tab
        browser.close()
