"""The `%%bigtrain` cell magic (and `%bigtrain` line commands): parse, plan, run, return."""

from __future__ import annotations

import html
import sys
import time
from collections.abc import Mapping
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import DisplayHandle, display

from nbtrain.commands import COMMANDS_HELP, LineCommands
from nbtrain.config.arguments import build_parser, parse_line
from nbtrain.config.machine import detect_machine
from nbtrain.config.plan import RunPlan, load_base, plan_run
from nbtrain.dashboard.widget import Dashboard
from nbtrain.errors import ConfigError, ShippingError
from nbtrain.launch.run import KernelState, Progress, start_run
from nbtrain.result import RunResult
from nbtrain.rundir import RunDirectory

PROGRESS_EVERY_S = 0.5


class NotebookSink:
    """Shows a run in the cell output: rank 0's prints as they come, and one live progress line.

    The progress line is a display that is updated in place, so nothing else in the
    output (prints, warnings) is ever wiped.
    """

    def __init__(self) -> None:
        self._handle: DisplayHandle | None = None
        self._last = 0.0

    def started(self, run: RunDirectory, plan: RunPlan, stop: Any = None) -> None:
        for notice in plan.notices:
            print(f"bigtrain: {notice}")
        print(f"bigtrain: run {run.run_id}: {plan.world_size} processes, run directory {run.path}", flush=True)
        self._handle = display(self._bundle(Progress(), "starting"), raw=True, display_id=True)

    def output(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def progress(self, progress: Progress) -> None:
        now = time.monotonic()
        if self._handle is not None and now - self._last >= PROGRESS_EVERY_S:
            self._last = now
            self._handle.update(self._bundle(progress, "running"), raw=True)

    def finished(self, result: RunResult) -> None:
        if self._handle is not None:
            from nbtrain.launch.run import read_progress

            final = read_progress(RunDirectory(result.run_dir))  # the final numbers, read once
            self._handle.update(self._bundle(final, result.status), raw=True)

    @staticmethod
    def _bundle(progress: Progress, state: str) -> dict[str, str]:
        text = f"[{state}] {progress.line()}"
        return {"text/plain": text, "text/html": f"<pre>{html.escape(text)}</pre>"}


def _help() -> str:
    return (
        "Train the cell's code with DeepSpeed on N worker processes.\n\n"
        "Inside the cell, `bigtrain` is the run: bigtrain.prepare(model, data) -> (engine, loader),\n"
        "bigtrain.fit(model, data, loss_fn=None, eval_data=None), bigtrain.log(**scalars),\n"
        "bigtrain.rank / .world_size / .is_main / .device / .config / .max_steps.\n\n"
        + COMMANDS_HELP + "\n"
        + build_parser().format_help()
    )


@magics_class
class BigTrainMagics(Magics):
    """The `%%bigtrain` magic."""

    @line_cell_magic
    def bigtrain(self, line: str, cell: str | None = None) -> Any:
        if cell is None:
            return self._commands.run(line)
        try:
            cfg = parse_line(line)
            plan = plan_run(cfg, detect_machine(), self._config_source(cfg.config))
        except ConfigError as e:
            raise UsageError(str(e)) from None
        if cfg.dry_run:
            print(plan.describe())
            return None
        try:
            sink = NotebookSink() if cfg.no_plot else Dashboard()
            result = start_run(plan, cell, self._user_namespace(), sink, self.state)
        except (ShippingError, ConfigError) as e:  # ConfigError: a host of a multi-node run is unreachable
            raise UsageError(str(e)) from None
        self._commands.remember(result)  # `%bigtrain stop` stops a background run through its supervisor
        return result

    bigtrain.__doc__ = _help()

    def __init__(self, shell: Any = None, **kwargs: Any):
        super().__init__(shell=shell, **kwargs)
        self.state = KernelState()  # this kernel's warm workers, for its runs and its line commands
        self._commands = LineCommands(self.state)

    def _user_namespace(self) -> dict[str, Any]:
        assert self.shell is not None, "the magic runs inside an IPython shell"
        return self.shell.user_ns  # type: ignore[no-any-return]

    def _config_source(self, name: str | None) -> Mapping[str, Any] | None:
        """Resolve `--config`: a dict or ConfigPanel variable of the notebook, else a JSON file."""
        if name is None:
            return None
        value = self._user_namespace().get(name) if name.isidentifier() else None
        if value is None:
            return load_base(name)
        if hasattr(value, "to_deepspeed"):
            value = value.to_deepspeed()
        if not isinstance(value, Mapping):
            raise ConfigError([_config_type_problem(name, value)])
        return value


def describe_workers(rows: list[dict[str, Any]]) -> str:
    """Return the `%bigtrain workers` table of the warm workers."""
    if not rows:
        return "no warm workers: the next run starts fresh ones"
    if "dropped" in rows[0]:  # a worker of the idle group had ended: never shown as warm
        return f"no warm workers: {rows[0]['dropped']}; the next run starts fresh ones"
    from nbtrain.launch.pool import gpu_memory_text

    first = rows[0]
    on_gpus = first.get("gpu_memory") is not None  # NVML per process; no column without GPUs
    lines = [f"warm workers: {first['nproc']} processes ({first['backend']}), {first['runs_served']} run(s) "
             f"served, idle {first['idle_s']:.0f} s, ended after {first['ends_in_s']:.0f} s more without a run",
             "rank  pid      memory     age" + ("       GPU memory" if on_gpus else "")]
    for row in rows:
        memory = "gone" if row["rss_mib"] is None else f"{row['rss_mib']:.0f} MiB"
        age = f"{row['age_s']:.0f} s"
        lines.append(f"{row['rank']:<5} {row['pid']:<8} {memory:<10} "
                     + (f"{age:<9} {gpu_memory_text(row['gpu_memory'])}" if on_gpus else age))
    return "\n".join(lines)


def _config_type_problem(name: str, value: Any) -> Any:
    from nbtrain.errors import Problem

    return Problem("--config", name, f"the variable is a {type(value).__name__}, not a dict or ConfigPanel",
                   "pass a DeepSpeed dict, a ConfigPanel, or a JSON file path")
