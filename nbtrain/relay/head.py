"""The head's side of a relay: start it over ssh, apply what arrives, send the pulse, notice its loss."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbtrain.relay.protocol import (
    BEAT_S,
    DEFAULT_POLL_S,
    DEFAULT_TIMEOUT_S,
    HEAD_FILES,
    HEAD_TOKEN,
    MAX_CHUNK,
    PROTOCOL,
    FrameReader,
    ProtocolError,
    apply_change,
    encode,
    header_line,
    inside_run,
    relayed_files,
    write_atomic,
)


class RelayError(RuntimeError):
    """A host's relay could not be started or answered wrongly; the message names the host and the fix."""


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

    from nbtrain.config.hosts import ssh_command

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
        # Three threads: the reader applies what the remote sends (its end means the channel
        # closed), the beater sends the pulse, the stderr keeper holds ssh's last words.
        self._reader = self._thread(self._read, f"relay-{host}-reader")
        self._beater = self._thread(self._beat, f"relay-{host}-beater")
        self._stderr_keeper = self._thread(self._keep_stderr, f"relay-{host}-stderr")

    @staticmethod
    def _thread(target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    @property
    def _threads(self) -> tuple[threading.Thread, ...]:
        return (self._reader, self._beater, self._stderr_keeper)

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
            if not self._reader.is_alive():  # the stream ended: ssh ends too, in a moment
                try:
                    self.process.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            self._stderr_keeper.join(1.0)  # ssh's last stderr line says why
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
            path = inside_run(self.run_path, name)
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
            self._reader.join(1.0)  # its last words, if any
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
        self._reader.join(1.0)
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
                if left <= 0 or not self._reader.is_alive():  # nothing more will come
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


