"""The BigTrain extension in a real `jupyter lab`, driven in Debian's headless Chromium.

One lab and one page for the module (start-up is the expensive part); the tests run in
order, as one user session: the sidebar, a run's panel, the commands, then a real
`%%bigtrain` run started from a notebook in the page and stopped from the sidebar.
Screenshots go to $NBTRAIN_UI_ARTIFACTS (default: a temporary folder, printed).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright import sync_api as playwright

from tests.conftest import NOTEBOOK_SETUP, wait_until_gone, worker_processes
from tests.ui.fixtures import chromium_tab, serving
from tests.ui.lab import JupyterLab, notebook
from tests.ui.rundirs import make_run

# tests/ui/fixtures.py (a plugin of tests/conftest.py): a screenshot of `page` when a test fails
pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("screenshot_on_failure")]

WAIT_MS = 60_000  # generous: a busy 2-core machine trains and serves the page at once
playwright.expect.set_options(timeout=WAIT_MS)  # the machine is busy training while the page is checked
SLOW_LOSS = '''
import time

def slow_loss(model, batch):
    time.sleep(0.05)  # slow enough to be watched and stopped in the sidebar
    return loss_fn(model, batch)
'''
# The cell's own work before bigtrain.prepare is a start-up phase the sidebar shows (for 4 s at least).
LIVE_CELL = ("%%bigtrain --nproc 2 --steps 3000 --name ui-live --no-plot\nimport time\ntime.sleep(4)\n"
             "result = bigtrain.fit(make_model(), ToyData(), loss_fn=slow_loss)")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lab-root")
    runs = root / "bigtrain-runs"
    make_run(runs, "gpt2-zero3", state="succeeded", steps=50, total=50)
    make_run(runs, "broken", state="failed", steps=5, total=50, reason="rank 1 raised ZeroDivisionError")
    (root / "live.ipynb").write_text(notebook("%load_ext nbtrain", NOTEBOOK_SETUP + SLOW_LOSS, LIVE_CELL))
    (root / "empty.ipynb").write_text(notebook(""))
    tutorials = root.parent / "tutorials"
    tutorials.mkdir()
    (tutorials / "01_quickstart.ipynb").write_text(json.dumps(
        {"cells": [{"cell_type": "markdown", "metadata": {}, "source": "# Quick start\nTrain a tiny GPT."}],
         "metadata": json.loads(notebook())["metadata"], "nbformat": 4, "nbformat_minor": 5}))
    return root


@pytest.fixture(scope="module")
def lab(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterLab]:
    with serving(JupyterLab(workspace, tmp_path_factory.mktemp("lab-home"),
                            tutorials_dir=workspace.parent / "tutorials", stop_grace_s=5), workspace) as server:
        yield server


@pytest.fixture(scope="module")
def page(lab: JupyterLab) -> Iterator[playwright.Page]:
    with chromium_tab(height=900, wait_ms=WAIT_MS) as tab:
        tab.goto(f"{lab.url}/lab?token={lab.token}")
        tab.wait_for_selector('li[data-id="nbtrain-sidebar"]', timeout=90_000)
        yield tab


def open_sidebar(page: playwright.Page) -> playwright.Locator:
    sidebar = page.locator("#nbtrain-sidebar")
    if not sidebar.is_visible():
        page.locator('li[data-id="nbtrain-sidebar"]').click()
    playwright.expect(sidebar).to_be_visible()
    return sidebar


def run_row(page: playwright.Page, name: str) -> playwright.Locator:
    return page.locator(f'#nbtrain-sidebar li.nbtrain-run[data-run-id*="-{name}-"]')


def run_command(page: playwright.Page, command: str) -> None:
    """Start a JupyterLab command as the palette or a menu would (without waiting for its end)."""
    page.evaluate("command => { void window.jupyterapp.commands.execute(command); }", command)


def open_document(page: playwright.Page, path: str) -> playwright.Locator:
    page.evaluate("async path => { await window.jupyterapp.commands.execute('docmanager:open', {path}); }", path)
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    playwright.expect(panel.locator(".jp-Cell").first).to_be_visible()
    playwright.expect(panel.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_have_count(1)
    return panel


def test_sidebar_lists_runs_with_status_step_and_loss(page: playwright.Page, artifacts: Path) -> None:
    sidebar = open_sidebar(page)
    done, broken = run_row(page, "gpt2-zero3"), run_row(page, "broken")
    playwright.expect(done.locator(".nbtrain-badge")).to_have_text("succeeded")
    playwright.expect(done.locator(".nbtrain-run-step")).to_have_text("step 50/50")
    playwright.expect(done.locator(".nbtrain-run-loss")).to_have_text("loss 0.04000")
    assert done.locator(".nbtrain-sparkline polyline").count() == 1, "no loss sparkline"
    playwright.expect(broken.locator(".nbtrain-badge")).to_have_text("failed")
    playwright.expect(broken).to_contain_text("rank 1 raised ZeroDivisionError")
    playwright.expect(sidebar.locator(".nbtrain-meter", has_text="CPU")).to_contain_text("cores")
    playwright.expect(sidebar.locator(".nbtrain-meter", has_text="RAM")).to_contain_text("GiB")
    assert done.locator(".nbtrain-stop").count() == 0, "a finished run offers Stop"
    sidebar.screenshot(path=artifacts / "sidebar-finished-runs.png")


def test_clicking_a_run_opens_its_panel_with_charts_config_and_log(page: playwright.Page, artifacts: Path) -> None:
    run_row(page, "gpt2-zero3").click()
    panel = page.locator(".nbtrain-run-panel:visible")
    playwright.expect(panel.locator("h2")).to_have_text("gpt2-zero3")
    playwright.expect(panel.locator(".nbtrain-panel-progress")).to_contain_text("step 50/50 · loss 0.04000")
    loss_chart = panel.locator(".nbtrain-chart", has_text="Loss")
    playwright.expect(loss_chart.locator("polyline")).to_have_count(1)
    playwright.expect(panel.locator(".nbtrain-chart", has_text="Learning rate").locator("polyline")).to_have_count(1)
    playwright.expect(panel.locator(".nbtrain-config pre")).to_contain_text('"stage": 2')
    playwright.expect(panel.locator(".nbtrain-log pre")).to_contain_text("log line 499")
    page.screenshot(path=artifacts / "run-panel.png")


def test_command_palette_offers_the_bigtrain_commands(page: playwright.Page) -> None:
    page.keyboard.press("Control+Shift+c")
    page.locator("#command-palette .lm-CommandPalette-input").fill("BigTrain")
    items = page.locator("#command-palette .lm-CommandPalette-item")
    for label in ("Insert %%bigtrain cell", "Open config panel", "Open tutorial…", "Show BigTrain runs"):
        playwright.expect(items.filter(has_text=label)).to_have_count(1)
    page.keyboard.press("Escape")
    playwright.expect(page.locator("#command-palette .lm-CommandPalette-input")).to_be_hidden()


def test_launcher_has_the_bigtrain_cards(page: playwright.Page) -> None:
    run_command(page, "launcher:create")
    launcher = page.locator(".jp-Launcher:visible")
    for label in ("BigTrain notebook", "Open tutorial…"):
        playwright.expect(launcher.locator(".jp-LauncherCard", has_text=label)).to_have_count(1)
    page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current .lm-TabBar-tabCloseIcon").click()


def test_the_settings_editor_offers_the_refresh_periods(page: playwright.Page) -> None:
    # The extension's settings schema (schemas/nbtrain/plugin.json, shipped in the wheel) reached JupyterLab.
    run_command(page, "settingeditor:open")
    settings = page.locator(".jp-SettingsPanel:visible")
    page.locator(".jp-PluginList:visible").get_by_text("BigTrain", exact=True).click()
    for label, default in (("Sidebar refresh while a run is live (seconds)", "1"),
                           ("Sidebar refresh while no run is live (seconds)", "3"), ("Run panel refresh (seconds)", "1")):
        playwright.expect(settings.locator(f'input[label="{label}"]')).to_have_value(default)
    page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current .lm-TabBar-tabCloseIcon").click()


def test_insert_bigtrain_cell_inserts_the_template(page: playwright.Page) -> None:
    panel = open_document(page, "empty.ipynb")
    panel.locator(".jp-Cell").first.click()
    panel.locator('[data-jp-item-name="nbtrain-insert"] button').click()  # the notebook toolbar's button
    sources = panel.locator(".jp-Cell .cm-content")
    playwright.expect(sources.last).to_contain_text("%%bigtrain --nproc 2 --zero 2")
    texts = [t for t in sources.all_inner_texts() if t.strip()]
    assert texts[0] == "%load_ext nbtrain", texts
    assert texts[1].startswith("%%bigtrain --nproc 2 --zero 2") and "bigtrain.fit(" in texts[1], texts
    assert len(texts) == 2, texts


def test_open_config_panel_runs_a_cell_that_shows_the_panel(page: playwright.Page, artifacts: Path) -> None:
    panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
    run_command(page, "nbtrain:open-config")
    cell = panel.locator(".jp-CodeCell", has_text="from nbtrain import ConfigPanel")
    playwright.expect(cell).to_have_count(1)
    output = cell.locator(".jp-OutputArea-output")
    playwright.expect(output.locator(".jupyter-widgets").first).to_be_visible(timeout=60_000)
    playwright.expect(output).to_contain_text("ZeRO")
    page.screenshot(path=artifacts / "config-panel.png")


def test_open_tutorial_copies_it_into_the_workspace_and_opens_it(page: playwright.Page, workspace: Path) -> None:
    run_command(page, "nbtrain:open-tutorial")
    dialog = page.locator(".jp-Dialog")
    playwright.expect(dialog.locator("select")).to_contain_text("Quick start (01_quickstart.ipynb)")
    dialog.locator(".jp-mod-accept").click()
    playwright.expect(page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current")).to_contain_text(
        "01_quickstart.ipynb")
    playwright.expect(page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-MarkdownCell")).to_contain_text(
        "Quick start")
    assert (workspace / "01_quickstart.ipynb").is_file()
    playwright.expect(page.locator(".jp-Dialog")).to_have_count(0)


def step_of(row: playwright.Locator) -> int:
    found = re.search(r"step (\d+)", row.locator(".nbtrain-run-step").inner_text())
    return int(found.group(1)) if found else -1


def test_a_run_started_in_the_page_shows_live_and_stops_from_the_sidebar(
        page: playwright.Page, workspace: Path, artifacts: Path) -> None:
    open_document(page, "live.ipynb")
    # Run All only once the notebook's kernel is up: cells queued on a kernel still starting are dropped.
    page.evaluate("""async () => {
        const notebook = window.jupyterapp.shell.currentWidget;
        await notebook.sessionContext.ready;
        await notebook.sessionContext.session.kernel.info;
        void window.jupyterapp.commands.execute('notebook:run-all-cells');
    }""")
    prompts = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt")
    playwright.expect(prompts.nth(2)).to_have_text(re.compile(r"\[\*\]"), timeout=120_000)
    open_sidebar(page)
    row = run_row(page, "ui-live")
    playwright.expect(row.locator(".nbtrain-badge")).to_have_text("running", timeout=180_000)
    # While it starts, the sidebar and the status bar say what it is doing, with its times.
    phase = row.locator(".nbtrain-phase")
    playwright.expect(phase).to_contain_text(re.compile(r"starting: .+ · [\d.]+ s \([\d.]+ s since the run started\)"))
    playwright.expect(page.locator(".nbtrain-status")).to_contain_text("BigTrain ui-live: starting · ")
    # The cell's 4 s before prepare: seen while it lasts, or (on a busy machine polled late) as done.
    playwright.expect(phase).to_contain_text(
        re.compile(r"starting: running the cell up to bigtrain\.prepare|done: .*cell up to prepare \d"), timeout=180_000)
    playwright.expect(phase).to_contain_text("done: workers started")
    page.locator("#nbtrain-sidebar").screenshot(path=artifacts / "sidebar-starting-run.png")
    page.wait_for_function(
        "() => /step ([1-9]\\d*)\\/3000/.test(document.querySelector('li.nbtrain-run[data-run-id*=\"-ui-live-\"] "
        ".nbtrain-run-step')?.textContent || '')", timeout=180_000)
    first = step_of(row)
    page.wait_for_function(
        f"() => Number((document.querySelector('li.nbtrain-run[data-run-id*=\"-ui-live-\"] .nbtrain-run-step')"
        f"?.textContent.match(/step (\\d+)/) || [0, 0])[1]) > {first}")
    assert step_of(row) > first, "the step shown did not advance"
    playwright.expect(phase).to_be_hidden()  # it trains: the start-up phase is over
    playwright.expect(row.locator(".nbtrain-run-usage")).to_contain_text("2 workers")
    playwright.expect(page.locator(".nbtrain-status")).to_contain_text("BigTrain ui-live: step")
    assert len(worker_processes(str(workspace))) == 2, "the run's two workers are not running"
    page.locator("#nbtrain-sidebar").screenshot(path=artifacts / "sidebar-live-run.png")
    page.screenshot(path=artifacts / "lab-live-run.png")

    row.click()
    panel = page.locator(".nbtrain-run-panel:visible")
    playwright.expect(panel.locator("h2")).to_have_text("ui-live")
    playwright.expect(panel.locator(".nbtrain-chart", has_text="Loss").locator("polyline")).to_have_count(1)
    cpu = panel.locator(".nbtrain-chart", has_text="CPU % per rank")
    playwright.expect(cpu.locator("polyline")).to_have_count(2)  # one line per rank, once sampled twice
    playwright.expect(cpu.locator(".nbtrain-chart-legend")).to_contain_text("rank 1")
    playwright.expect(panel.locator(".nbtrain-config pre")).to_contain_text("as the engine was initialised")
    playwright.expect(panel.locator(".nbtrain-log pre")).to_contain_text("DeepSpeed")
    page.screenshot(path=artifacts / "run-panel-live.png")

    row.locator(".nbtrain-stop").click()
    playwright.expect(row.locator(".nbtrain-badge")).to_have_text("stopped")
    playwright.expect(row).to_contain_text("stopped from JupyterLab")
    wait_until_gone(str(workspace), timeout=15)
    run = next((workspace / "bigtrain-runs").glob("*-ui-live-*"))
    assert json.loads((run / "status.json").read_text())["state"] == "stopped"
    playwright.expect(page.locator(".nbtrain-status")).to_be_hidden()
    page.locator("#nbtrain-sidebar").screenshot(path=artifacts / "sidebar-stopped-run.png")
