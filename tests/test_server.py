"""The BigTrain server API in a real jupyter server (pytest-jupyter), over HTTP.

Run directories are made with the real writers (RunDirectory, MetricWriter); stop is tried
on real process groups.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import types
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from pytest_jupyter.jupyter_server import *  # noqa: F403 - the fixtures, for this module only
from tornado.httpclient import HTTPClientError, HTTPResponse

from nbtrain.rundir import MetricWriter
from nbtrain.rundir.layout import TIMELINE as TIMELINE_FILE
from tests.ui.rundirs import make_run

pytestmark = pytest.mark.integration

Fetch = Callable[..., HTTPResponse]


@pytest.fixture
def tutorials(tmp_path: Path) -> Path:
    folder = tmp_path / "tutorials"
    folder.mkdir()
    notebook = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# Quick start\n", "text"]}],
                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (folder / "01_quickstart.ipynb").write_text(json.dumps(notebook))
    return folder


@pytest.fixture
def jp_server_config(tutorials: Path) -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"nbtrain.server": True}},
            "BigTrain": {"stop_grace_s": 1.0, "tutorials_dir": str(tutorials)}}


@pytest.fixture
def fetch(jp_serverapp: Any, http_server_client: Any, jp_auth_header: dict[str, str], jp_base_url: str,
          jp_asyncio_loop: Any) -> Fetch:
    """Request `path` (raw, under the base URL) and return the response, whatever its code."""

    def call(path: str, method: str = "GET", auth: bool = True, body: Any = None, **kwargs: Any) -> HTTPResponse:
        headers = {**(jp_auth_header if auth else {}), **kwargs.pop("headers", {})}
        if method == "POST" and body is None:
            body = "{}"
        try:
            return jp_asyncio_loop.run_until_complete(http_server_client.fetch(
                jp_base_url + path, method=method, headers=headers, body=body, request_timeout=30, **kwargs))
        except HTTPClientError as e:
            assert e.response is not None, f"{method} {path}: no response ({e})"
            return e.response

    return call


def data(response: HTTPResponse) -> Any:
    return json.loads(response.body)


def message(response: HTTPResponse) -> str:
    return str(json.loads(response.body)["message"])


@pytest.fixture
def root(jp_root_dir: Path) -> Path:
    return jp_root_dir / "bigtrain-runs"


@pytest.fixture
def sleeper(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start sleeping process groups (a leader and a child) that stand in for a run's workers."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*argv: str, ignore_term: bool = False) -> subprocess.Popen[bytes]:
        code = ("import signal, subprocess, sys, time\n"
                + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
                + "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
                + "print('ready', flush=True)\ntime.sleep(300)\n")
        proc = subprocess.Popen([sys.executable, "-c", code, *argv], start_new_session=True, stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        started.append(proc)
        return proc

    yield start
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def live_group(pgid: int) -> list[int]:
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except OSError:
            continue
    return found


ROUTES = [("GET", "nbtrain/api/runs"), ("GET", "nbtrain/api/runs/{id}"), ("GET", "nbtrain/api/runs/{id}/metrics"),
          ("GET", "nbtrain/api/runs/{id}/log"), ("POST", "nbtrain/api/runs/{id}/stop"), ("GET", "nbtrain/api/machine"),
          ("GET", "nbtrain/api/tutorials"), ("POST", "nbtrain/api/tutorials/01_quickstart.ipynb")]


def test_every_route_refuses_requests_without_credentials(fetch: Fetch, root: Path, sleeper: Any,
                                                          jp_root_dir: Path) -> None:
    workers = sleeper()
    run = make_run(root, "guarded", pids=[workers.pid])
    for method, route in ROUTES:
        response = fetch(route.format(id=run.run_id), method=method, auth=False)
        assert response.code == 403, f"{method} {route} answered {response.code} without credentials"
    assert run.status()["state"] == "running" and workers.poll() is None, "an anonymous stop reached the run"
    assert not (jp_root_dir / "01_quickstart.ipynb").exists(), "an anonymous request copied a tutorial"


def test_xsrf_is_required_for_cookie_logins(fetch: Fetch, root: Path, jp_serverapp: Any) -> None:
    run = make_run(root, "finished", state="succeeded")
    login = fetch("login", auth=False)
    xsrf = login.headers["Set-Cookie"].split("_xsrf=")[1].split(";")[0]
    token = jp_serverapp.identity_provider.token
    logged_in = fetch("login", method="POST", auth=False, follow_redirects=False,
                      body=urllib.parse.urlencode({"password": token, "_xsrf": xsrf}),
                      headers={"Cookie": f"_xsrf={xsrf}"})
    assert logged_in.code == 302, f"login failed: {logged_in.code}"
    cookies = "; ".join(c.split(";")[0] for c in logged_in.headers.get_list("Set-Cookie")) + f"; _xsrf={xsrf}"
    listed = fetch("nbtrain/api/runs", auth=False, headers={"Cookie": cookies})
    assert listed.code == 200, "a logged-in browser cannot list runs"
    forged = fetch(f"nbtrain/api/runs/{run.run_id}/stop", method="POST", auth=False, headers={"Cookie": cookies})
    assert forged.code == 403 and "xsrf" in message(forged).lower(), "a POST without the XSRF token was accepted"
    genuine = fetch(f"nbtrain/api/runs/{run.run_id}/stop", method="POST", auth=False,
                    headers={"Cookie": cookies, "X-XSRFToken": xsrf})
    assert genuine.code == 409, f"a POST with the XSRF token was not let through: {genuine.code}"


def test_runs_list_shows_progress_with_running_runs_first(fetch: Fetch, root: Path) -> None:
    done = make_run(root, "done", state="succeeded", steps=10)
    live = make_run(root, "live", steps=4, total=50)
    listed = data(fetch("nbtrain/api/runs"))
    assert listed["roots"][0] == str(root)
    assert [r["id"] for r in listed["runs"]] == [live.run_id, done.run_id], "running runs must come first"
    row = listed["runs"][0]
    assert (row["name"], row["state"], row["step"], row["total"]) == ("live", "running", 4, 50)
    assert row["loss"] == pytest.approx(0.5) and row["loss_tail"][-1] == [4, pytest.approx(0.5)]
    assert row["eta_s"] is not None and row["eta_s"] >= 0
    assert listed["runs"][1]["final"] and listed["runs"][1]["eta_s"] is None


def test_a_starting_run_shows_its_start_up_phase_until_its_first_step(fetch: Fetch, root: Path,
                                                                      tmp_path: Path) -> None:
    run = make_run(root, "warming", steps=0, total=50)
    started = run.status()["started"]
    timeline = run.path / TIMELINE_FILE
    assert data(fetch("nbtrain/api/runs"))["runs"][0]["phase"]["label"] == "starting the worker processes"
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"python_started": started + 1}))
    timeline.symlink_to(outside)
    assert data(fetch("nbtrain/api/runs"))["runs"][0]["phase"]["key"] == "workers", "a file outside the run was read"
    timeline.unlink()
    timeline.write_text(json.dumps({"python_started": started + 0.5, "imports_done": started + 6.5,
                                    "ops": [{"name": "cpu_adam", "started": started + 7.0, "cached": False}]}))
    phase = data(fetch("nbtrain/api/runs"))["runs"][0]["phase"]
    assert phase["key"] == "op" and phase["label"].startswith("building DeepSpeed op cpu_adam (once"), phase
    assert "since the run started" in phase["line"] and phase["trail"] == "workers started 0.5 s · imports 6.0 s"
    assert data(fetch(f"nbtrain/api/runs/{run.run_id}"))["phase"]["label"] == phase["label"], "the panel differs"
    writer = MetricWriter(run.metrics_file(0), 0)
    writer.write(1, lr=1e-3, step_time_s=0.5, samples_per_s=64.0)
    writer.close()
    assert data(fetch("nbtrain/api/runs"))["runs"][0]["phase"] is None, "the phase stayed after the first step"
    assert data(fetch(f"nbtrain/api/runs/{run.run_id}"))["phase"] is None


def test_run_detail_never_unpickles_anything(fetch: Fetch, root: Path, tmp_path: Path) -> None:
    run = make_run(root, "detail")
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    run.inputs_file.write_bytes(pickle.dumps({"x": Trap()}))
    run.outputs_file.write_bytes(pickle.dumps({"values": {"y": Trap()}, "problems": {}}))
    (run.path / "deepspeed.effective.json").write_text(json.dumps(
        {"config": {"train_batch_size": 16}, "engine": {"max_steps": 10, "zero_stage": 2}}))
    (run.path / "cell.py").write_text("result = bigtrain.fit(make_model(), data)\n")
    shown = data(fetch(f"nbtrain/api/runs/{run.run_id}"))
    assert shown["status"]["state"] == "running" and shown["run"]["config"]["zero"] == 2
    assert shown["effective"]["engine"]["zero_stage"] == 2 and shown["deepspeed"]["zero_optimization"]["stage"] == 2
    assert shown["cell"].startswith("result = bigtrain.fit") and shown["ranks"] == [0]
    for method, route in ROUTES[:4]:
        fetch(route.format(id=run.run_id), method=method)
    assert not marker.exists(), "the server unpickled a file of the run directory"


@pytest.mark.parametrize("raw_id", ["..", "...", "..%2F..%2Fetc", "%2Fetc%2Fpasswd", ".hidden", "a%00b", "x" * 300])
def test_malformed_run_ids_are_refused(fetch: Fetch, root: Path, raw_id: str) -> None:
    make_run(root, "there")
    for method, route in ROUTES[1:5]:
        response = fetch(route.format(id=raw_id), method=method)
        assert response.code == 400, f"{method} {route} with id {raw_id!r} answered {response.code}"
        assert "run id" in message(response) and "malformed" in message(response)


def test_symlinks_do_not_lead_out_of_the_run_roots(fetch: Fetch, root: Path, tmp_path: Path) -> None:
    outside = make_run(tmp_path / "elsewhere", "outside")
    root.mkdir(parents=True, exist_ok=True)
    (root / outside.run_id).symlink_to(outside.path)
    inner = make_run(root, "inner")
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret\n")
    inner.log_file(1).symlink_to(secret)
    inner.metrics_file(1).symlink_to(secret)
    assert fetch(f"nbtrain/api/runs/{outside.run_id}").code == 404, "a symlinked run folder was served"
    assert outside.run_id not in [r["id"] for r in data(fetch("nbtrain/api/runs"))["runs"]]
    tail = data(fetch(f"nbtrain/api/runs/{inner.run_id}/log?rank=1"))
    assert tail["lines"] == [] and not tail["exists"], "a log symlinked out of the run was read"
    assert b"secret" not in fetch(f"nbtrain/api/runs/{inner.run_id}/metrics").body


def test_unknown_run_is_404_with_a_message(fetch: Fetch, root: Path) -> None:
    response = fetch("nbtrain/api/runs/20260101-000000-nothing-abcd")
    assert response.code == 404 and "no run '20260101-000000-nothing-abcd'" in message(response)


@pytest.mark.parametrize("query, name", [("cursor=abc", "cursor"), ("cursor=0:-5", "cursor"),
                                         ("after_step=ten", "after_step"), ("after_step=1.5", "after_step")])
def test_malformed_metrics_queries_are_refused(fetch: Fetch, root: Path, query: str, name: str) -> None:
    run = make_run(root, "q")
    response = fetch(f"nbtrain/api/runs/{run.run_id}/metrics?{query}")
    assert response.code == 400 and message(response).startswith(f"{name}="), message(response)


@pytest.mark.parametrize("query, name", [("rank=-1", "rank"), ("rank=x", "rank"), ("lines=0", "lines"),
                                         ("lines=999999", "lines")])
def test_malformed_log_queries_are_refused(fetch: Fetch, root: Path, query: str, name: str) -> None:
    run = make_run(root, "q")
    response = fetch(f"nbtrain/api/runs/{run.run_id}/log?{query}")
    assert response.code == 400 and message(response).startswith(f"{name}="), message(response)
    assert "whole number from" in message(response)


def test_metrics_of_a_live_run_come_incrementally(fetch: Fetch, root: Path) -> None:
    run = make_run(root, "live", steps=2)
    first = data(fetch(f"nbtrain/api/runs/{run.run_id}/metrics"))
    assert sorted({r["step"] for r in first["records"]}) == [1, 2] and len(first["records"]) == 4
    writer = MetricWriter(run.metrics_file(0), 0)
    writer.write(3, loss=0.3)
    with open(run.metrics_file(0), "a") as f:
        f.write('{"step": 4, "rank": 0, "ti')  # rank 0 in the middle of writing a record
    second = data(fetch(f"nbtrain/api/runs/{run.run_id}/metrics?cursor={first['cursor']}"))
    assert [(r["step"], r.get("loss")) for r in second["records"]] == [(3, 0.3)], "old or partial records came back"
    with open(run.metrics_file(0), "a") as f:
        f.write('me": 1.0, "loss": 0.25}\n')
    third = data(fetch(f"nbtrain/api/runs/{run.run_id}/metrics?cursor={second['cursor']}"))
    assert [(r["step"], r["loss"]) for r in third["records"]] == [(4, 0.25)]
    since = data(fetch(f"nbtrain/api/runs/{run.run_id}/metrics?after_step=3"))
    assert [r["step"] for r in since["records"]] == [4], "after_step must return only later steps"
    writer.close()


def strict(response: HTTPResponse) -> Any:
    """Parse like a browser's JSON.parse, which refuses NaN and Infinity."""
    def refuse(name: str) -> None:
        raise AssertionError(f"the answer holds {name}, which browsers cannot parse")
    return json.loads(response.body, parse_constant=refuse)


def test_nan_losses_and_infinite_settings_reach_the_browser_as_strings(fetch: Fetch, root: Path) -> None:
    run = make_run(root, "diverged", steps=1)
    with open(run.metrics_file(0), "a") as f:  # what Python's json.dumps writes for a NaN loss
        f.write(json.dumps({"step": 2, "rank": 0, "time": 1795595831.4, "loss": float("nan")}) + "\n")
    (run.path / "deepspeed.effective.json").write_text('{"config": {"steps_per_print": Infinity}, "engine": {}}')
    listed = strict(fetch("nbtrain/api/runs"))["runs"][0]
    assert listed["loss"] == "NaN" and listed["loss_tail"][-1] == [2, "NaN"]
    assert strict(fetch(f"nbtrain/api/runs/{run.run_id}"))["effective"]["config"]["steps_per_print"] == "Infinity"
    assert strict(fetch(f"nbtrain/api/runs/{run.run_id}/metrics"))["records"][-1]["loss"] == "NaN"


def test_log_tail_gives_the_last_lines(fetch: Fetch, root: Path) -> None:
    run = make_run(root, "logs")
    tail = data(fetch(f"nbtrain/api/runs/{run.run_id}/log?lines=3"))
    assert tail["lines"] == ["log line 497", "log line 498", "log line 499"]
    assert data(fetch(f"nbtrain/api/runs/{run.run_id}/log?rank=7"))["exists"] is False


def test_stop_ends_the_whole_process_group_and_marks_the_run_stopped(fetch: Fetch, root: Path,
                                                                     sleeper: Any) -> None:
    run = make_run(root, "to-stop")
    workers = sleeper(str(run.path), "0")
    run.write_status(pids=[workers.pid])
    assert len(live_group(workers.pid)) == 2, "the stand-in workers did not start"
    response = fetch(f"nbtrain/api/runs/{run.run_id}/stop", method="POST")
    assert response.code == 200, message(response)
    assert live_group(workers.pid) == [], "processes of the run's group survived the stop"
    assert workers.wait() == -signal.SIGTERM
    status = run.status()
    assert status["state"] == "stopped" and status["reason"].startswith("stopped from JupyterLab")
    again = fetch(f"nbtrain/api/runs/{run.run_id}/stop", method="POST")
    assert again.code == 409 and "already ended (stopped)" in message(again)


def test_stop_kills_workers_that_ignore_sigterm(fetch: Fetch, root: Path, sleeper: Any) -> None:
    run = make_run(root, "stubborn")
    workers = sleeper(str(run.path), "0", ignore_term=True)
    run.write_status(pids=[workers.pid])
    assert fetch(f"nbtrain/api/runs/{run.run_id}/stop", method="POST").code == 200
    assert workers.wait() == -signal.SIGKILL and live_group(workers.pid) == []
    assert run.status()["state"] == "stopped"


def test_stop_refuses_a_pid_that_is_not_the_runs_worker(fetch: Fetch, root: Path, sleeper: Any) -> None:
    stranger = sleeper("not-a-run")
    run = make_run(root, "reused-pid", pids=[stranger.pid])
    response = fetch(f"nbtrain/api/runs/{run.run_id}/stop", method="POST")
    assert response.code == 409 and f"process {stranger.pid}" in message(response)
    assert stranger.poll() is None and len(live_group(stranger.pid)) == 2, "a foreign process was signalled"
    assert run.status()["state"] == "running"


def test_stop_of_a_run_whose_workers_are_gone_marks_it_stopped(fetch: Fetch, root: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run = make_run(root, "orphan", pids=[gone.pid])
    assert fetch(f"nbtrain/api/runs/{run.run_id}/stop", method="POST").code == 200
    assert run.status()["state"] == "stopped" and "already gone" in run.status()["reason"]


def test_machine_without_nvml_reports_no_gpus(fetch: Fetch) -> None:
    stats = data(fetch("nbtrain/api/machine"))
    assert stats["gpus"] == [], "this machine has no NVIDIA driver"
    assert 0 <= stats["cpu_percent"] <= 100 and stats["cpu_count"] >= 1
    assert 0 < stats["memory_used_bytes"] < stats["memory_total_bytes"]


def fake_nvml(gpus: list[tuple[str, int, int, int]], driver: bool = True) -> types.ModuleType:
    """Return a stand-in for nvidia-ml-py's `pynvml` with `gpus` as (name, util %, used, total)."""

    class NVMLError(Exception):
        pass

    module = types.ModuleType("pynvml")
    state = {"up": False}

    def init() -> None:
        if not driver:
            raise NVMLError("NVML Shared Library Not Found")
        state["up"] = True

    def need_init() -> None:
        if not state["up"]:
            raise NVMLError("Uninitialized")

    def count() -> int:
        need_init()
        return len(gpus)

    module.NVMLError = NVMLError  # type: ignore[attr-defined]
    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlShutdown = lambda: state.update(up=False)  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = count  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda i: (need_init(), gpus[i])[1]  # type: ignore[attr-defined]
    module.nvmlDeviceGetName = lambda h: h[0]  # type: ignore[attr-defined]
    module.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=h[1], memory=0)  # type: ignore[attr-defined]
    module.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(  # type: ignore[attr-defined]
        used=h[2], total=h[3], free=h[3] - h[2])
    return module


def test_machine_reports_each_gpu_through_nvml(fetch: Fetch, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([("NVIDIA H100", 87, 40 << 30, 80 << 30),
                                                          ("NVIDIA H100", 12, 1 << 30, 80 << 30)]))
    gpus = data(fetch("nbtrain/api/machine"))["gpus"]
    assert [(g["index"], g["utilization_percent"], g["memory_used_bytes"]) for g in gpus] == \
        [(0, 87.0, 40 << 30), (1, 12.0, 1 << 30)]
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([], driver=False))
    assert data(fetch("nbtrain/api/machine"))["gpus"] == []


def test_tutorials_are_listed_and_copied_without_overwriting(fetch: Fetch, jp_root_dir: Path) -> None:
    listed = data(fetch("nbtrain/api/tutorials"))["tutorials"]
    assert listed == [{"name": "01_quickstart.ipynb", "title": "Quick start"}]
    first = data(fetch("nbtrain/api/tutorials/01_quickstart.ipynb", method="POST"))
    second = data(fetch("nbtrain/api/tutorials/01_quickstart.ipynb", method="POST"))
    assert (first["path"], second["path"]) == ("01_quickstart.ipynb", "01_quickstart-1.ipynb")
    assert json.loads((jp_root_dir / "01_quickstart-1.ipynb").read_text())["nbformat"] == 4
    missing = fetch("nbtrain/api/tutorials/..%2F..%2Fetc%2Fpasswd", method="POST")
    assert missing.code == 404 and "no tutorial" in message(missing)
