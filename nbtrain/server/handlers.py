"""The HTTP routes of the BigTrain API under `<base_url>/nbtrain/api/`.

Every route needs the server's authentication (token or login cookie) and its
authorization; POSTs go through Jupyter's XSRF check. Malformed requests get 4xx with a
JSON `message`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import tornado.web
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler

from nbtrain.devices import machine_stats
from nbtrain.server import runs, tutorials, workers
from nbtrain.server.runs import RequestError

if TYPE_CHECKING:
    from nbtrain.server import BigTrain

AUTH_RESOURCE = "nbtrain"


def strict_json(value: Any) -> Any:
    """Return `value` with NaN and infinities as strings: browsers' JSON.parse refuses them.

    They do occur: a diverging loss is NaN, and DeepSpeed configs hold `Infinity`.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value).replace("inf", "Infinity").replace("nan", "NaN")
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


class BigTrainHandler(APIHandler):
    """Common parts: the extension's state, JSON answers, RequestError as 4xx."""

    auth_resource = AUTH_RESOURCE

    @property
    def bigtrain(self) -> BigTrain:
        return self.settings["nbtrain"]  # type: ignore[no-any-return]

    def answer(self, data: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(strict_json(data), default=str, allow_nan=False))

    def fail(self, error: RequestError) -> NoReturn:
        raise tornado.web.HTTPError(error.status, str(error).replace("%", "%%")) from error

    async def find_run(self, run_id: str) -> runs.RunDirectory:
        try:
            return (await self.bigtrain.roots()).find(run_id)
        except RequestError as e:
            self.fail(e)


class RunsHandler(BigTrainHandler):
    @tornado.web.authenticated
    @authorized
    async def get(self) -> None:
        roots = await self.bigtrain.roots()
        listed = [runs.summary(run, self.bigtrain.progress) for run in roots.runs()]
        for row in listed:
            if not row["final"]:
                rows = self.bigtrain.sampler.sample(runs.RunDirectory(Path(row["root"]) / row["id"]))
                live = [w for w in rows if w.get("alive")]
                row["workers_alive"] = len(live)
                row["cpu_percent"] = sum(w.get("cpu_percent", 0.0) for w in live)
                row["rss_bytes"] = sum(w.get("rss_bytes", 0) for w in live)
        self.answer({"roots": [str(r) for r in roots.roots], "runs": runs.order_for_sidebar(listed)})


class RunHandler(BigTrainHandler):
    @tornado.web.authenticated
    @authorized
    async def get(self, run_id: str) -> None:
        run = await self.find_run(run_id)
        self.answer({**runs.detail(run, self.bigtrain.progress), "workers": self.bigtrain.sampler.sample(run)})


class MetricsHandler(BigTrainHandler):
    @tornado.web.authenticated
    @authorized
    async def get(self, run_id: str) -> None:
        run = await self.find_run(run_id)
        try:
            cursor = runs.parse_cursor(self.get_query_argument("cursor", None))
            after = self.get_query_argument("after_step", None)
            after_step = None if after is None else runs.parse_int("after_step", after, 0, -1, 10**12)
        except RequestError as e:
            self.fail(e)
        self.answer(runs.metrics(run, cursor, after_step))


class LogHandler(BigTrainHandler):
    @tornado.web.authenticated
    @authorized
    async def get(self, run_id: str) -> None:
        run = await self.find_run(run_id)
        try:
            rank = runs.parse_int("rank", self.get_query_argument("rank", None), 0, 0, runs.RANK_LIMIT)
            lines = runs.parse_int("lines", self.get_query_argument("lines", None), 200, 1, runs.MAX_LOG_LINES)
        except RequestError as e:
            self.fail(e)
        self.answer(runs.log_tail(run, rank, lines))


class StopHandler(BigTrainHandler):
    @tornado.web.authenticated
    @authorized
    async def post(self, run_id: str) -> None:
        run = await self.find_run(run_id)
        try:
            status = await workers.stop_run(run, self.bigtrain.stop_grace_s)
        except RequestError as e:
            self.fail(e)
        self.answer({"id": run.run_id, "status": status})


class MachineHandler(BigTrainHandler):
    @tornado.web.authenticated
    @authorized
    async def get(self) -> None:
        self.answer(machine_stats())


class TutorialsHandler(BigTrainHandler):
    @tornado.web.authenticated
    @authorized
    async def get(self) -> None:
        self.answer({"tutorials": tutorials.list_tutorials(self.bigtrain.tutorials_folder())})


class TutorialCopyHandler(BigTrainHandler):
    @tornado.web.authenticated
    @authorized
    async def post(self, name: str) -> None:
        try:
            copied = tutorials.copy_tutorial(self.bigtrain.tutorials_folder(), name, self.bigtrain.workspace)
        except RequestError as e:
            self.fail(e)
        self.answer({"path": copied})


def routes(base_url: str) -> list[tuple[str, type[BigTrainHandler]]]:
    """Return the URL patterns of the API under `base_url`."""
    api = base_url.rstrip("/") + "/nbtrain/api"
    run = api + r"/runs/(?P<run_id>[^/]+)"
    return [
        (api + "/runs", RunsHandler),
        (run, RunHandler),
        (run + "/metrics", MetricsHandler),
        (run + "/log", LogHandler),
        (run + "/stop", StopHandler),
        (api + "/machine", MachineHandler),
        (api + "/tutorials", TutorialsHandler),
        (api + r"/tutorials/(?P<name>[^/]+)", TutorialCopyHandler),
    ]
