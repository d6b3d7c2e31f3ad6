"""The record formats of a run directory: JSON documents replaced atomically, JSON-lines appended.

Writes are crash-safe: a JSON document is replaced atomically (write a temporary file, then
rename), metric records are appended one line each and flushed, and readers skip a partial
last line. Standard library only.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Any


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace `path` with `data` as JSON so that a reader never sees half a document."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path, default: Any = None) -> Any:
    """Return the JSON document at `path`, or `default` if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def read_records(path: Path, start: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Return the complete JSON-lines records from byte `start`, and where to read next.

    A partial last line (a writer killed mid-record, or one still writing) is left for the
    next call: it is neither returned nor skipped past.
    """
    try:
        with open(path, "rb") as f:
            f.seek(start)
            chunk = f.read()
    except FileNotFoundError:
        return [], start
    end = chunk.rfind(b"\n") + 1
    records = []
    for line in chunk[:end].splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a crash: drop it, keep the rest
    return records, start + end


class MetricWriter:
    """Append one rank's metric records, one JSON line each, flushed as written."""

    def __init__(self, path: Path, rank: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(path, "a", buffering=1)  # line-buffered: each record reaches the OS whole
        self.rank = rank

    def write(self, step: int, **scalars: Any) -> None:
        record = {"step": step, "rank": self.rank, "time": time.time(),
                  **{name: _json_scalar(value) for name, value in scalars.items()}}
        self._file.write(json.dumps(record, default=float) + "\n")

    def close(self) -> None:
        self._file.close()


def _json_scalar(value: Any) -> Any:
    """Return `value` as a JSON number; NaN and infinities become null (JSON has neither)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    try:
        number = float(value)  # also 0-d tensors and numpy scalars
    except (TypeError, ValueError):
        return value
    return number if math.isfinite(number) else None
