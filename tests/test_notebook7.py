"""nbtrain in Notebook 7 (`jupyter notebook`), driven in Debian's headless Chromium.

The same user session as tests/test_ui.py, in the other Jupyter front end: the file page
loads the extension and opens a tutorial, then one notebook page runs `%%bigtrain` cells in its own kernel:
a live dashboard stopped with its Stop button, a short run that leaves its final picture,
a `--background` run whose handle the notebook waits on, the config panel opened by
nbtrain's command and changed with the mouse, and the runs sidebar beside the notebook. The tests run in order; the browser
console is watched all along, and nothing may fail in it but what Notebook 7 itself
logs without nbtrain. Screenshots go to $NBTRAIN_UI_ARTIFACTS (default: a temporary folder).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright import sync_api as playwright

from tests.conftest import NOTEBOOK_SETUP
from tests.ui.fixtures import chromium_tab, serving
from tests.ui.lab import JupyterNotebook, notebook

# tests/ui/fixtures.py (a plugin of tests/conftest.py): a screenshot of `page` when a test fails
pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("screenshot_on_failure")]

WAIT_MS = 60_000  # generous: a busy 2-core machine trains and serves the page at once
RUN_MS = 240_000  # a run's start (workers, DeepSpeed) on a loaded machine
playwright.expect.set_options(timeout=WAIT_MS)
SLOW_LOSS = '''
import time

def slow_loss(model, batch):
    time.sleep(0.05)  # slow enough to be watched and stopped
    return loss_fn(model, batch)
'''
LIVE_CELL = "%%bigtrain --nproc 2 --steps 3000 --name nb7-live\nbigtrain.fit(make_model(), ToyData(), loss_fn=slow_loss)"
SHORT_CELL = "%%bigtrain --nproc 2 --steps 5 --name nb7-short\nbigtrain.fit(make_model(), ToyData(), loss_fn=loss_fn)"
BACKGROUND_CELL = ("%%bigtrain --nproc 2 --steps 150 --micro-batch 4 --name nb7-bg --background\n"
                   "bigtrain.fit(make_model(), ToyData(), loss_fn=slow_loss)")
WAIT_CELL = "handle = _\nprint('background run', handle.wait().status)"
FLAGS_CELL = "print('panel flags:', panel.flags)"
# Errors Notebook 7.6 logs on its own, with nbtrain's extension disabled (its keyboard
# shortcuts plugin reads the schema of a plugin that is not loaded on the page).
NOTEBOOK7_OWN_ERRORS = {"Cannot read properties of undefined (reading 'schema')"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("notebook7-root")
    (root / "runs.ipynb").write_text(notebook(
        "%load_ext nbtrain", NOTEBOOK_SETUP + SLOW_LOSS, LIVE_CELL, SHORT_CELL, BACKGROUND_CELL, WAIT_CELL, FLAGS_CELL))
    return root


@pytest.fixture(scope="module")
def server(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterNotebook]:
    with serving(JupyterNotebook(workspace, tmp_path_factory.mktemp("notebook7-home"), stop_grace_s=5,
                                 tutorials_dir=Path(__file__).resolve().parents[1] / "notebooks"), workspace) as jupyter:
        yield jupyter


@pytest.fixture(scope="module")
def console_errors() -> list[str]:
    """Every error the pages logged or threw, as 'page: message'."""
    return []


@pytest.fixture(scope="module")
def page(server: JupyterNotebook, console_errors: list[str]) -> Iterator[playwright.Page]:
    with chromium_tab(height=1000, wait_ms=WAIT_MS) as tab:
        where = lambda: tab.url.split("?")[0].removeprefix(server.url)  # noqa: E731
        tab.on("console", lambda m: console_errors.append(f"{where()}: {m.text}") if m.type == "error" else None)
        tab.on("pageerror", lambda e: console_errors.append(f"{where()}: {e.message}"))
        tab.goto(f"{server.url}/tree?token={server.token}")
        yield tab


def cell(page: playwright.Page, source_start: str) -> playwright.Locator:
    """Return the code cell whose source starts with `source_start`."""
    first_line = source_start.splitlines()[0]
    return page.locator(".jp-CodeCell").filter(has=page.locator(".jp-InputArea", has_text=first_line)).first


def run_cell(page: playwright.Page, source_start: str) -> playwright.Locator:
    """Run the cell whose source starts with `source_start` as Shift+Enter would; return it."""
    page.evaluate("""async start => {
        const panel = window.jupyterapp.shell.currentWidget;
        await panel.sessionContext.ready;
        const index = panel.content.widgets.findIndex(c => c.model.sharedModel.getSource().startsWith(start));
        if (index < 0) throw new Error(`no cell starts with ${start}`);
        panel.content.activeCellIndex = index;
        void window.jupyterapp.commands.execute('notebook:run-cell');
    }""", source_start)
    return cell(page, source_start)


def shown_step(output: playwright.Locator) -> int:
    found = re.search(r"step (\d+)/", output.inner_text())
    return int(found.group(1)) if found else -1


def wait_for_step_after(page: playwright.Page, output: playwright.Locator, step: int) -> int:
    """Wait until the dashboard in `output` shows a step above `step`; return it."""
    output.locator(".jupyter-widgets").first.wait_for()
    handle = output.element_handle()
    page.wait_for_function("([el, step]) => Number((el.innerText.match(/step (\\d+)\\//) || [0, -1])[1]) > step",
                           arg=[handle, step], timeout=RUN_MS)
    return shown_step(output)


def run_state(workspace: Path, name: str) -> str:
    run = next((workspace / "bigtrain-runs").glob(f"*-{name}-*"))
    return str(json.loads((run / "status.json").read_text())["state"])


def test_the_file_page_loads_nbtrain_without_errors(page: playwright.Page, console_errors: list[str]) -> None:
    playwright.expect(page.locator(".jp-DirListing-item", has_text="runs.ipynb")).to_be_visible()
    page.wait_for_function("() => window.jupyterapp?.commands.hasCommand('nbtrain:open-tutorial')")
    # Regression: the notebook toolbar button registered on this page made Notebook 7's document
    # manager fail to load its settings ("Cannot convert undefined or null to object").
    page.wait_for_timeout(3000)  # settings load after the plugins have started
    unexpected = [e for e in console_errors if e.split(": ", 1)[1] not in NOTEBOOK7_OWN_ERRORS]
    assert not unexpected, f"errors in the browser console of the file page: {unexpected}"


def test_open_tutorial_copies_it_with_its_data_and_opens_it_in_a_new_tab(
        page: playwright.Page, workspace: Path) -> None:
    page.evaluate("() => void window.jupyterapp.commands.execute('nbtrain:open-tutorial')")
    dialog = page.locator(".jp-Dialog")
    playwright.expect(dialog.locator("select")).to_contain_text("(05_background_runs_and_scaling_out.ipynb)")
    with page.context.expect_page() as opened:  # Notebook 7 opens each document in its own tab
        dialog.locator(".jp-mod-accept").click()
    tab = opened.value
    try:
        playwright.expect(tab.locator(".jp-MarkdownCell").first).to_contain_text("Quickstart")
        assert tab.url.split("?")[0].endswith("/notebooks/01_quickstart.ipynb"), tab.url
    finally:
        tab.close()
    assert (workspace / "01_quickstart.ipynb").is_file() and (workspace / "data" / "owl_and_pussycat.txt").is_file()


def test_a_bigtrain_cell_shows_a_live_dashboard_that_stop_ends(
        page: playwright.Page, server: JupyterNotebook, workspace: Path, artifacts: Path) -> None:
    page.goto(f"{server.url}/notebooks/runs.ipynb?token={server.token}")
    playwright.expect(page.locator(".jp-NotebookPanel .jp-CodeCell").first).to_be_visible()
    playwright.expect(page.locator('[data-jp-item-name="nbtrain-insert"]')).to_be_visible()  # our toolbar button
    page.evaluate("""async () => {
        const panel = window.jupyterapp.shell.currentWidget;
        await panel.sessionContext.ready;
        await panel.sessionContext.session.kernel.info;
    }""")
    run_cell(page, "%load_ext nbtrain")
    run_cell(page, NOTEBOOK_SETUP)
    output = run_cell(page, LIVE_CELL).locator(".jp-Cell-outputArea")
    first = wait_for_step_after(page, output, 0)
    later = wait_for_step_after(page, output, first)
    assert later > first, "the dashboard's step did not advance"
    playwright.expect(output).to_contain_text("nb7-live")
    playwright.expect(output.locator(".widget-hprogress")).to_be_visible()
    stop = output.locator("button", has_text="Stop")
    playwright.expect(stop).to_be_enabled()
    page.screenshot(path=artifacts / "notebook7-live-dashboard.png")

    stop.click()
    # The run ends stopped: the dashboard becomes the final picture with a summary saying so.
    playwright.expect(output.locator("img")).to_be_visible(timeout=RUN_MS)
    playwright.expect(output).to_contain_text("stopped")
    assert run_state(workspace, "nb7-live") == "stopped"
    playwright.expect(output.locator("button", has_text="Stop")).to_have_count(0)


def test_a_finished_run_leaves_its_final_picture(page: playwright.Page, workspace: Path, artifacts: Path) -> None:
    output = run_cell(page, SHORT_CELL).locator(".jp-Cell-outputArea")
    picture = output.locator("img")
    playwright.expect(picture).to_be_visible(timeout=RUN_MS)
    assert picture.evaluate("img => img.naturalWidth") > 200, "the final picture is empty"
    playwright.expect(output).to_contain_text("succeeded")
    assert run_state(workspace, "nb7-short") == "succeeded"
    output.screenshot(path=artifacts / "notebook7-final-picture.png")


def test_a_background_run_returns_its_handle_and_trains_on(
        page: playwright.Page, workspace: Path, artifacts: Path) -> None:
    started = run_cell(page, BACKGROUND_CELL)
    output = started.locator(".jp-Cell-outputArea")
    # The cell ends at once with the handle, while its dashboard goes on updating.
    playwright.expect(started.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[\d+\]"), timeout=RUN_MS)
    playwright.expect(output).to_contain_text("running in the background")
    first = wait_for_step_after(page, output, 0)
    assert run_state(workspace, "nb7-bg") == "running", "the handle came back after the run, not at once"
    wait_for_step_after(page, output, first)
    started.scroll_into_view_if_needed()
    page.screenshot(path=artifacts / "notebook7-background-run.png")

    waited = run_cell(page, WAIT_CELL).locator(".jp-Cell-outputArea")
    playwright.expect(waited).to_contain_text("background run succeeded", timeout=RUN_MS)
    playwright.expect(output.locator("img")).to_be_visible()  # the background cell's final picture


def test_the_config_panel_opens_from_the_command_and_edits_the_settings(
        page: playwright.Page, artifacts: Path) -> None:
    page.evaluate("""() => {
        const panel = window.jupyterapp.shell.currentWidget;
        panel.content.activeCellIndex = panel.content.widgets.findIndex(
            c => c.model.sharedModel.getSource().startsWith('handle = _'));
        void window.jupyterapp.commands.execute('nbtrain:open-config');
    }""")
    panel_cell = cell(page, "from nbtrain import ConfigPanel")
    zero = panel_cell.locator(".widget-toggle-buttons").first
    playwright.expect(zero.locator("button", has_text="2")).to_be_visible(timeout=RUN_MS)
    zero.locator("button", has_text="2").click()
    playwright.expect(zero.locator("button.mod-active")).to_have_text("2")
    output = run_cell(page, FLAGS_CELL).locator(".jp-Cell-outputArea")
    playwright.expect(output).to_contain_text("panel flags:")
    assert "--zero 2" in output.inner_text(), output.inner_text()
    panel_cell.screenshot(path=artifacts / "notebook7-config-panel.png")


def test_the_runs_sidebar_lists_the_runs_and_opens_one_beside_the_notebook(
        page: playwright.Page, artifacts: Path) -> None:
    page.evaluate("() => void window.jupyterapp.commands.execute('nbtrain:show-runs')")
    sidebar = page.locator("#nbtrain-sidebar")
    playwright.expect(sidebar).to_be_visible()
    row = lambda name: sidebar.locator(f'li.nbtrain-run[data-run-id*="-{name}-"]')  # noqa: E731
    playwright.expect(row("nb7-live").locator(".nbtrain-badge")).to_have_text("stopped")
    playwright.expect(row("nb7-short").locator(".nbtrain-badge")).to_have_text("succeeded")
    playwright.expect(row("nb7-short").locator(".nbtrain-run-step")).to_have_text("step 5/5")
    # Regression: Notebook 7's main area holds the notebook and dropped the run panel (a click did nothing).
    row("nb7-short").click()
    panel = page.locator(".nbtrain-run-panel:visible")
    playwright.expect(panel.locator("h2")).to_have_text("nb7-short")
    playwright.expect(panel.locator(".nbtrain-chart", has_text="Loss").locator("polyline")).to_have_count(1)
    playwright.expect(page.locator(".jp-NotebookPanel")).to_be_visible()  # the notebook stays
    page.screenshot(path=artifacts / "notebook7-sidebar-and-run-panel.png")


def test_nothing_failed_in_the_browser_console(console_errors: list[str]) -> None:
    unexpected = [e for e in console_errors if e.split(": ", 1)[1] not in NOTEBOOK7_OWN_ERRORS]
    assert not unexpected, f"errors in the browser console: {unexpected}"
