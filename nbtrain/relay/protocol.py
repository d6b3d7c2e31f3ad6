"""The relay's wire protocol and the file changes it carries (standard library only).

Each message is one JSON header line (`type`, `size`, fields) followed by `size` raw bytes;
see `nbtrain.relay` for the whole exchange.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any, Literal

from nbtrain.rundir import layout

PROTOCOL = 1
HEAD_TOKEN = ".head-token"  # written by the head; a remote that reads the same value shares the filesystem
TAG_VARIABLE = "NBTRAIN_WORKER_TAG"  # marks a host's worker processes (set through DS_ENV_FILE)
BEAT_S = 1.0
DEFAULT_TIMEOUT_S = 10.0  # survives the blips of a busy network; a GPU held 10 s too long is cheap
DEFAULT_POLL_S = 0.25  # as often as the kernel redraws; a stat per file, so idle costs nothing
DEFAULT_GRACE_S = 2.0  # SIGTERM → SIGKILL
MAX_CHUNK = 1 << 20  # one message at most: a big log never holds back the beats for long
MAX_HEADER = 1 << 16
# The head sends these (what the workers read before the run) unless the filesystem is shared.
HEAD_FILES = (layout.RUN_FILE, layout.DEEPSPEED_FILE, layout.CELL_FILE, layout.INPUTS_FILE)
# Each rank's files, as the workers write them (docs/run-directory.md).
APPENDED = (layout.METRICS, layout.UTILIZATION, layout.LOG, layout.OUTPUT)
REPLACED = (layout.HEARTBEAT, layout.ERROR, layout.DONE)
RANK0_REPLACED = (layout.EFFECTIVE_DEEPSPEED_FILE, layout.OUTPUTS_FILE, layout.TIMELINE)
# fsync these; heartbeats come again in 1 s
_DURABLE = (layout.ERROR.split("/")[0] + "/", layout.DONE.split("/")[0] + "/", layout.EFFECTIVE_DEEPSPEED_FILE)

FileKind = Literal["append", "replace"]


class ProtocolError(RuntimeError):
    """The other end sent something that is not a relay message."""


# -- framing -------------------------------------------------------------------------------

def header_line(kind: str, size: int, **fields: Any) -> bytes:
    """Return the header of a message whose `size` bytes follow."""
    return json.dumps({"type": kind, **fields, "size": size}, separators=(",", ":")).encode() + b"\n"


def encode(kind: str, payload: bytes = b"", **fields: Any) -> bytes:
    """Return one message: a JSON header line, then `payload`."""
    return header_line(kind, len(payload), **fields) + payload


class FrameReader:
    """Read messages from a byte stream; `on_bytes` is called whenever any byte arrived (liveness)."""

    def __init__(self, stream: IO[bytes], on_bytes: Callable[[], None] = lambda: None):
        self._stream = stream
        self._on_bytes = on_bytes

    def header(self) -> dict[str, Any] | None:
        """Return the next header, or None at the end of the stream."""
        line = self._stream.readline(MAX_HEADER)
        if not line:
            return None
        self._on_bytes()
        if not line.endswith(b"\n"):
            if len(line) >= MAX_HEADER:
                raise ProtocolError(f"a header line longer than {MAX_HEADER} bytes: {line[:80]!r}...")
            return None  # the stream ended inside a header
        try:
            header = json.loads(line)
        except ValueError as e:
            raise ProtocolError(f"not a relay header: {line[:200]!r}") from e
        if not isinstance(header, dict) or not isinstance(header.get("type"), str) \
                or not isinstance(header.get("size"), int) or header["size"] < 0:
            raise ProtocolError(f"not a relay header: {line[:200]!r}")
        return header

    def payload(self, size: int, sink: Callable[[bytes], object] | None = None) -> bytes | None:
        """Return the next `size` bytes (or hand them to `sink` in pieces); None if the stream ended first."""
        parts: list[bytes] = []
        left = size
        while left:
            piece = self._stream.read(min(left, MAX_CHUNK))
            if not piece:
                return None
            self._on_bytes()
            left -= len(piece)
            if sink is None:
                parts.append(piece)
            else:
                sink(piece)
        return b"".join(parts)


# -- which files travel --------------------------------------------------------------------

def relayed_files(ranks: Iterable[int], host: str | None = None) -> dict[str, FileKind]:
    """Return the run-directory files of `ranks` that a relay carries, and how (by relative path)."""
    files: dict[str, FileKind] = {}
    for r in sorted(set(ranks)):
        files.update({layout.rank_file(p, r): "append" for p in APPENDED})
        files.update({layout.rank_file(p, r): "replace" for p in REPLACED})
        if r == 0:
            files.update({p: "replace" for p in RANK0_REPLACED})
    if host:
        files[launch_log(host)] = "append"
    return files


def launch_log(host: str) -> str:
    """Return where a command the relay started on `host` writes its own output."""
    return layout.HOST_LAUNCH_LOG.format(host=host)


def inside_run(run_path: Path, relative: str) -> Path:
    """Return run_path/relative, refusing a path that would leave the run directory."""
    parts = Path(relative).parts
    if not parts or Path(relative).is_absolute() or ".." in parts:
        raise ProtocolError(f"refused path {relative!r}: not inside the run directory")
    return run_path / relative


def write_atomic(path: Path, data: bytes | Callable[[IO[bytes]], None], durable: bool = True) -> None:
    """Replace `path` with `data` (bytes, or a function that writes them) so no reader sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the run directory's files are readable like the rest
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def apply_change(run_path: Path, header: Mapping[str, Any], payload: bytes, allowed: Mapping[str, FileKind]) -> int | None:
    """Write one `append`/`replace` message into the head's run directory.

    Returns None, or the offset to resend from when an append would leave a gap (the head's
    copy is shorter than the remote offset: it was removed or truncated behind our back).
    Appends are placed by offset, so a repeated message rewrites the same bytes.
    """
    relative = header.get("path")
    if not isinstance(relative, str) or allowed.get(relative) != header["type"]:
        raise ProtocolError(f"refused {header['type']} of {relative!r}: not a file of this host's ranks")
    path = inside_run(run_path, relative)
    if header["type"] == "replace":
        write_atomic(path, payload, durable=relative.startswith(_DURABLE))
        return None
    offset = header.get("offset")
    if not isinstance(offset, int) or offset < 0:
        raise ProtocolError(f"append of {relative!r} without a valid offset: {offset!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if header.get("truncate"):
            os.ftruncate(fd, offset)
        size = os.fstat(fd).st_size
        if offset > size:
            return size
        os.pwrite(fd, payload, offset)
    finally:
        os.close(fd)
    return None


class FileWatcher:
    """Find what changed in a run directory's relayed files since the last look; cheap when nothing did."""

    def __init__(self, run_path: Path, files: Mapping[str, FileKind]):
        self.run_path = run_path
        self.files = dict(files)
        self._offsets: dict[str, tuple[int, int]] = {}  # path -> (inode, bytes sent)
        self._seen: dict[str, tuple[int, int, int]] = {}  # path -> (inode, size, mtime) last sent

    def resend_from(self, relative: str, offset: int) -> None:
        """Send `relative` again from `offset` (the head lost the rest)."""
        inode = self._offsets.get(relative, (0, 0))[0]
        self._offsets[relative] = (inode, offset)

    def changes(self) -> Iterable[bytes]:
        """Yield the messages that bring the head up to date with every relayed file."""
        for relative, kind in self.files.items():
            path = self.run_path / relative
            try:
                st = os.stat(path)
            except OSError:
                continue
            if kind == "append":
                yield from self._appended(relative, path, st)
            elif self._seen.get(relative) != (st.st_ino, st.st_size, st.st_mtime_ns):
                yield from self._replaced(relative, path)

    def _appended(self, relative: str, path: Path, st: os.stat_result) -> Iterable[bytes]:
        inode, sent = self._offsets.get(relative, (-1, 0))
        truncate = False
        if inode != st.st_ino or st.st_size < sent:
            # First sight, or the file was made anew: the head's copy starts over, so that it
            # is this file byte for byte whatever the head held before (an earlier relay's copy).
            sent, truncate = 0, True
        if st.st_size == sent and not truncate:
            return
        try:
            with open(path, "rb") as f:
                while True:
                    f.seek(sent)
                    # A partial last line goes as it is; its end follows in a later message.
                    piece = f.read(MAX_CHUNK)
                    if not piece and not truncate:
                        break  # (a new file that is empty still goes once, empty: the head makes it too)
                    yield encode("append", piece, path=relative, offset=sent, truncate=truncate)
                    sent += len(piece)
                    truncate = False
                    self._offsets[relative] = (st.st_ino, sent)
        except OSError:
            return
        self._offsets[relative] = (st.st_ino, sent)

    def _replaced(self, relative: str, path: Path) -> Iterable[bytes]:
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())  # of what we read: a newer replacement is caught next time
                data = f.read()
        except OSError:
            return
        yield encode("replace", data, path=relative)
        self._seen[relative] = (st.st_ino, st.st_size, st.st_mtime_ns)  # only once it went out


