"""One worker process: run cells on this rank, report, and leave nothing behind.

Started by `nbtrain.launch.launcher` as `python -m nbtrain.worker FIRST_RUN_DIR RANK`; each run's
directory then arrives as one JSON line on stdin. What the kernel side (`nbtrain.launch.run`,
`nbtrain.launch.launcher`) relies on:
`done` on the report pipe = the cell succeeded on this rank (rank 0 has written the `--out` values);
exit 1 = the cell raised (errors/rank-N.json says where); any other exit = killed;
`ready` = warm again for the next run; `retire REASON` = ending instead (a clean-up that
failed says so: it never ends the process with an error); exit 0 = stdin closed.
"""

from __future__ import annotations

import errno
import json
import linecache
import os
import pickle
import shutil
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from nbtrain.worker.timeline import Timeline

CELL_FILENAME = "<bigtrain cell>"
# What a full disk looks like from a write; the kernel shows these words as the reason.
_DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
              errno.EFBIG: "file size limit exceeded"}
# Below this many free bytes, a failed write (torch.save loses the errno) counts as a full disk.
_NEARLY_FULL_BYTES = 1 << 20


# Library chatter printed during the cell ("op built successfully", logger lines) goes to
# the log only; the notebook shows what the user's code prints.
_LIBRARY_PARTS = ("/deepspeed/", "/accelerate/", "/transformers/", "/torch/", "/logging/", "/warnings.py")


class _Tee:
    """Write the cell's prints to the log, and the user's own prints also to the notebook's stream."""

    def __init__(self, log: Any, user: Any):
        self._log, self._user = log, user

    def write(self, text: str) -> int:
        self._log.write(text)
        caller = sys._getframe(1).f_code.co_filename
        if not any(part in caller for part in _LIBRARY_PARTS):
            self._user.write(text)
        return len(text)

    def flush(self) -> None:
        self._log.flush()
        self._user.flush()

    def isatty(self) -> bool:
        return False


@dataclass
class CurrentRun:
    """The run this worker is working on, if any (the kernel watcher marks it stopped), and its timeline.

    One per worker process, made by `main` and handed to the threads that read it.
    """

    path: Path | None = None
    timeline: Timeline | None = None  # the op-build watcher marks the current run's


def watch_kernel(alive_fd: int, rank: int, current: CurrentRun) -> None:
    """End this process when the kernel dies (its end of the liveness pipe closes)."""

    def wait_for_eof() -> None:
        while os.read(alive_fd, 1):
            pass
        if rank == 0 and current.path is not None:
            from nbtrain.rundir import RunDirectory

            RunDirectory(current.path).finish("stopped", "the kernel died or restarted; the workers ended themselves")
        os._exit(3)

    threading.Thread(target=wait_for_eof, name="nbtrain-kernel-watch", daemon=True).start()


def error_report(exc: BaseException, rank: int, cell_source: str) -> dict[str, Any]:
    """Return the rank's error with the traceback trimmed to the user's code."""
    frames = traceback.extract_tb(exc.__traceback__)
    # Drop the frames of this module that exec'd the cell; keep the user's and libraries'.
    while frames and frames[0].filename == __file__:
        frames.pop(0)
    cell_lines = [f.lineno for f in frames if f.filename == CELL_FILENAME]
    text = "Traceback (most recent call last):\n" + "".join(traceback.format_list(frames))
    text += "".join(traceback.format_exception_only(type(exc), exc))
    return {"rank": rank, "type": type(exc).__name__, "message": str(exc), "traceback": text,
            "cell_line": cell_lines[-1] if cell_lines else None, "time": time.time()}


def disk_full(exc: BaseException, run_path: Path) -> str | None:
    """Return "no space left on device in PATH" when `exc` came from a full disk, else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_FULL:
            return f"{_DISK_FULL[seen.errno]} in {seen.filename or run_path}"
        seen = seen.__cause__ or seen.__context__
    try:
        free = shutil.disk_usage(run_path).free
    except OSError:
        return None
    return f"no space left on device in {run_path}" if free < _NEARLY_FULL_BYTES else None


def main(first_run: Path, rank: int | None = None) -> int:
    """Join the process group, then run each job the kernel sends (a line on stdin per run) until stdin closes.

    The first job is the run the workers were started for; later ones reuse this warm
    process (issue: warm workers). After a job this worker reports `done` on its report pipe
    (the run succeeded on this rank), puts the process back as it was before the run, and
    reports `ready` (or `retire REASON` and ends, when it cannot).

    Started by a multi-node runner (DeepSpeed's pdsh runner, mpirun, srun) there is no pipe
    to the kernel: the worker runs `first_run` only, says `done` with `results/rank-N.done`,
    and its host's relay (`nbtrain.relay`) carries its files and ends it if the head goes silent.
    """
    from nbtrain.launch.launcher import ALIVE_FD_ENV, REPORT_FD_ENV
    from nbtrain.worker.slurm import from_srun

    python_started = time.time()
    srun_reports = from_srun()  # started by srun: the rank from SLURM's variables, reports on srun's stdout
    rank = int(os.environ["RANK"]) if rank is None else rank
    current = CurrentRun(first_run)
    if ALIVE_FD_ENV in os.environ:
        watch_kernel(int(os.environ[ALIVE_FD_ENV]), rank, current)
    report: Any = srun_reports or (os.fdopen(int(os.environ[REPORT_FD_ENV]), "w", buffering=1)
                                   if REPORT_FD_ENV in os.environ else None)
    jobs: Iterable[str] = sys.stdin if report is not None else [json.dumps(
        {"run": str(first_run), "launched_at": float(os.environ.get("NBTRAIN_LAUNCHED_AT", "nan")), "last": True})]
    current.path = first_run
    current.timeline = _timeline(first_run, rank)
    current.timeline.mark("python_started", python_started)  # the views now say "imports"
    try:
        join_process_group(current)
    except BaseException as exc:  # noqa: BLE001 - reported like a failure of the first run's cell
        _fail(exc, first_run, rank, "")
    from nbtrain.worker.isolation import ProcessState

    clean = ProcessState.capture()
    runs = 0
    for line in jobs:  # blocks while idle: no busy loop
        job = json.loads(line)
        if report is not None:
            report.write("started\n")  # a warm group whose worker died while idle is replaced at once
        current.path = Path(job["run"])
        timeline = current.timeline = current.timeline or _timeline(current.path, rank)
        timeline.mark("launched", job["launched_at"], publish=False)
        timeline.mark("job_received")
        context = run_job(current.path, rank, timeline)
        runs += 1
        if report is not None:
            report.write("done\n")
        else:
            from nbtrain.rundir import RunDirectory, write_json_atomic

            write_json_atomic(RunDirectory(current.path).done_file(rank), {"rank": rank, "time": time.time()})
        finished_run = current.path
        current.path = current.timeline = None
        if job.get("last"):
            # Across hosts a rank that tears down while rank 0 still writes its results can
            # abort at exit: wait for every rank first.
            _teardown(context, barrier=True)
            break
        finished = [context]
        del context  # clean_up holds the run's last reference, and drops it before releasing memory
        why_not = clean_up(finished, clean, runs, finished_run)
        assert report is not None  # only a job channel sends a job that is not the last
        report.write(f"retire {why_not}\n" if why_not else "ready\n")
        if why_not:
            break
    _teardown(None)
    # Skip interpreter finalisation: C++ threads of the comm backends abort the process
    # ("terminate called without an active exception") when destroyed at exit.
    sys.__stdout__.flush()  # type: ignore[union-attr]
    sys.__stderr__.flush()  # type: ignore[union-attr]
    os._exit(0)


def join_process_group(current: CurrentRun) -> None:
    """Import the libraries and join the process group once for every run, marking both in the run's timeline."""
    # Imported before any cell: their loggers must bind the real stdout, not the tee.
    import accelerate  # noqa: F401
    import deepspeed  # noqa: F401
    import torch
    from accelerate.state import PartialState

    from nbtrain.launch.launcher import COLLECTIVE_TIMEOUT_ENV, ops_cache_dir
    from nbtrain.launch.ops import ask_cpuinfo_once
    from nbtrain.worker.timeline import watch_op_builds

    assert current.timeline is not None, "the first run's timeline is made before the imports"
    current.timeline.mark("imports_done")
    ask_cpuinfo_once(os.environ.get("TORCH_EXTENSIONS_DIR") or ops_cache_dir())
    # Before anything builds an op (the process group may build the shared-memory comm op),
    # and before the clean process state is captured: the watcher stays for every run.
    watch_op_builds(lambda: current.timeline)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # What accelerate's Accelerator would do in the cell (through deepspeed.comm); it then
    # finds the group up. Without an explicit backend accelerate leaves it unset on CPU.
    PartialState(backend=backend, timeout=timedelta(seconds=float(os.environ[COLLECTIVE_TIMEOUT_ENV])))


def _timeline(run_path: Path, rank: int) -> Timeline:
    """Return a new timeline for the run at `run_path`; rank 0's is published for the views."""
    from nbtrain.rundir import RunDirectory
    from nbtrain.worker.timeline import Timeline

    return Timeline(RunDirectory(run_path).timeline_file if rank == 0 else None)


def run_job(run_path: Path, rank: int, timeline: Timeline) -> Any:
    """Run the cell of `run_path` on this rank; return its BigTrain context. A failure ends the process."""
    from nbtrain.current import running
    from nbtrain.launch import shipping
    from nbtrain.rundir import RunDirectory, read_json
    from nbtrain.worker.heartbeat import Heartbeat
    from nbtrain.worker.utilization import start_sampler

    run = RunDirectory(run_path)
    _output_to(run.log_file(rank))
    heartbeat = Heartbeat(run_path, rank)
    heartbeat.start()
    sampler_stop = threading.Event()
    start_sampler(run, rank, stop=sampler_stop)
    info = run.run_info()
    os.chdir(info["cwd"])
    cell = run.cell_file.read_text()
    linecache.cache[CELL_FILENAME] = (len(cell), None, cell.splitlines(True), CELL_FILENAME)
    user_stream = open(run.output_file(rank), "a", buffering=1)
    bt = None
    try:
        from accelerate.utils import set_seed

        from nbtrain.config.tree import TrainConfig
        from nbtrain.worker.context import BigTrain

        cfg = TrainConfig(**_tupled(info["config"]))
        bt = BigTrain(run, cfg, read_json(run.deepspeed_file), timeline)
        heartbeat.context = bt
        with open(run.inputs_file, "rb") as f:
            inputs = pickle.load(f)
        namespace = shipping.install(inputs)
        namespace["bigtrain"] = bt
        set_seed(bt.seed)
        code = compile(cell, CELL_FILENAME, "exec")
        sys.stdout = _Tee(sys.__stdout__, user_stream)  # type: ignore[assignment]
        timeline.mark("cell_started", publish=False)
        with running(bt):  # `from nbtrain import bigtrain` in the user's own modules
            try:
                exec(code, namespace)
            finally:
                sys.stdout = sys.__stdout__
            bt.final_checkpoint()
            outputs = {name: bt.consolidated_out(namespace[name]) for name in cfg.out if name in namespace}
            missing = [name for name in cfg.out if name not in namespace]
            if rank == 0:
                _write_outputs(run, outputs, missing)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, then the process ends
        sys.stdout = sys.__stdout__
        _fail(exc, run_path, rank, cell)
    finally:
        user_stream.close()
    heartbeat.stop()
    sampler_stop.set()
    sys.__stdout__.flush()  # type: ignore[union-attr]
    return bt


def clean_up(finished: list[Any], clean: Any, run_number: int, run_path: Path) -> str | None:
    """Put this warm process back as `clean` recorded it; return why it cannot serve again, or None.

    `finished` holds the run's context, the last reference to it: it is dropped before the
    memory is released, so that nothing of the run (engine, model, optimizer, loader,
    namespace) keeps cached device memory. Never raises: a step that fails retires the
    workers, and the next run's summary says why.
    """
    try:
        return _clean_up(finished, clean, run_path)
    except Exception as exc:  # noqa: BLE001 - any failure retires the workers, with the reason
        traceback.print_exc()
        return f"clean-up after run {run_number} failed: {type(exc).__name__}: {exc}"


def _clean_up(finished: list[Any], clean: Any, run_path: Path) -> str | None:
    from accelerate.state import AcceleratorState, GradientState

    from nbtrain.rundir import RunDirectory
    from nbtrain.worker.isolation import kill_children, release_memory

    bt = finished.pop()
    notebook_dir = RunDirectory(run_path).run_info()["cwd"]  # the notebook's folder: its modules are the user's
    held = _run_objects(bt)
    _teardown(bt, keep_process_group=True)
    del bt
    # accelerate's singletons keep the finished run's plugin and settings in class-level dicts
    # (changed in place, so `restore` cannot see them); the process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    clean.destroy_new_process_groups()
    changed = clean.restore(notebook_dir)
    if changed:
        print(put_back_note(changed), flush=True)
    children = kill_children()
    if children:
        print(f"nbtrain: ended {len(children)} process(es) the run left running: {children}", flush=True)
    _forget_sources()
    release_memory()
    alive = [name for name, ref in held.items() if ref() is not None]
    print(f"nbtrain: still referenced after the run: {', '.join(alive)}" if alive
          else f"nbtrain: released the run's {', '.join(held)}", flush=True)
    threads = clean.leftover_threads()
    if threads:
        return f"the run left threads running ({', '.join(threads[:5])}); they cannot be stopped from outside"
    return None


def put_back_note(changed: list[str], shown: int = 200) -> str:
    """Return the log line naming what a run had changed and was put back (the first `shown` names)."""
    more = f" and {len(changed) - shown} more" if len(changed) > shown else ""
    return f"nbtrain: put back after the run: {', '.join(changed[:shown])}{more}"


def _run_objects(bt: Any) -> dict[str, weakref.ref[Any]]:
    """Return weak references to what a run built (context, engine, model, optimizer, loader)."""
    engine = getattr(bt, "engine", None)
    objects = {"context": bt, "engine": engine, "model": getattr(bt, "_prepared_model", None),
               "optimizer": getattr(engine, "optimizer", None), "loader": getattr(bt, "_loader", None)}
    refs = {}
    for name, value in objects.items():
        try:
            refs[name] = weakref.ref(value)
        except TypeError:  # None, or a type without weak references
            pass
    return refs


def _forget_sources() -> None:
    """Drop the finished run's cell and notebook sources from linecache (the next run brings its own)."""
    from nbtrain.launch.shipping import is_notebook_source

    for filename in [f for f in linecache.cache if f == CELL_FILENAME or is_notebook_source(f)]:
        linecache.cache.pop(filename, None)


def _output_to(log_file: Path) -> None:
    """Send this process's stdout and stderr (C-level writes too) to `log_file`."""
    sys.__stdout__.flush()  # type: ignore[union-attr]
    sys.__stderr__.flush()  # type: ignore[union-attr]
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _fail(exc: BaseException, run_path: Path, rank: int, cell: str) -> NoReturn:
    """Report this rank's error into the run directory and end the process at once."""
    from nbtrain.launch.launcher import SPACE_RESERVE
    from nbtrain.rundir import RunDirectory, write_json_atomic

    report = error_report(exc, rank, cell)
    full = disk_full(exc, run_path)
    if full:
        report["disk_full"] = full
        # Free the room the launcher kept for this report and the run's final status.
        (run_path / SPACE_RESERVE).unlink(missing_ok=True)
    write_json_atomic(RunDirectory(run_path).error_file(rank), report)
    print(report["traceback"], file=sys.stderr, flush=True)
    # Peers may be dead or stuck in a collective: skip every teardown that could wait on them.
    os._exit(1)


def _write_outputs(run: Any, outputs: dict[str, Any], missing: list[str]) -> None:
    """Send rank 0's `--out` values back; a value that cannot be pickled is named."""
    import cloudpickle

    sendable, problems = {}, dict.fromkeys(missing, "the cell did not define it")
    for name, value in outputs.items():
        try:
            cloudpickle.dumps(value)
            sendable[name] = value
        except Exception as e:  # noqa: BLE001 - reported to the user by name
            problems[name] = f"cannot be sent back ({type(e).__name__}: {e})"
    tmp = run.outputs_file.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        cloudpickle.dump({"values": sendable, "problems": problems}, f)
    os.replace(tmp, run.outputs_file)


def _teardown(bt: Any, keep_process_group: bool = False, barrier: bool = False) -> None:
    """Destroy the engine, then the process group (the other order fails; a missed one aborts ZeRO-3)."""
    import torch.distributed as dist

    if barrier and dist.is_available() and dist.is_initialized():
        dist.barrier()
    if bt is not None:
        bt.close()
        if bt.engine is not None:
            bt.engine.destroy()
    if not keep_process_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _tupled(config: dict[str, Any]) -> dict[str, Any]:
    # JSON has no tuples; the config's sequence fields are tuples.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2])))
