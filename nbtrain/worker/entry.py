"""One worker process: run the cell on this rank, report, and leave nothing behind.

Started by `nbtrain.launcher` as `python -m nbtrain.worker RUN_DIR RANK`. The order of
events is the contract with the kernel side (`nbtrain.run`):
exit 0 = the cell succeeded on this rank (rank 0 has written the `--out` values);
exit 1 = the cell raised (errors/rank-N.json says where); any other end = killed.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

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


def watch_kernel(alive_fd: int, run_path: Path, rank: int) -> None:
    """End this process when the kernel dies (its end of the liveness pipe closes)."""

    def wait_for_eof() -> None:
        while os.read(alive_fd, 1):
            pass
        if rank == 0:
            from nbtrain.rundir import RunDirectory

            RunDirectory(run_path).finish("stopped", "the kernel died or restarted; the workers ended themselves")
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


def main(run_path: Path, rank: int) -> int:
    from nbtrain.launcher import ALIVE_FD_ENV, SPACE_RESERVE
    from nbtrain.worker.heartbeat import Heartbeat

    timeline = {"launched": float(os.environ.get("NBTRAIN_LAUNCHED_AT", "nan")), "python_started": time.time()}
    watch_kernel(int(os.environ[ALIVE_FD_ENV]), run_path, rank)
    heartbeat = Heartbeat(run_path, rank)
    heartbeat.start()

    import linecache

    import cloudpickle

    from nbtrain import shipping
    from nbtrain.rundir import RunDirectory, read_json, write_json_atomic

    run = RunDirectory(run_path)
    from nbtrain.worker.utilization import start_sampler

    start_sampler(run, rank)
    info = run.run_info()
    cell = run.cell_file.read_text()
    linecache.cache[CELL_FILENAME] = (len(cell), None, cell.splitlines(True), CELL_FILENAME)
    user_stream = open(run.path / "logs" / f"rank-{rank}.out", "a", buffering=1)
    bt = None
    try:
        # Imported before the cell: their loggers must bind the real stdout, not the tee.
        import accelerate  # noqa: F401
        import deepspeed  # noqa: F401
        import torch  # noqa: F401
        from accelerate.utils import set_seed

        from nbtrain.config import TrainConfig
        from nbtrain.worker.context import BigTrain

        timeline["imports_done"] = time.time()
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
        timeline["cell_started"] = time.time()
        try:
            exec(code, namespace)
        finally:
            sys.stdout = sys.__stdout__
        bt.final_checkpoint()
        outputs = {name: bt.consolidated_out(namespace[name]) for name in cfg.out if name in namespace}
        missing = [name for name in cfg.out if name not in namespace]
        if rank == 0:
            _write_outputs(run, outputs, missing, cloudpickle)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, then the process ends
        sys.stdout = sys.__stdout__
        report = error_report(exc, rank, cell)
        full = disk_full(exc, run_path)
        if full:
            report["disk_full"] = full
            # Free the room the launcher kept for this report and the run's final status.
            (run_path / SPACE_RESERVE).unlink(missing_ok=True)
        write_json_atomic(run.error_file(rank), report)
        print(report["traceback"], file=sys.stderr, flush=True)
        # Peers may be dead or stuck in a collective: skip every teardown that could wait on them.
        os._exit(1)
    finally:
        user_stream.flush()
    _teardown(bt)
    # Skip interpreter finalisation: C++ threads of the comm backends abort the process
    # ("terminate called without an active exception") when destroyed at exit.
    sys.__stdout__.flush()  # type: ignore[union-attr]
    sys.__stderr__.flush()  # type: ignore[union-attr]
    os._exit(0)


def _write_outputs(run: Any, outputs: dict[str, Any], missing: list[str], cloudpickle: Any) -> None:
    """Send rank 0's `--out` values back; a value that cannot be pickled is named."""
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


def _teardown(bt: Any) -> None:
    """Destroy the engine, then the process group (the other order fails; a missed one aborts ZeRO-3)."""
    if bt is not None:
        bt.close()
        if bt.engine is not None:
            bt.engine.destroy()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _tupled(config: dict[str, Any]) -> dict[str, Any]:
    # JSON has no tuples; the config's sequence fields are tuples.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2])))
