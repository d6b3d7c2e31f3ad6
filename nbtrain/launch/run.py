"""Run a planned cell on worker processes and supervise it until it ends.

`start_run(plan, cell, namespace, sink)` is the API that the magic, the config panel and
the tests call. It writes the run directory, launches the workers, relays rank 0's output
and progress to a `ProgressSink` while they train, stops every worker however the run
ends, and returns a `RunResult`. No IPython here: the sink decides how things are shown.
"""

from __future__ import annotations

import codecs
import dataclasses
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from nbtrain.config.plan import RunPlan
from nbtrain.config.tree import DEFAULT_HANG_TIMEOUT_S, DEFAULT_KEEP_WARM_S, DEFAULT_RUN_ROOT
from nbtrain.dashboard.fmt import clock
from nbtrain.errors import RunFailed
from nbtrain.launch import shipping
from nbtrain.launch.pool import WorkerPool, Workers
from nbtrain.result import RunResult
from nbtrain.rundir import RunDirectory, new_run_id, read_json, write_json_atomic
from nbtrain.rundir.heartbeats import find_hang, read_heartbeats
from nbtrain.rundir.layout import LOG, rank_file
from nbtrain.rundir.progress import StepReader, planned_steps, read_startup

POLL_S = 0.2  # exits and Stop
# Rank 0's output and progress, to the sink: a value a worker logs is in the dashboard's widgets
# within this (p95 ~0.4 s, goal 0.5 s: benchmarks/dashboard.py). Each relay costs the kernel's
# CPU (~1-2 ms with the dashboard on 2 busy cores), which comes out of training: no more often.
RELAY_EVERY_S = 0.4
HANG_CHECK_EVERY_S = 1.0
# After one rank fails, the others get this long to write their own error before the stop.
FAILURE_GRACE_S = 1.0


@dataclass(frozen=True)
class Progress:
    """Where a run stands, as the progress line shows it."""

    step: int = 0
    max_steps: int | None = None
    loss: float | None = None
    lr: float | None = None
    samples_per_s: float | None = None
    elapsed_s: float = 0.0
    eta_s: float | None = None  # nbtrain.rundir.progress's: the same as every other view shows
    phase: str = ""  # the start-up phase, until the first step (nbtrain.rundir.progress.Startup.line)

    def line(self) -> str:
        total = f"/{self.max_steps}" if self.max_steps else ""
        parts = [f"step {self.step}{total}"] + ([self.phase] if self.phase else [])
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.3g}")
        if self.samples_per_s is not None:
            parts.append(f"{self.samples_per_s:.1f} samples/s")
        parts.append(f"elapsed {clock(self.elapsed_s)}")
        if self.eta_s is not None:
            parts.append(f"ETA {clock(self.eta_s)}")  # the dashboard's clock: the same ETA reads the same
        return " | ".join(parts)


class ProgressSink(Protocol):
    """Receives what a run shows while it goes (the magic shows it in the cell output).

    A sink that reads the run directory itself sets `reads_run_directory = True` (the
    dashboard): the supervisor then does not read rank 0's metrics for it, and its
    `progress` gets a fresh `elapsed_s` only.
    """

    def started(self, run: RunDirectory, plan: RunPlan, stop: Callable[[], None]) -> None: ...
    def output(self, text: str) -> None: ...
    def progress(self, progress: Progress) -> None: ...
    def finished(self, result: RunResult) -> None: ...


class PrintSink:
    """A ProgressSink for scripts: prints output and a progress line every few seconds."""

    def __init__(self, every_s: float = 5.0):
        self.every_s, self._last = every_s, 0.0

    def started(self, run: RunDirectory, plan: RunPlan, stop: Callable[[], None]) -> None:
        print(f"bigtrain: run {run.run_id} on {plan.world_size} processes ({run.path})", flush=True)

    def output(self, text: str) -> None:
        print(text, end="", flush=True)

    def progress(self, progress: Progress) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            print(progress.line(), flush=True)

    def finished(self, result: RunResult) -> None:
        print(result.summary(), flush=True)


class _RunWatcher:
    """Reads what the workers write (rank 0's output and metrics) as they write it."""

    def __init__(self, run: RunDirectory, started: float):
        self.run, self.started = run, started
        self._out: IO[bytes] | None = None  # rank 0's output, kept open: a relay reads it without opening it
        self._steps = StepReader(run.metrics_file(0))
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.progress = Progress()
        self.first_step_time: float | None = None

    def new_output(self) -> str:
        if self._out is None:
            try:
                self._out = open(self.run.output_file(0), "rb", buffering=0)
            except FileNotFoundError:
                return ""
        return self._decoder.decode(self._out.read() or b"")

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def new_progress(self) -> Progress:
        steps = self._steps
        records = steps.read()
        changes: dict[str, Any] = {"elapsed_s": time.time() - self.started, "step": steps.step}
        changes.update({key: steps.latest[key] for key in ("loss", "lr", "samples_per_s")
                        if steps.latest[key] is not None})
        self.first_step_time = steps.first_step_time
        max_steps = self.progress.max_steps
        if records and max_steps is None:
            max_steps = changes["max_steps"] = planned_steps(read_json(self.run.effective_deepspeed_file),
                                                             self.run.run_info())
        changes["eta_s"] = steps.eta_s(max_steps)
        startup = read_startup(self.run, steps.step) if steps.step == 0 else None  # two small reads, until step 1
        changes["phase"] = startup.line(time.time()) if startup else ""
        self.progress = dataclasses.replace(self.progress, **changes)
        return self.progress


def read_progress(run: RunDirectory) -> Progress:
    """Return where `run` stands now, as the cell's progress line shows it (its final numbers once it ended)."""
    return _RunWatcher(run, run.status().get("started", time.time())).new_progress()


def create_run_directory(plan: RunPlan, cell: str, inputs: bytes) -> RunDirectory:
    """Write everything the workers need before they start."""
    cfg = plan.config
    root = Path(cfg.run_dir or DEFAULT_RUN_ROOT)
    run = RunDirectory.create(root, new_run_id(cfg.name), {
        "name": cfg.name, "created": time.time(), "nproc": plan.world_size,
        "nproc_per_host": plan.nproc, "hosts": [h.name for h in plan.hosts] or ["localhost"],
        "config": dataclasses.asdict(cfg), "kernel_pid": os.getpid(), "cwd": os.getcwd(),
        "python": sys.executable, "resume_from": plan.resume_from, "machine": plan.machine.as_record(),
    })
    write_json_atomic(run.deepspeed_file, plan.deepspeed)
    run.cell_file.write_text(cell)
    run.inputs_file.write_bytes(inputs)
    return run


@dataclass
class KernelState:
    """What one kernel keeps from run to run: its warm workers (owned by the magics object).

    Every run of the kernel (foreground, background, the line commands) must see the same
    pool, so the magics object makes one and passes it along; nothing here is module state.
    """

    pool: WorkerPool = field(default_factory=WorkerPool)


class ActiveRun:
    """A launched run and its supervision: the same code for foreground and background."""

    def __init__(self, plan: RunPlan, run: RunDirectory, workers: Workers, sink: ProgressSink, started: float,
                 pool: WorkerPool):
        self.plan, self.run, self.workers, self.sink, self.started = plan, run, workers, sink, started
        self.pool = pool  # where the workers of a succeeded run wait for the next one
        self.group = workers.group
        self.timings = {"launch_s": time.time() - started}
        self.watcher = _RunWatcher(run, started)
        self.stop_requested = threading.Event()
        self.outcome: tuple[str, str, int | None] | None = None

    def request_stop(self) -> None:
        """Ask the supervisor to stop the run (the dashboard's Stop button calls this)."""
        self.stop_requested.set()

    def supervise(self) -> tuple[str, str, int | None]:
        """Relay output and progress until the run ends; stop every worker unless it succeeded.

        The workers of a succeeded run stay warm for the next one (`nbtrain.launch.pool`), unless
        `--keep-warm 0`; a failed, stopped or interrupted run's workers are all ended.
        """
        state = "failed"
        try:
            state, reason, failed_rank = _supervise(self)
        except KeyboardInterrupt:
            stop_s = self.group.stop()
            self.run.finish("stopped", f"interrupted from the notebook; workers stopped in {stop_s:.1f} s",
                            timings=_timings(self.timings, self.watcher, self.started))
            self.watcher.close()
            raise
        finally:
            if state == "succeeded":
                self.group.release_reserve()
                keep = self.plan.config.keep_warm
                self.pool.keep(self.workers, 0 if self.plan.hosts else DEFAULT_KEEP_WARM_S if keep is None else keep)
            else:
                self.group.stop()
                self.group.close()
        self.outcome = (state, reason, failed_rank)
        self.run.finish(state, reason, failed_rank=failed_rank,
                        timings=_timings(self.timings, self.watcher, self.started))
        try:
            _relay(self.watcher, self.sink)
        finally:
            self.watcher.close()
        return self.outcome

    def result(self, namespace: MutableMapping[str, Any]) -> RunResult:
        """Bind `--out` values (after success) and return the result; raise RunFailed otherwise."""
        assert self.outcome is not None, "the run has not ended"
        state, _, failed_rank = self.outcome
        bound: tuple[str, ...] = ()
        if state == "succeeded":
            bound, out_problem = _bind_outputs(self.run, self.plan.config.out, namespace)
            if out_problem:
                self.run.write_status(reason=out_problem)
        result = RunResult(self.run.path, outputs=bound, notices=self.plan.notices)
        self.sink.finished(result)
        if state != "succeeded":
            raise RunFailed.from_run(result, failed_rank)
        if self.plan.config.out and not bound:
            raise RunFailed(f"the run succeeded but nothing was bound: {self.run.status()['reason']}")
        return result


def launch(plan: RunPlan, cell: str, namespace: MutableMapping[str, Any], sink: ProgressSink,
           state: KernelState) -> ActiveRun:
    """Write the run directory and start the workers of `cell`."""
    started = time.time()
    inputs = shipping.dumps(shipping.collect(cell, namespace))
    if plan.hosts:
        from nbtrain.launch.cluster import preflight

        preflight(plan.hosts, plan.launcher, plan.nproc)
    if plan.launcher == "slurm":
        from nbtrain.launch import slurm

        slurm.preflight(plan, os.environ)
    run = create_run_directory(plan, cell, inputs)
    workers = state.pool.start(run, plan, last=plan.config.keep_warm == 0 or bool(plan.hosts))
    run.write_status(state="running", started=started, pids=workers.group.pids, port=workers.group.port,
                     workers={"warm": workers.warm, "note": workers.note,
                              "runs_served": workers.group.runs_served})
    active = ActiveRun(plan, run, workers, sink, started, state.pool)
    sink.started(run, plan, active.request_stop)
    return active


def start_run(plan: RunPlan, cell: str, namespace: MutableMapping[str, Any], sink: ProgressSink,
              state: KernelState) -> RunResult:
    """Run `cell` as planned (on `state`'s warm workers when they fit); bind `--out` names in `namespace` on success.

    With `--background` it returns a RunHandle at once; the run is supervised by a thread.
    Raises RunFailed when a rank fails (every worker is stopped first) and
    KeyboardInterrupt, after stopping every worker, when the kernel is interrupted.
    """
    active = launch(plan, cell, namespace, sink, state)
    if plan.config.background:
        return RunHandle(active, namespace)
    active.supervise()
    return active.result(namespace)


class RunHandle(RunResult):
    """A background run: its RunResult, plus `wait()` and `stop()`.

    >>> handle = _                                  # doctest: +SKIP
    >>> handle.status, len(handle.metrics)          # doctest: +SKIP
    >>> handle.wait()                               # doctest: +SKIP
    """

    def __init__(self, active: ActiveRun, namespace: MutableMapping[str, Any]):
        super().__init__(active.run.path, notices=active.plan.notices)
        self._active, self._namespace = active, namespace
        self._final: RunResult | None = None
        self._thread = threading.Thread(target=self._watch, name=f"bigtrain-{active.run.run_id}", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            self._active.supervise()
        except BaseException as e:  # noqa: BLE001 - the run directory says what happened
            self._active.run.finish("failed", f"nbtrain's supervisor failed: {e!r}")
            self._active.outcome = ("failed", repr(e), None)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float | None = 60) -> None:
        """Stop the run: every worker ends, the status becomes 'stopped', metrics are kept."""
        self._active.request_stop()
        self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> RunResult:
        """Block until the run ends; bind `--out` values; raise RunFailed if it failed."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"run {self.run_id} still running after {timeout} s")
        if self._final is None:
            self._final = self._active.result(self._namespace)
            self.outputs = self._final.outputs
        return self._final

    def summary(self) -> str:
        text = super().summary()
        return text + ("\n  running in the background: .wait(), .stop(), .metrics" if self.running else "")


def _timings(timings: dict[str, float], watcher: _RunWatcher, started: float) -> dict[str, float]:
    watcher.new_progress()  # read the last records: a short run can end between two relays
    done = dict(timings)
    if watcher.first_step_time is not None:
        done["first_step_s"] = watcher.first_step_time - started
    done["total_s"] = time.time() - started
    return done


def _relay(watcher: _RunWatcher, sink: ProgressSink) -> None:
    text = watcher.new_output()
    if text:
        sink.output(text)
    if getattr(sink, "reads_run_directory", False):  # the dashboard: it reads the metrics itself
        sink.progress(dataclasses.replace(watcher.progress, elapsed_s=time.time() - watcher.started))
    else:
        sink.progress(watcher.new_progress())


def _supervise(active: ActiveRun) -> tuple[str, str, int | None]:
    """Relay output and progress until every rank succeeded, one failed, or a stop was asked."""
    group, watcher, sink = active.group, active.watcher, active.sink
    poll_ui = getattr(sink, "poll_ui", None) if threading.current_thread() is threading.main_thread() else None
    next_relay = last_hang_check = time.monotonic()
    while True:
        # The kernel shares the machine's cores with the workers: it reads the run directory
        # only as often as a user can see (RELAY_EVERY_S, on a fixed beat: the wait for the
        # next read is what a value's delay to the dashboard is made of), and checks
        # heartbeats as often as they are written; exits and Stop are looked at every tick.
        now = time.monotonic()
        if now >= next_relay:
            _relay(watcher, sink)
            next_relay = _next_beat(next_relay, now)
        if poll_ui is not None:
            poll_ui()  # a Stop click reaches us only if the busy kernel is asked to look
        if active.stop_requested.is_set():
            stop_s = group.stop()
            return "stopped", f"stopped from the notebook; workers stopped in {stop_s:.1f} s", None
        codes = group.exit_codes()
        if all(code == 0 for code in codes):
            return "succeeded", "", None
        hang = None
        if now - last_hang_check >= HANG_CHECK_EVERY_S:
            hang, last_hang_check = _hang(active), now
        if hang is not None:
            group.stop()
            return "failed", hang[1], hang[0]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            if not group.failure:  # a lost host's rank says nothing: the others' errors follow from it
                deadline = time.monotonic() + FAILURE_GRACE_S
                while None in group.exit_codes() and time.monotonic() < deadline:
                    time.sleep(0.05)
            codes = group.exit_codes()  # before our own stop signals muddy them
            group.stop()
            status = watcher.run.status()
            if status.get("state") == "stopped":  # stopped from outside, e.g. JupyterLab's Stop
                return "stopped", str(status.get("reason", "stopped")), None
            if group.failure:
                return "failed", group.failure, group.failed_rank
            return ("failed", *_failure_reason(watcher.run, codes))
        time.sleep(max(0.0, min(next_relay, now + POLL_S) - time.monotonic()))


def _next_beat(due: float, now: float) -> float:
    """Return when the relay after the one due at `due` is due: one beat later, or one beat from `now` if late."""
    due += RELAY_EVERY_S
    return due if due > now else now + RELAY_EVERY_S


def _hang(active: ActiveRun) -> tuple[int, str] | None:
    """Return the hung rank and why, once a rank waited for a silent one past --hang-timeout."""
    timeout = active.plan.config.hang_timeout or DEFAULT_HANG_TIMEOUT_S
    return find_hang(read_heartbeats(active.run.path, active.plan.world_size), timeout, time.time())


def _failure_reason(run: RunDirectory, codes: list[int | None]) -> tuple[str, int]:
    """Name the rank whose failure ended the run, and why.

    A rank killed by a signal (before nbtrain stopped anything) is the cause: its peers'
    errors ("connection closed by peer") are consequences. So is a full disk: a peer's write
    failing on it may not say so (torch.save drops the errno, and the room the failing save
    gives back can hide the cause from the later rank), and its report may come first.
    Otherwise the earliest error.
    """
    for rank, code in enumerate(codes):
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            hint = " (the out-of-memory killer sends this)" if name == "SIGKILL" else ""
            return f"rank {rank} was killed by {name}{hint}", rank
    errors = run.errors()
    if errors:
        full = [r for r in errors if errors[r].get("disk_full")]
        rank = min(full or errors, key=lambda r: errors[r].get("time", 0))
        report = errors[rank]
        where = f" (cell line {report['cell_line']})" if report.get("cell_line") else ""
        if report.get("disk_full"):
            return (f"{report['disk_full']}: rank {rank} could not write{where} and training stopped; "
                    "the metrics and checkpoints written before are intact"), rank
        return f"rank {rank} raised {report['type']}: {report['message']}{where}", rank
    rank = next(r for r, code in enumerate(codes) if code not in (None, 0))
    return f"rank {rank} exited with code {codes[rank]} without a Python error (see {rank_file(LOG, rank)})", rank


def _bind_outputs(run: RunDirectory, names: tuple[str, ...],
                  namespace: MutableMapping[str, Any]) -> tuple[tuple[str, ...], str | None]:
    """Bind rank 0's `--out` values; bind nothing if any of them is missing."""
    if not names:
        return (), None
    if run.run_info().get("config", {}).get("qat") not in (None, "none"):
        # A QAT model unpickles torchao, whose import prints noise about CUDA-only kernels.
        from nbtrain.quantization import import_torchao

        import_torchao()
    with open(run.outputs_file, "rb") as f:
        sent = pickle.load(f)
    if sent["problems"]:
        problems = "; ".join(f"--out {name}: {why}" for name, why in sent["problems"].items())
        return (), f"{problems} (nothing was bound)"
    namespace.update(sent["values"])
    return tuple(sent["values"]), None
