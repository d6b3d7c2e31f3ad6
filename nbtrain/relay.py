"""Carry a remote host's part of a run directory to the head over ssh, and watch the head's pulse.

The head (the kernel's machine) starts one relay per remote host with
`ssh HOST <python> -m nbtrain.relay RUN_DIR --ranks 2,3 --host HOST`; the ssh pipes are the
channel, in both directions. On it:

- head → remote: `hello` (the shared-filesystem token), the run's input files (`file`,
  written atomically), a `beat` every second, optionally `start` (the host's worker command),
  `sync` and `stop`;
- remote → head: `ready` (says whether the run directory is shared), the new bytes of the
  host's ranks' append-only files (`append`, by offset, partial last lines included), whole
  copies of their small replaced files (`replace`), a `beat` every second, `synced`, `bye`.

Each message is one JSON header line (`type`, `size`, fields) followed by `size` raw bytes.
The head's `Relay` writes what arrives into its own run directory, so the dashboard, the
server API and the supervisor read remote ranks exactly as local ones.

Watchdog: the remote relay ends the host's workers, then itself, when it hears nothing from
the head for `--timeout` seconds (a cut link, a dead host), when its stdin closes (the ssh
client or the kernel died) or on `stop`. The workers are the processes whose environment
carries `NBTRAIN_WORKER_TAG=<tag>` (whoever started them: DeepSpeed's pdsh runner, mpirun,
srun) plus the process group of any command the relay started itself. On the head,
`Relay.lost` names a host whose relay went silent for as long, or whose ssh ended.

    relay = Relay("node1", run.path, ranks=[2, 3])   # doctest: +SKIP
    relay.handshake(timeout=20)                       # shared filesystem? -> relay.shared
    relay.send_files()                                # cell.py, inputs.pkl, ... unless shared
    ... the supervisor polls relay.lost ...
    relay.sync(); relay.stop("the run ended")

Standard library only: the module runs on every host before anything else is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

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
HEAD_FILES = ("run.json", "deepspeed.json", "cell.py", "inputs.pkl")
# Each rank's files, as the workers write them (docs/run-directory.md).
APPENDED = ("metrics/rank-{r}.jsonl", "utilization/rank-{r}.jsonl", "logs/rank-{r}.log", "logs/rank-{r}.out")
REPLACED = ("heartbeats/rank-{r}.json", "errors/rank-{r}.json", "results/rank-{r}.done")
RANK0_REPLACED = ("deepspeed.effective.json", "results/outputs.pkl", "logs/rank-0.timeline.json")
# Folders a worker expects to find in its run directory (RunDirectory.create makes them on the head).
RUN_FOLDERS = ("metrics", "logs", "errors", "results", "checkpoints", "heartbeats", "utilization")
_DURABLE = ("errors/", "results/", "deepspeed.effective.json")  # fsync these; heartbeats come again in 1 s

FileKind = Literal["append", "replace"]


class ProtocolError(RuntimeError):
    """The other end sent something that is not a relay message."""


class RelayError(RuntimeError):
    """A host's relay could not be started or answered wrongly; the message names the host and the fix."""


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
        files.update({p.format(r=r): "append" for p in APPENDED})
        files.update({p.format(r=r): "replace" for p in REPLACED})
        if r == 0:
            files.update({p: "replace" for p in RANK0_REPLACED})
    if host:
        files[launch_log(host)] = "append"
    return files


def launch_log(host: str) -> str:
    """Return where a command the relay started on `host` writes its own output."""
    return f"logs/launch-{host}.log"


def _inside(run_path: Path, relative: str) -> Path:
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
    path = _inside(run_path, relative)
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
        if st.st_size == sent:
            return
        try:
            with open(path, "rb") as f:
                while True:
                    f.seek(sent)
                    # A partial last line goes as it is; its end follows in a later message.
                    piece = f.read(MAX_CHUNK)
                    if not piece:
                        break
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


# -- finding and ending a host's workers ---------------------------------------------------

def tagged_processes(tag: str, proc: Path = Path("/proc")) -> list[int]:
    """Return the processes whose environment carries TAG_VARIABLE=tag (this one excepted)."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    found = []
    for entry in os.scandir(proc):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:  # gone already, or another user's
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _signal(pids: Iterable[int], groups: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    for group in groups:
        try:
            os.killpg(group, sig)
        except OSError:
            pass


@dataclass
class Workers:
    """This host's worker processes: those carrying the tag, and what the relay started itself."""

    tag: str
    started: list[subprocess.Popen[bytes]]

    def alive(self) -> list[int]:
        own = [p.pid for p in self.started if p.poll() is None]
        return sorted(set(own) | set(tagged_processes(self.tag)))

    def end(self, grace: float) -> list[int]:
        """SIGTERM every worker, SIGKILL what is left after `grace` s; return the pids found."""
        groups = [p.pid for p in self.started]  # each started command leads its own group
        found = set(self.alive())
        _signal(found, groups, signal.SIGTERM)
        _signal(found, groups, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.05)
        empty_looks = 0
        for _ in range(100):  # a dying worker may still fork: until no tagged process is seen twice
            left = self.alive()
            empty_looks = 0 if left else empty_looks + 1
            if empty_looks == 2:
                break
            found |= set(left)
            _signal(left, groups, signal.SIGKILL)
            time.sleep(0.02)
        for p in self.started:
            p.wait()
        return sorted(found)


# -- the remote side -----------------------------------------------------------------------

class RemoteRelay:
    """The relay on a remote host: stream the host's files out, obey the head, end the workers when it falls silent."""

    def __init__(self, run_path: Path, ranks: Sequence[int], *, host: str | None, tag: str, timeout_s: float,
                 poll_s: float, grace_s: float, channel_in: IO[bytes], channel_out: IO[bytes]):
        self.run_path = run_path
        self.host = host
        self.timeout_s, self.poll_s, self.grace_s = timeout_s, poll_s, grace_s
        self.watcher = FileWatcher(run_path, relayed_files(ranks, host))
        self.workers = Workers(tag, [])
        self.shared = False
        self._in, self._out = channel_in, channel_out
        self._write_lock = threading.Lock()
        self._scan_lock = threading.Lock()
        self._last_heard = time.monotonic()
        self._hello = threading.Event()
        self._ending = threading.Event()
        self._end_reason = ""
        self._channel_open = True  # False once the head is known gone: no point in a farewell
        self._syncs: queue.Queue[Any] = queue.Queue()

    def serve(self) -> int:
        """Run until told to stop, the head goes quiet, or the channel closes; return the exit code."""
        for name, target in (("reader", self._read), ("sender", self._send_changes)):
            threading.Thread(target=target, name=f"relay-{name}", daemon=True).start()
        # This (main) thread never writes to the channel, so a write blocked by a cut link
        # cannot keep it from noticing the silence.
        while not self._ending.wait(0.1):
            silent = time.monotonic() - self._last_heard
            if silent > self.timeout_s:
                self.request_end(f"heard nothing from the head for {silent:.1f} s (--timeout {self.timeout_s:g} s)",
                                 channel_open=False)
        return self._finish()

    def request_end(self, reason: str, channel_open: bool = True) -> None:
        if not self._ending.is_set():
            self._end_reason = reason
            self._channel_open = self._channel_open and channel_open
            self._ending.set()

    def _finish(self) -> int:
        killed = self.workers.end(self.grace_s)
        ended = f"; ended workers {killed}" if killed else "; no worker was left"
        print(f"nbtrain.relay: {self._end_reason}{ended}", file=sys.stderr, flush=True)
        if not self._channel_open:
            return 3
        # The head is listening: let it have the workers' last words, then say goodbye.
        farewell = threading.Thread(target=self._farewell, args=(killed,), daemon=True)
        farewell.start()
        farewell.join(self.timeout_s)
        return 0

    def _farewell(self, killed: list[int]) -> None:
        if not self.shared:
            with self._scan_lock:
                self._send_all(self.watcher.changes())
        self._write(encode("bye", reason=self._end_reason, killed=killed))

    def _heard(self) -> None:
        self._last_heard = time.monotonic()

    def _write(self, message: bytes) -> None:
        with self._write_lock:
            self._out.write(message)
            self._out.flush()

    def _send_all(self, messages: Iterable[bytes]) -> None:
        for message in messages:
            self._write(message)

    # -- head → remote
    def _read(self) -> None:
        reader = FrameReader(self._in, self._heard)
        try:
            while (header := reader.header()) is not None:
                if not self._handle(header, reader):
                    break
            else:
                self.request_end("the head closed the channel (its ssh or its kernel ended)", channel_open=False)
        except (ProtocolError, OSError, ValueError, KeyError, TypeError) as e:
            self.request_end(f"the channel broke: {e}", channel_open=False)

    def _handle(self, header: dict[str, Any], reader: FrameReader) -> bool:
        kind, size = header["type"], header["size"]
        if kind == "file":
            path = _inside(self.run_path, str(header.get("path")))
            ended = False

            def receive(f: IO[bytes]) -> None:
                nonlocal ended
                ended = reader.payload(size, f.write) is None
                if ended:
                    raise EOFError
            try:
                write_atomic(path, receive)
            except EOFError:
                self.request_end("the channel closed in the middle of a file", channel_open=False)
                return False
            return True
        payload = reader.payload(size)
        if payload is None:
            self.request_end("the channel closed in the middle of a message", channel_open=False)
            return False
        if kind == "hello":
            self._hello_from_head(header)
        elif kind == "start":
            self._start(header)
        elif kind == "sync":
            self._syncs.put(header.get("id"))
        elif kind == "want":
            self.watcher.resend_from(str(header.get("path")), int(header.get("offset", 0)))
        elif kind == "stop":
            self.request_end(str(header.get("reason") or "stopped by the head"))
        return True  # `beat` and anything newer than this relay: being heard is all that matters

    def _hello_from_head(self, header: dict[str, Any]) -> None:
        try:
            found = (self.run_path / HEAD_TOKEN).read_text().strip()
        except OSError:
            found = None
        self.shared = found is not None and found == header.get("token")
        error = None
        if not self.shared:
            try:
                for folder in RUN_FOLDERS:
                    (self.run_path / folder).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                error = f"cannot create the run directory {self.run_path} there: {e.strerror or e}"
        self._write(encode("ready", protocol=PROTOCOL, shared=self.shared, host=socket.gethostname(),
                           pid=os.getpid(), python=sys.executable, error=error))
        self._hello.set()

    def _start(self, header: dict[str, Any]) -> None:
        """Start the host's worker command in a session of its own, tagged, its output in the launch log."""
        env = {**os.environ, **header.get("env", {}), TAG_VARIABLE: self.workers.tag}
        log_path = self.run_path / launch_log(self.host or socket.gethostname())
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "ab") as log:
                process = subprocess.Popen(header["argv"], env=env, cwd=header.get("cwd") or None,
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            self._write(encode("started", error=f"{type(e).__name__}: {e}"))
            return
        self.workers.started.append(process)
        self._write(encode("started", pid=process.pid))

    # -- remote → head
    def _send_changes(self) -> None:
        self._hello.wait()
        last_beat = 0.0
        try:
            while not self._ending.is_set():
                # Only requests that came before this scan began are answered after it: a byte
                # written before the head asked is then surely out.
                asked = [self._syncs.get() for _ in range(self._syncs.qsize())]
                with self._scan_lock:
                    if not self.shared:
                        self._send_all(self.watcher.changes())
                    for sync_id in asked:
                        self._write(encode("synced", id=sync_id))
                if time.monotonic() - last_beat >= BEAT_S:
                    # The workers' pids go with each beat (a /proc scan: about 8 µs a process).
                    exited = {str(p.pid): p.returncode for p in self.workers.started if p.poll() is not None}
                    self._write(encode("beat", time=time.time(), workers=self.workers.alive(), exited=exited))
                    last_beat = time.monotonic()
                try:  # a sync request wakes us at once; it is answered after the next scan
                    self._syncs.put(self._syncs.get(timeout=self.poll_s))
                except queue.Empty:
                    pass
        except OSError as e:  # stdout closed: the head is gone
            self.request_end(f"cannot write to the head: {e.strerror or e}", channel_open=False)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m nbtrain.relay RUN_DIR --ranks 2,3`: the remote side, its channel on stdin/stdout."""
    parser = argparse.ArgumentParser(prog="python -m nbtrain.relay", description=main.__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--ranks", default="", help="the global ranks living on this host, e.g. 2,3")
    parser.add_argument("--host", default=None, help="this host's name as the head calls it")
    parser.add_argument("--tag", default=None, help=f"value of {TAG_VARIABLE} that marks this run's workers "
                        "(default: the run directory's name)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    parser.add_argument("--poll", type=float, default=DEFAULT_POLL_S)
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S)
    args = parser.parse_args(argv)
    try:
        ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--ranks {args.ranks!r}: give the global ranks of this host as numbers, e.g. --ranks 2,3")
    # The channel keeps fd 0 and 1 to itself: anything else printed goes to stderr.
    channel_in = os.fdopen(os.dup(0), "rb")
    channel_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    relay = RemoteRelay(args.run_dir.absolute(), ranks, host=args.host, tag=args.tag or args.run_dir.name,
                        timeout_s=args.timeout, poll_s=args.poll, grace_s=args.grace,
                        channel_in=channel_in, channel_out=channel_out)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda signum, _: relay.request_end(f"got {signal.Signals(signum).name}",
                                                              channel_open=False))
    code = relay.serve()
    sys.stderr.flush()
    os._exit(code)  # threads may be blocked on a dead channel: do not wait for them


# -- the head side -------------------------------------------------------------------------

@dataclass(frozen=True)
class Handshake:
    """What a remote relay said when it started."""

    host: str  # the name the head used
    hostname: str  # the name the host gives itself
    shared: bool  # the head's run directory is visible there: no file relay needed
    pid: int


def ensure_head_token(run_path: Path) -> str:
    """Write the run's shared-filesystem token (once) and return it."""
    path = run_path / HEAD_TOKEN
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        token = secrets.token_hex(16)
        write_atomic(path, token.encode() + b"\n")
        return token


def relay_argv(run_path: Path, ranks: Sequence[int], *, host: str | None = None, python: str = sys.executable,
               tag: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
               poll_s: float = DEFAULT_POLL_S) -> list[str]:
    """Return the command that runs the remote side (on the host itself)."""
    argv = [python, "-m", "nbtrain.relay", str(run_path), "--ranks", ",".join(map(str, ranks)),
            "--timeout", f"{timeout_s:g}", "--poll", f"{poll_s:g}"]
    if host:
        argv += ["--host", host]
    if tag:
        argv += ["--tag", tag]
    return argv


def relay_command(host: str, run_path: Path, ranks: Sequence[int], *, python: str = sys.executable,
                  tag: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = DEFAULT_POLL_S,
                  connect_timeout: float = 5.0, environ: Mapping[str, str] | None = None) -> list[str]:
    """Return the ssh command line that starts the relay on `host` (NBTRAIN_SSH_ARGS honoured)."""
    from shlex import quote

    from nbtrain.hosts import ssh_command

    remote = relay_argv(run_path, ranks, host=host, python=python, tag=tag, timeout_s=timeout_s, poll_s=poll_s)
    argv = ssh_command(host, " ".join(map(quote, remote)), connect_timeout, environ)
    # No terminal: the channel is binary. ssh's own keep-alive ends ssh on a dead link, so a
    # write blocked on it (a big input file) fails instead of hanging; NBTRAIN_SSH_ARGS, placed
    # before these, wins (ssh keeps the first value of an option).
    alive = max(1, round(timeout_s / 3))
    end = argv.index("--")
    return [*argv[:end], "-T", "-o", f"ServerAliveInterval={alive}", "-o", "ServerAliveCountMax=3", *argv[end:]]


class Relay:
    """The head's end of one remote host's relay: apply its files, send the pulse, notice its loss.

    Starts `ssh HOST python -m nbtrain.relay ...` at once (in a session of its own, so the
    kernel's interrupt does not reach it); `command` replaces that command line (another
    way onto the host, or the relay run right here). Threads: one reads and applies what the host
    sends, one sends the heartbeat, one keeps ssh's stderr for error messages.
    """

    def __init__(self, host: str, run_path: Path, ranks: Sequence[int], *, python: str = sys.executable,
                 tag: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = DEFAULT_POLL_S,
                 connect_timeout: float = 5.0, environ: Mapping[str, str] | None = None,
                 command: Sequence[str] | None = None):
        self.host, self.run_path, self.ranks, self.python = host, Path(run_path), list(ranks), python
        self.timeout_s = timeout_s
        self.allowed = relayed_files(self.ranks, host)
        self.problems: list[str] = []  # what could not be applied here (e.g. the head's disk is full)
        self.handshake_info: Handshake | None = None
        self.bye: dict[str, Any] | None = None
        self.remote_workers: list[int] | None = None  # the host's live worker pids at its last beat
        self.exit_codes: dict[int, int] = {}  # of the commands start_workers started, once they ended
        self._token = ensure_head_token(self.run_path)
        self._answers: dict[str, dict[str, Any]] = {}
        self._answered = threading.Condition()
        self._stderr: list[str] = []
        self._write_lock = threading.Lock()
        self._closed = threading.Event()
        self._deliberate = False  # stop() or close() was asked: no loss to report
        self._broken: str | None = None  # why the stream from the host could not be read on
        self._synced = 0  # the highest sync id answered
        self._last_heard = time.monotonic()
        self._sync_ids = iter(range(1, 1 << 62))
        env = dict(os.environ if environ is None else environ)
        if command is None:
            command = relay_command(host, self.run_path, self.ranks, python=python, tag=tag, timeout_s=timeout_s,
                                    poll_s=poll_s, connect_timeout=connect_timeout, environ=env)
        try:
            self.process = subprocess.Popen(list(command), env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            raise RelayError(f"host {host}: cannot run {command[0]!r} here: {e.strerror or e}; install the "
                             "OpenSSH client (apt-get install openssh-client)") from e
        self._send(encode("hello", protocol=PROTOCOL, token=self._token))
        self._threads = [threading.Thread(target=t, name=f"relay-{host}-{t.__name__}", daemon=True)
                         for t in (self._read, self._beat, self._keep_stderr)]
        for thread in self._threads:
            thread.start()

    # -- what the launcher calls
    @property
    def shared(self) -> bool:
        return self.handshake_info is not None and self.handshake_info.shared

    def handshake(self, timeout: float = 30.0) -> Handshake:
        """Wait for the relay's `ready`; raise RelayError naming the host, what went wrong and the fix."""
        ready = self._wait_for("ready", timeout)
        if ready is None and self._broken is not None:
            self.close()
            raise RelayError(f"host {self.host}: {self._broken.split(': ', 1)[1]} before the relay spoke; "
                             "something prints at login there (a shell startup file): keep it quiet when the "
                             "shell is not interactive, as for scp and rsync")
        if ready is None:
            if not self._threads[0].is_alive():  # the stream ended: ssh ends too, in a moment
                try:
                    self.process.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            self._threads[2].join(1.0)  # ssh's last stderr line says why
            said = self._stderr_tail()
            if self.process.poll() is None:
                self.close()
                raise RelayError(f"host {self.host}: the relay did not answer within {timeout:g} s"
                                 + (f" ({said})" if said else "") + f"; check that `ssh {self.host} true` is quick")
            if self.process.returncode == 255:  # ssh's own failure
                fix = f"check that `ssh -o BatchMode=yes {self.host} true` succeeds from here"
            else:
                fix = (f"check that `ssh {self.host} {self.python} -m nbtrain.relay --help` works: the kernel's "
                       "Python and nbtrain must be at the same path on every host")
            raise RelayError(f"host {self.host}: the relay could not start (exit code {self.process.returncode}"
                             + (f": {said}" if said else "") + f"); {fix}")
        if ready.get("error"):
            self.close()
            raise RelayError(f"host {self.host}: {ready['error']}; make that path writable there, or run from "
                             "a directory that exists on every host")
        self.handshake_info = Handshake(self.host, str(ready.get("host")), bool(ready.get("shared")),
                                        int(ready.get("pid", 0)))
        return self.handshake_info

    def send_files(self, names: Iterable[str] = HEAD_FILES) -> list[str]:
        """Copy the run's input files to the host (unless it shares the run directory); return those sent."""
        if self.shared:
            return []
        sent = []
        for name in names:
            path = _inside(self.run_path, name)
            try:
                size = path.stat().st_size
                with open(path, "rb") as f, self._write_lock:
                    assert self.process.stdin is not None
                    self.process.stdin.write(header_line("file", size, path=name))
                    while piece := f.read(MAX_CHUNK):
                        self.process.stdin.write(piece)
                    self.process.stdin.flush()
            except FileNotFoundError:
                continue
            except (BrokenPipeError, ValueError) as e:
                raise RelayError(f"host {self.host}: the relay closed while {name} was being sent "
                                 f"({self.lost or e})") from e
            sent.append(name)
        return sent

    def start_workers(self, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None,
                      timeout: float = 30.0) -> int:
        """Have the relay start the host's worker command (tagged, in its own session); return its pid there."""
        self._send(encode("start", argv=list(argv), env=dict(env or {}), cwd=cwd))
        answer = self._wait_for("started", timeout)
        if answer is None or answer.get("error"):
            why = answer["error"] if answer else self.lost or f"no answer within {timeout:g} s"
            raise RelayError(f"host {self.host}: could not start {argv[0]!r} there: {why}")
        return int(answer["pid"])

    def sync(self, timeout: float = 10.0) -> bool:
        """Wait until everything the host's ranks had written is in the head's run directory."""
        sync_id = next(self._sync_ids)
        self._send(encode("sync", id=sync_id))
        deadline = time.monotonic() + timeout
        with self._answered:
            while self._synced < sync_id:
                left = deadline - time.monotonic()
                if left <= 0 or self.process.poll() is not None:
                    return False
                self._answered.wait(min(left, 0.1))
        return True

    @property
    def lost(self) -> str | None:
        """Say why the host is lost (its relay silent for timeout_s, or its ssh ended), or None."""
        if self._deliberate:
            return None
        code = self.process.poll()
        if code is not None:
            self._threads[0].join(1.0)  # its last words, if any
            if self.bye is not None:
                return f"the relay on {self.host} ended: {self.bye.get('reason')}"
            said = self._stderr_tail()
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"ended with exit code {code}"
            return f"the ssh connection to {self.host} {how}" + (f" ({said})" if said else "")
        if self._broken is not None:
            return self._broken
        if self.handshake_info is None:
            return None  # still connecting: handshake() has its own deadline
        silent = time.monotonic() - self._last_heard
        if silent > self.timeout_s:
            return (f"{self.host} sent nothing for {silent:.0f} s (network cut, host down or frozen); "
                    f"its relay ends the workers there after {self.timeout_s:g} s without the head")
        return None

    def stop(self, reason: str = "stopped by the head", timeout: float = 10.0) -> dict[str, Any] | None:
        """End the host's workers and its relay; return its `bye` (reason, pids ended), or None if it was gone."""
        self._deliberate = True
        self._send(encode("stop", reason=reason))
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self._threads[0].join(1.0)
        self.close()
        return self.bye

    def close(self) -> None:
        """End the local ssh (the remote relay then ends its workers) and the threads."""
        self._deliberate = True
        self._closed.set()
        # A write blocked on a dead link holds the lock: then ssh is killed, which unblocks it.
        if self._write_lock.acquire(timeout=1.0):
            try:
                if self.process.stdin is not None:
                    self.process.stdin.close()  # EOF: the remote relay ends its workers at once
            except OSError:
                pass
            finally:
                self._write_lock.release()
            try:
                self.process.wait(1.0)
            except subprocess.TimeoutExpired:
                pass
        if self.process.poll() is None:
            self.process.kill()  # a cut link: ssh would wait for the network for a long time
        self.process.wait()
        for thread in self._threads:
            thread.join(2.0)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None and not any(t.is_alive() for t in self._threads):
                stream.close()

    # -- threads
    def _send(self, message: bytes, wait: float = 2.0) -> bool:
        """Send a small message; False if ssh has ended or a write stays blocked (`lost` tells which)."""
        if not self._write_lock.acquire(timeout=wait):
            return False  # a big file is on its way: its bytes keep the remote side assured meanwhile
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(message)
            self.process.stdin.flush()
        except (ValueError, OSError):
            return False
        finally:
            self._write_lock.release()
        return True

    def _beat(self) -> None:
        while not self._closed.wait(BEAT_S):
            self._send(encode("beat", time=time.time()))

    def _heard(self) -> None:
        self._last_heard = time.monotonic()

    def _read(self) -> None:
        assert self.process.stdout is not None
        reader = FrameReader(self.process.stdout, self._heard)
        try:
            while (header := reader.header()) is not None:
                payload = reader.payload(header["size"])
                if payload is None:
                    break
                self._handle(header, payload)
        except (ProtocolError, OSError, ValueError, KeyError, TypeError) as e:
            self._broken = f"the relay on {self.host} sent something unreadable: {e}"
            self.process.kill()  # the stream cannot be trusted any more; the host's relay sees EOF
        with self._answered:
            self._answered.notify_all()

    def _handle(self, header: dict[str, Any], payload: bytes) -> None:
        kind = header["type"]
        if kind in ("append", "replace"):
            try:
                resend = apply_change(self.run_path, header, payload, self.allowed)
            except OSError as e:
                self.problems.append(f"host {self.host}: cannot write {header.get('path')}: {e.strerror or e}")
                return
            if resend is not None:
                self._send(encode("want", path=header["path"], offset=resend))
        elif kind == "beat":
            self.remote_workers = list(header.get("workers", []))
            self.exit_codes.update({int(pid): code for pid, code in header.get("exited", {}).items()})
        elif kind == "bye":
            self.bye = header
        elif kind == "synced":
            with self._answered:
                self._synced = max(self._synced, int(header["id"]))
                self._answered.notify_all()
        else:
            with self._answered:
                self._answers[kind] = header
                self._answered.notify_all()

    def _wait_for(self, kind: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        with self._answered:
            while kind not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0 or not self._threads[0].is_alive():  # nothing more will come
                    return None
                self._answered.wait(min(left, 0.1))
            return self._answers.pop(kind)

    def _keep_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr = [*self._stderr[-19:], line.decode(errors="replace").rstrip()]

    def _stderr_tail(self) -> str:
        lines = [line for line in self._stderr if line.strip()]
        return lines[-1] if lines else ""


if __name__ == "__main__":
    sys.exit(main())
