"""The `%bigtrain` line commands: list, show, attach to, stop and compare runs.

Every command reads the run directories under `--run-dir` (default ./bigtrain-runs), so it
works the same for a run of this kernel, of another kernel, or of a kernel that is gone.
A run is named by its id, a unique prefix of it, its `--name` (the newest run of that
name), or `latest`.
"""

from __future__ import annotations

import argparse
import difflib
import shlex
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from IPython.core.error import UsageError

from nbtrain.config.tree import DEFAULT_RUN_ROOT
from nbtrain.dashboard.fmt import clock, number
from nbtrain.launch.run import KernelState, Progress, RunHandle
from nbtrain.result import RunResult

if TYPE_CHECKING:
    from nbtrain.dashboard.widget import Dashboard
    from nbtrain.launch.pool import WorkerPool
from nbtrain.rundir import FINAL_STATES, RunDirectory, list_runs

ATTACH_TICK_S = 0.5  # an attached dashboard reads the run directory as often as a cell's does
STOP_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long (as JupyterLab's Stop)
STOP_WAIT_S = 60.0
STOPPED_REASON = "stopped with %bigtrain stop"
ATTACHED_STOP_REASON = "stopped from an attached dashboard"
RUN_HELP = "a run id, a unique prefix of one, a run's --name (its newest run), or 'latest'"
COMMANDS_HELP = """\
Line commands (each takes --run-dir DIR, default ./bigtrain-runs; RUN is a run id, a unique
prefix of one, a run's --name, or `latest`):
  %bigtrain runs                 the runs, newest first: name, status, steps, last loss, started, duration
  %bigtrain show RUN             the run's RunResult (status, metrics, config, timings)
  %bigtrain attach RUN           a live dashboard of a running run (also one started by another or an
                                 earlier kernel); the final picture and summary of a finished one
  %bigtrain stop RUN             stop a running run: every worker ends, the run is marked stopped
  %bigtrain compare RUN RUN...   the runs' loss curves on one plot, and their settings side by side
                                 (the settings that differ first)
  %bigtrain workers              the warm workers kept for the next run
  %bigtrain shutdown             end the warm workers
  %bigtrain restart              end them; the next run starts on fresh workers
"""


class _LineParser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError (no traceback) instead of exiting the kernel."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage().strip()}\n(see %bigtrain? for the commands)")


def build_line_parser() -> tuple[_LineParser, dict[str, _LineParser]]:
    """Return the parser of the `%bigtrain` line commands, and each command's own parser."""
    parser = _LineParser(prog="%bigtrain", add_help=False, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_LineParser)

    def command(name: str, help_text: str, runs: str = "") -> _LineParser:
        sub = commands.add_parser(name, help=help_text, add_help=False, allow_abbrev=False,
                                  prog=f"%bigtrain {name}")
        sub.add_argument("--run-dir", default=DEFAULT_RUN_ROOT, metavar="DIR",
                         help=f"root folder of the run directories (default ./{DEFAULT_RUN_ROOT})")
        if runs:
            sub.add_argument("runs", nargs=runs, metavar="RUN", help=RUN_HELP)
        return sub

    command("runs", "list the runs")
    command("show", "a run's RunResult", runs="?")
    command("attach", "a live dashboard of a run, or the final picture of a finished one", runs="?")
    command("stop", "stop a running run", runs="?")
    command("compare", "loss curves and settings of several runs", runs="+")
    for name in ("workers", "shutdown", "restart"):
        commands.add_parser(name, add_help=False, prog=f"%bigtrain {name}")
    return parser, commands.choices


def parse_command(line: str) -> argparse.Namespace:
    """Parse a `%bigtrain` line; an empty line means `runs`."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError as e:
        raise UsageError(f"%bigtrain {line}: the line cannot be split ({e}); close the quote") from None
    parser, commands = build_line_parser()
    args, extra = parser.parse_known_args(words or ["runs"])
    if extra:  # named by the command's parser, whose usage shows what it takes
        commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("show", "attach", "stop") and args.runs is None:
        raise UsageError(f"%bigtrain {args.command} needs a RUN: {RUN_HELP} (e.g. %bigtrain {args.command} latest)")
    return args


# -- finding runs -------------------------------------------------------------------------------
def find_run(root: Path, spec: str) -> RunDirectory:
    """Return the run `spec` names under `root`: an id, a unique id prefix, a --name, or 'latest'."""
    runs = list(list_runs(root))  # newest first
    by_id = {run.run_id: run for run in runs}
    if spec in by_id:
        return by_id[spec]
    if spec == "latest" and runs:
        return runs[0]
    named = [run for run in runs if run.run_info().get("name") == spec]
    if named:
        return named[0]
    prefixed = [run for run in runs if run.run_id.startswith(spec)]
    if len(prefixed) == 1:
        return prefixed[0]
    where = root.resolve()
    if prefixed:
        listed = ", ".join(run.run_id for run in prefixed[:5]) + (" …" if len(prefixed) > 5 else "")
        raise UsageError(f"run {spec!r} is ambiguous under {where}: {len(prefixed)} run ids start with it "
                         f"({listed}). Fix: give more of the id")
    if not runs:
        raise UsageError(f"no run {spec!r}: there are no runs under {where}. "
                         "Fix: pass the folder the runs were written to with --run-dir DIR")
    names = {run.run_info().get("name") or "" for run in runs} - {""}
    closest = difflib.get_close_matches(spec, [*by_id, *names], n=3, cutoff=0.3) or [run.run_id for run in runs[:3]]
    raise UsageError(f"no run {spec!r} under {where}; closest: {', '.join(closest)}. "
                     "Fix: use one of those, `latest`, or see %bigtrain runs")


def _root(args: argparse.Namespace) -> Path:
    return Path(args.run_dir).expanduser().resolve()


# -- runs ---------------------------------------------------------------------------------------
def runs_table(root: Path, now: float | None = None) -> str:
    """Return the `%bigtrain runs` table of the runs under `root`, newest first."""
    from nbtrain.server.runs import ProgressCache, summary

    runs = list(list_runs(root))
    where = root.resolve()
    if not runs:
        return f"no runs under {where}"
    now = time.time() if now is None else now
    cache = ProgressCache()
    header = ("run", "name", "status", "steps", "last loss", "started", "duration")
    rows = [header]
    for run in runs:
        row = summary(run, cache)
        started = row["started"] or row["created"]
        duration = (row["ended"] or now) - started if started else None
        phase = row["phase"] or {}
        state = f"{row['state']}: {phase['label']}" if phase.get("key") == "queue" else row["state"]  # SLURM's queue
        rows.append((row["id"], row["name"] or "—", state,
                     f"{row['step']}/{row['total'] or '?'}", number(row["loss"]),
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "—",
                     clock(duration)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(r, widths, strict=True)).rstrip() for r in rows]
    return f"{len(runs)} run(s) under {where}, newest first:\n" + "\n".join(lines)


# -- the commands -------------------------------------------------------------------------------
class LineCommands:
    """The line commands of one kernel; it remembers this kernel's background runs to stop them."""

    def __init__(self, state: KernelState) -> None:
        self._state = state
        self._handles: dict[Path, RunHandle] = {}

    def remember(self, value: Any) -> None:
        """Keep a background run's handle: its own supervisor stops it (the dashboard's Stop)."""
        if isinstance(value, RunHandle):
            self._handles = {path: h for path, h in self._handles.items() if h.running}
            self._handles[value.run_dir.resolve()] = value

    def run(self, line: str) -> Any:
        args = parse_command(line)
        if args.command in ("workers", "shutdown", "restart"):
            return _workers_command(args.command, self._state.pool)
        root = _root(args)
        if args.command == "runs":
            print(runs_table(root))
            return None
        if args.command == "compare":
            from nbtrain.compare import show_comparison

            runs = [find_run(root, spec) for spec in args.runs]
            repeated = sorted({run.run_id for run in runs if runs.count(run) > 1})
            if repeated:
                raise UsageError(f"%bigtrain compare: {', '.join(repeated)} named more than once "
                                 f"({' '.join(args.runs)}). Fix: name each run once")
            show_comparison(runs)
            return None
        run = find_run(root, args.runs)
        if args.command == "show":
            return RunResult(run.path)
        if args.command == "attach":
            return self.attach(run)
        return self.stop(run)

    def stop_function(self, run: RunDirectory) -> Callable[[], None]:
        """Return how to stop `run` without waiting: this kernel's supervisor, else the server's stop."""
        handle = self._handles.get(run.path.resolve())
        if handle is not None and handle.running:
            return lambda: handle.stop(timeout=0)  # asks its supervisor, returns at once

        def stop_elsewhere() -> None:  # a click handler must not block the kernel for the grace period
            threading.Thread(target=_stop_quietly, args=(run, ATTACHED_STOP_REASON), daemon=True).start()
        return stop_elsewhere

    def stop(self, run: RunDirectory) -> None:
        """Stop a running run and wait until it has ended; say so if it already had."""
        status = run.status()
        if status.get("state") in FINAL_STATES:
            reason = f" ({status['reason']})" if status.get("reason") else ""
            print(f"run {run.run_id} has already ended: {status['state']}{reason}; nothing to stop")
            return
        handle = self._handles.get(run.path.resolve())
        if handle is not None and handle.running:
            handle.stop(timeout=STOP_WAIT_S)
        else:
            _wait_for_workers(run)
            _stop_other_kernels_run(run)
        final = run.status()
        print(f"run {run.run_id}: {final.get('state', 'unknown')} ({final.get('reason', '')})")

    def attach(self, run: RunDirectory) -> None:
        """Show `run`'s dashboard: live (and kept live by a thread) while it runs, else its final picture."""
        from nbtrain.dashboard.widget import Dashboard

        dashboard = Dashboard()
        final = run.status().get("state") in FINAL_STATES
        dashboard.started(run, None, None if final else self.stop_function(run))
        if final:
            dashboard.progress(_progress_of(run))  # sees the end: the picture and the table
            return
        threading.Thread(target=_follow, args=(run, dashboard), name=f"bigtrain-attach-{run.run_id}",
                         daemon=True).start()


def _progress_of(run: RunDirectory) -> Progress:
    status = run.status()
    started = status.get("started") or status.get("created") or time.time()
    return Progress(elapsed_s=(status.get("ended") or time.time()) - started)


def _follow(run: RunDirectory, dashboard: Dashboard) -> None:
    """Tick an attached dashboard until the run ends (its last tick turns it into the picture)."""
    while run.status_file.exists():  # a deleted run folder ends the following too
        final = run.status().get("state") in FINAL_STATES
        dashboard.progress(_progress_of(run))
        if final:
            return
        time.sleep(ATTACH_TICK_S)


def _wait_for_workers(run: RunDirectory) -> None:
    """Wait while a run is starting: its workers' pids are written once they are launched."""
    deadline = time.monotonic() + STOP_WAIT_S
    while run.status().get("state") == "starting" and time.monotonic() < deadline:
        time.sleep(0.2)


def _stop_other_kernels_run(run: RunDirectory, reason: str = STOPPED_REASON) -> None:
    """Stop a run this kernel does not supervise as JupyterLab's Stop does: signal its workers' group."""
    import asyncio

    from nbtrain.server.runs import RequestError
    from nbtrain.server.workers import stop_run

    failure: list[RequestError] = []

    def stop() -> None:
        try:
            asyncio.run(stop_run(run, STOP_GRACE_S, reason=reason))
        except RequestError as e:
            failure.append(e)

    # A cell runs inside the kernel's event loop: the server's coroutine gets a loop of its own, on a thread.
    thread = threading.Thread(target=stop, name=f"bigtrain-stop-{run.run_id}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise UsageError(f"%bigtrain stop {run.run_id}: {failure[0]}")


def _stop_quietly(run: RunDirectory, reason: str) -> None:
    try:
        _stop_other_kernels_run(run, reason)
    except UsageError as e:  # from a Stop click: no cell to raise in, so say it in the output
        print(e)


def _workers_command(command: str, pool: WorkerPool) -> None:
    if command == "workers":
        from nbtrain.magic import describe_workers

        rows = pool.describe()
        print(slurm_workers_table(rows) if rows and "node" in rows[0] else describe_workers(rows))
    else:
        print(pool.shutdown() + ("; the next run starts on fresh workers" if command == "restart" else ""))


def slurm_workers_table(rows: list[dict[str, Any]]) -> str:
    """Return the `%bigtrain workers` table of warm tasks on a SLURM allocation: rank, node."""
    first = rows[0]
    owner = "nbtrain's own allocation, released when they end" if first["owned"] else "the kernel's allocation"
    nodes = sorted({row["node"] for row in rows})
    lines = [f"warm workers: {len(rows)} SLURM tasks on {len(nodes)} node(s) ({', '.join(nodes)}) of job "
             f"{first['job']} ({owner}), {first['nproc']} per node ({first['backend']}), {first['runs_served']} "
             f"run(s) served, idle {first['idle_s']:.0f} s, ended after {first['ends_in_s']:.0f} s more without a run",
             "rank  node"]
    lines += [f"{row['rank']:<5} {row['node']}" for row in rows]
    return "\n".join(lines)

