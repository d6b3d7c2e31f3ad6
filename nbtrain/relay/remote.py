"""The remote side of a relay: ship a host's files to the head, and end its workers when the head goes silent.

Runs as `python -m nbtrain.relay RUN_DIR --ranks 2,3` on the remote host (standard library only).
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from nbtrain.relay.protocol import (
    BEAT_S,
    DEFAULT_GRACE_S,
    DEFAULT_POLL_S,
    DEFAULT_TIMEOUT_S,
    HEAD_TOKEN,
    PROTOCOL,
    TAG_VARIABLE,
    FileWatcher,
    FrameReader,
    ProtocolError,
    encode,
    inside_run,
    launch_log,
    relayed_files,
    write_atomic,
)
from nbtrain.rundir.layout import FOLDERS

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
class HostWorkers:
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
        self.workers = HostWorkers(tag, [])
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
            path = inside_run(self.run_path, str(header.get("path")))
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
                for folder in FOLDERS:
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
