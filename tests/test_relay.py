"""The relay carries a remote host's ranks' files to the head and ends that host's workers when the head goes silent.

Unit tests check framing, applying and watching without any process; the local tests run
the real remote side as a child process (no ssh, two folders standing for two machines);
the `integration` tests run it over ssh on namespace hosts with private run directories
(tests/netns.py; root only) and cut links, kill ssh and kill the "kernel".
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nbtrain.relay.head import Relay, RelayError, ensure_head_token, relay_argv, relay_command
from nbtrain.relay.protocol import (
    HEAD_TOKEN,
    TAG_VARIABLE,
    FileWatcher,
    FrameReader,
    ProtocolError,
    apply_change,
    encode,
    header_line,
    relayed_files,
)
from nbtrain.relay.remote import tagged_processes
from nbtrain.rundir import new_run_id, read_json, read_records
from tests.netns import Cluster, cluster

# A stand-in for a worker of rank R (argv[1]) in the current directory (the run directory):
# metric records, a partial last record it completes only once the file `go` arrives,
# heartbeats replaced atomically, a log, and an error report; then it waits to be ended.
FAKE_WORKER = r'''
import json, os, sys, time
rank = int(sys.argv[1])
def replace(path, doc):
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f)
    os.replace(path + ".tmp", path)
metrics = open(f"metrics/rank-{rank}.jsonl", "a", buffering=1)
log = open(f"logs/rank-{rank}.log", "a", buffering=1)
for step in range(1, 21):
    metrics.write(json.dumps({"step": step, "rank": rank, "time": time.time(), "loss": 1.0 / step}) + "\n")
    replace(f"heartbeats/rank-{rank}.json", {"time": time.time(), "rank": rank, "step": step})
    log.write(f"step {step} done\n")
    time.sleep(0.05)
metrics.write('{"step": 21, "rank": %d, "lo' % rank)
metrics.flush()
while not os.path.exists("go"):
    time.sleep(0.05)
metrics.write('ss": 0.25}\n')
replace(f"errors/rank-{rank}.json", {"rank": rank, "type": "ValueError", "message": "bad batch",
                                     "traceback": "Traceback ...", "cell_line": 3, "time": time.time()})
log.write("the end\n")
while True:
    time.sleep(1)
'''
SLEEPER = "import time\nwhile True: time.sleep(1)"


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> float:
    """Wait until `condition()` is true; return the seconds it took, fail naming `what`."""
    begun = time.monotonic()
    while not condition():
        if time.monotonic() - begun > timeout:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.02)
    return time.monotonic() - begun


def make_run(root: Path) -> Path:
    """Make a head-side run directory with the files the workers need before a run.

    Its name is a fresh run id, as in real runs: relays end every process carrying it as their
    tag, so a fixed name would let a test run end the workers of another run of these tests.
    """
    name = new_run_id("relay-test")
    run = root / name
    for folder in ("metrics", "logs", "errors", "results", "checkpoints"):
        (run / folder).mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"format_version": 1, "run_id": name, "nproc": 1}))
    (run / "deepspeed.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    (run / "cell.py").write_text("result = bigtrain.fit(make_model(), ToyData())\n")
    (run / "inputs.pkl").write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # more than one message's worth
    return run


# -- framing, applying, watching (no process) ---------------------------------------------

def test_messages_round_trip_and_a_cut_stream_reads_as_its_end() -> None:
    stream = encode("append", b"line\npart", path="metrics/rank-1.jsonl", offset=5) + encode("beat")
    reader = FrameReader(io.BytesIO(stream))
    first = reader.header()
    assert first == {"type": "append", "path": "metrics/rank-1.jsonl", "offset": 5, "size": 9}
    assert reader.payload(first["size"]) == b"line\npart"
    beat = reader.header()
    assert beat is not None and beat["type"] == "beat" and reader.payload(beat["size"]) == b""
    assert reader.header() is None
    cut = FrameReader(io.BytesIO(header_line("file", 100, path="inputs.pkl") + b"only 20 bytes here.."))
    header = cut.header()
    assert header is not None and cut.payload(header["size"]) is None, "a payload cut short must read as the end"


def test_anything_but_a_header_is_refused() -> None:
    with pytest.raises(ProtocolError, match="not a relay header"):
        FrameReader(io.BytesIO(b"Welcome to node1! Last login...\n")).header()
    with pytest.raises(ProtocolError, match="not a relay header"):
        FrameReader(io.BytesIO(b'{"type": "append"}\n')).header()


def test_only_the_files_of_the_host_s_ranks_travel() -> None:
    files = relayed_files([2, 3], host="node1")
    assert files["metrics/rank-2.jsonl"] == "append" and files["logs/rank-3.out"] == "append"
    assert files["heartbeats/rank-3.json"] == "replace" and files["errors/rank-2.json"] == "replace"
    assert files["logs/launch-node1.log"] == "append"
    assert "metrics/rank-0.jsonl" not in files and "status.json" not in files, "the head owns status.json"
    assert "results/outputs.pkl" not in files
    assert relayed_files([0])["results/outputs.pkl"] == "replace", "rank 0's results travel with it"


def test_appends_land_by_offset_so_repeats_are_harmless_and_gaps_are_asked_again(tmp_path: Path) -> None:
    allowed = relayed_files([1])
    path = tmp_path / "metrics" / "rank-1.jsonl"

    def append(offset: int, data: bytes, **more: object) -> int | None:
        return apply_change(tmp_path, {"type": "append", "path": "metrics/rank-1.jsonl", "offset": offset, **more},
                            data, allowed)

    assert append(0, b'{"step": 1}\n{"st') is None
    assert read_records(path) == ([{"step": 1}], 12), "a partial last line is kept for later"
    assert append(12, b'{"st') is None, "a repeated message must not duplicate bytes"
    assert append(16, b'ep": 2}\n') is None
    assert path.read_bytes() == b'{"step": 1}\n{"step": 2}\n'
    assert append(40, b"x\n") == 24, "a gap must be answered with the offset to resend from"
    assert path.read_bytes() == b'{"step": 1}\n{"step": 2}\n'
    assert append(0, b'{"step": 7}\n', truncate=True) is None
    assert path.read_bytes() == b'{"step": 7}\n', "a file made anew on the host starts over here"


def test_replacements_are_whole_and_paths_outside_the_host_s_files_are_refused(tmp_path: Path) -> None:
    allowed = relayed_files([1])
    apply_change(tmp_path, {"type": "replace", "path": "heartbeats/rank-1.json"}, b'{"step": 3}', allowed)
    assert read_json(tmp_path / "heartbeats" / "rank-1.json") == {"step": 3}
    assert [p.name for p in (tmp_path / "heartbeats").iterdir()] == ["rank-1.json"], "no temporary file left"
    for header in ({"type": "replace", "path": "status.json"}, {"type": "replace", "path": "../rank-1.json"},
                   {"type": "append", "path": "metrics/rank-0.jsonl", "offset": 0},
                   {"type": "append", "path": "heartbeats/rank-1.json", "offset": 0}):
        with pytest.raises(ProtocolError, match="refused"):
            apply_change(tmp_path, header, b"{}", allowed)
    assert not (tmp_path / "status.json").exists()


def test_the_watcher_sends_new_bytes_partial_lines_included_and_nothing_when_nothing_changed(tmp_path: Path) -> None:
    (tmp_path / "metrics").mkdir()
    (tmp_path / "heartbeats").mkdir()
    watcher = FileWatcher(tmp_path, relayed_files([1]))
    head = tmp_path / "head"

    def deliver() -> list[str]:
        kinds = []
        for message in watcher.changes():
            reader = FrameReader(io.BytesIO(message))
            header = reader.header()
            assert header is not None
            apply_change(head, header, reader.payload(header["size"]) or b"", watcher.files)
            kinds.append(f"{header['type']} {header['path']}")
        return kinds

    assert deliver() == []
    metrics = tmp_path / "metrics" / "rank-1.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 1}\n{"step"')
    (tmp_path / "heartbeats" / "rank-1.json").write_text('{"step": 1}')
    assert deliver() == ["append metrics/rank-1.jsonl", "replace heartbeats/rank-1.json"]
    assert (head / "metrics" / "rank-1.jsonl").read_text() == '{"step": 1}\n{"step"'
    assert deliver() == [], "an unchanged file must cost no message"
    with open(metrics, "a") as f:
        f.write(': 2}\n')
    assert deliver() == ["append metrics/rank-1.jsonl"]
    assert (head / "metrics" / "rank-1.jsonl").read_text() == metrics.read_text()
    metrics.unlink()
    metrics.write_text('{"step": 9}\n')
    deliver()
    assert (head / "metrics" / "rank-1.jsonl").read_text() == '{"step": 9}\n'
    (head / "metrics" / "rank-1.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    watcher = FileWatcher(tmp_path, relayed_files([1]))  # a new relay, and the head holds more than the host
    deliver()
    assert (head / "metrics" / "rank-1.jsonl").read_text() == '{"step": 9}\n', "the head's copy must be the host's file"


def test_an_empty_file_on_the_host_is_made_on_the_head_and_a_new_empty_one_empties_the_head_s(
        tmp_path: Path) -> None:
    # Regression: an empty relayed file (a rank's log that got no line) was never made on the head,
    # and a file made anew empty left the head's copy with the old file's bytes.
    (tmp_path / "logs").mkdir()
    watcher, head = FileWatcher(tmp_path, relayed_files([1])), tmp_path / "head"

    def deliver() -> None:
        for message in watcher.changes():
            reader = FrameReader(io.BytesIO(message))
            header = reader.header()
            assert header is not None
            apply_change(head, header, reader.payload(header["size"]) or b"", watcher.files)

    log = tmp_path / "logs" / "rank-1.log"
    log.touch()
    deliver()
    assert (head / "logs" / "rank-1.log").read_bytes() == b""
    assert list(watcher.changes()) == [], "an unchanged empty file must cost no message"
    log.write_text("line\n")
    deliver()
    assert (head / "logs" / "rank-1.log").read_text() == "line\n"
    log.unlink()
    log.touch()
    deliver()
    assert (head / "logs" / "rank-1.log").read_bytes() == b"", "the head kept the old file's bytes"


def test_the_ssh_command_has_no_terminal_and_keeps_the_user_s_ssh_options_first() -> None:
    argv = relay_command("node1", Path("/runs/r"), [2, 3], python="/env/bin/python", timeout_s=6,
                         environ={"NBTRAIN_SSH_ARGS": "-F /c/ssh_config -o ServerAliveInterval=9"})
    assert argv[:5] == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
    assert argv.index("-F") < argv.index("ServerAliveInterval=2") and "-T" in argv
    assert argv[-3:] == ["--", "node1", "/env/bin/python -m nbtrain.relay /runs/r --ranks 2,3 --timeout 6 "
                         "--poll 0.25 --host node1"]


def test_processes_are_found_by_their_tag(tmp_path: Path) -> None:
    tagged = subprocess.Popen([sys.executable, "-c", SLEEPER], env={**os.environ, TAG_VARIABLE: "run-a"})
    other = subprocess.Popen([sys.executable, "-c", SLEEPER], env={**os.environ, TAG_VARIABLE: "run-ab"})
    try:
        found = tagged_processes("run-a")
        assert tagged.pid in found and other.pid not in found
    finally:
        for p in (tagged, other):
            p.kill()
            p.wait()


# -- the real remote side as a local child process ----------------------------------------

@pytest.fixture
def two_machines(tmp_path: Path) -> tuple[Path, Path]:
    """A head's run directory and the same run's (empty) folder on a 'remote machine'."""
    head = make_run(tmp_path / "head")
    return head, tmp_path / "remote" / head.name


def local_relay(head: Path, remote: Path, ranks: list[int], **options: float) -> Relay:
    return Relay("here", head, ranks, timeout_s=options.get("timeout_s", 3.0),
                 command=relay_argv(remote, ranks, host="here", tag=head.name, poll_s=0.05, **options))


def test_a_relay_on_another_filesystem_gets_the_inputs_and_streams_the_worker_s_files(
        two_machines: tuple[Path, Path]) -> None:
    head, remote = two_machines
    relay = local_relay(head, remote, [1])
    try:
        assert relay.handshake(timeout=20).shared is False
        assert relay.send_files() == ["run.json", "deepspeed.json", "cell.py", "inputs.pkl"]
        assert relay.sync()
        for name in ("run.json", "deepspeed.json", "cell.py", "inputs.pkl"):
            assert (remote / name).read_bytes() == (head / name).read_bytes(), f"{name} arrived changed"
        relay.start_workers([sys.executable, "-c", FAKE_WORKER, "1"], cwd=str(remote))
        head_metrics = head / "metrics" / "rank-1.jsonl"
        wait_for(lambda: head_metrics.is_file() and head_metrics.read_bytes().endswith(b'"lo'), 20,
                 "the partial last record on the head")
        (head / "go").write_text("")
        relay.send_files(["go"])
        wait_for(lambda: (head / "errors" / "rank-1.json").is_file(), 20, "the error report on the head")
        assert relay.sync()
        for name in ("metrics/rank-1.jsonl", "logs/rank-1.log", "heartbeats/rank-1.json", "errors/rank-1.json"):
            assert (head / name).read_bytes() == (remote / name).read_bytes(), f"{name} differs on the head"
        assert [r["step"] for r in read_records(head_metrics)[0]] == list(range(1, 22))
        bye = relay.stop("the run ended")
        assert bye is not None and len(bye["killed"]) == 1 and bye["reason"] == "the run ended"
        assert relay.lost is None, "a deliberate stop is no loss"
    finally:
        relay.close()


def test_a_relay_that_sees_the_head_s_run_directory_says_it_is_shared(tmp_path: Path) -> None:
    head = make_run(tmp_path)
    relay = local_relay(head, head, [1])
    try:
        assert relay.handshake(timeout=20).shared is True
        assert relay.send_files() == [], "nothing to copy onto a shared filesystem"
        (head / "metrics" / "rank-1.jsonl").write_text('{"step": 1}\n')
        assert relay.sync() and (head / "metrics" / "rank-1.jsonl").read_text() == '{"step": 1}\n'
    finally:
        relay.stop()


def test_the_head_learns_the_host_s_live_workers_and_the_exit_codes_of_what_the_relay_started(
        two_machines: tuple[Path, Path]) -> None:
    head, remote = two_machines
    relay = local_relay(head, remote, [1])
    try:
        relay.handshake(timeout=20)
        failing = relay.start_workers([sys.executable, "-c", "import time, sys; time.sleep(2); sys.exit(7)"])
        sleeping = relay.start_workers([sys.executable, "-c", SLEEPER])
        wait_for(lambda: relay.remote_workers == sorted([failing, sleeping]), 5, "both workers in a beat")
        wait_for(lambda: relay.exit_codes.get(failing) == 7, 5, f"exit code 7 of {failing} ({relay.exit_codes})")
        assert relay.remote_workers == [sleeping]
    finally:
        bye = relay.stop()
    assert bye is not None and bye["killed"] == [sleeping]


def test_the_head_token_is_written_once(tmp_path: Path) -> None:
    token = ensure_head_token(tmp_path)
    assert len(token) == 32 and ensure_head_token(tmp_path) == token
    assert (tmp_path / HEAD_TOKEN).read_text().strip() == token


def test_a_remote_run_directory_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    head = make_run(tmp_path / "head")
    (tmp_path / "blocked").write_text("a file where the runs folder should be")
    relay = local_relay(head, tmp_path / "blocked" / head.name, [1])
    with pytest.raises(RelayError, match=r"host here: cannot create the run directory .*blocked"):
        relay.handshake(timeout=20)


def test_a_host_whose_login_prints_text_is_named_with_the_fix(tmp_path: Path) -> None:
    head = make_run(tmp_path)
    chatty = Relay("here", head, [1], command=["sh", "-c", "echo 'Welcome to node1!'; sleep 30"])
    with pytest.raises(RelayError, match=r"host here: not a relay header: b'Welcome to node1!\\n' before the "
                       r"relay spoke; something prints at login there"):
        chatty.handshake(timeout=20)
    assert chatty.process.poll() is not None


def test_a_relay_whose_head_closes_the_channel_ends_its_workers(two_machines: tuple[Path, Path]) -> None:
    head, remote = two_machines
    relay = local_relay(head, remote, [1])
    relay.handshake(timeout=20)
    worker = relay.start_workers([sys.executable, "-c", SLEEPER])
    assert relay.process.stdin is not None
    relay.process.stdin.close()  # what ssh passes on when the kernel dies
    wait_for(lambda: not _alive(worker), 5, "the worker ended after the channel closed")
    relay.process.wait(5)
    relay.close()


def test_a_relay_that_hears_nothing_ends_the_tagged_workers_and_itself(two_machines: tuple[Path, Path]) -> None:
    head, remote = two_machines
    remote.mkdir(parents=True)
    worker = subprocess.Popen([sys.executable, "-c", SLEEPER], env={**os.environ, TAG_VARIABLE: head.name})
    silent_head = subprocess.Popen(relay_argv(remote, [1], tag=head.name, timeout_s=1.0), stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert silent_head.stdin is not None
        silent_head.stdin.write(encode("hello", token="not the head's"))
        silent_head.stdin.flush()  # ... and then no beat at all, the channel still open
        begun = time.monotonic()
        worker.wait(10)
        took = time.monotonic() - begun
        assert 1.0 <= took < 4.0, f"the worker ended {took:.1f} s after the last word (timeout 1 s)"
        assert silent_head.wait(5) == 3
        assert b"heard nothing from the head" in (silent_head.stderr.read() if silent_head.stderr else b"")
    finally:
        for p in (worker, silent_head):
            if p.poll() is None:
                p.kill()
            p.wait()
        for stream in (silent_head.stdin, silent_head.stdout, silent_head.stderr):
            if stream is not None:
                stream.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (its parent has not reaped it yet) is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# -- over ssh between namespace hosts -----------------------------------------------------

def remote_tagged(c: Cluster, host: str, tag: str) -> list[int]:
    """Return the processes on `host` whose environment carries the tag."""
    return sorted(set(tagged_processes(tag)) & set(c.pids(host)[host]))


def debug_process(pid: int, c: Cluster) -> str:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        net = os.readlink(f"/proc/{pid}/ns/net")
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError as e:
        return f"pid {pid}: {e}"
    return f"pid {pid} tagged_processes {tagged_processes(TAG_VARIABLE)} {cmd!r} net {net} tags {[e for e in environ if e.startswith(TAG_VARIABLE.encode())]} " \
           f"node1 pids {c.pids('node1')}"


def only_sshd_left(c: Cluster, host: str) -> list[str]:
    """Return what runs on `host` besides sshd (its listener and sessions waiting on a cut link)."""
    return [line for line in c.strays().get(host, []) if not line.split(" ", 1)[1].startswith("sshd")]


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    root.mkdir()
    return root


@pytest.fixture
def private_cluster(runs_root: Path) -> Iterator[Cluster]:
    """Two hosts, each with its own empty `runs_root`: no shared filesystem for the run directory."""
    with cluster(2, private_dirs=[runs_root]) as c:
        yield c


@contextlib.contextmanager
def relay_to_node1(c: Cluster, head: Path, *, timeout_s: float, cleanup_s: float = 10) -> Iterator[Relay]:
    """A relay from `head` to node1's rank 1; closed after, and then nothing may be left on the hosts."""
    relay = Relay("node1", head, [1], environ=c.env, timeout_s=timeout_s)
    try:
        yield relay
    finally:
        relay.close()
    wait_for(lambda: c.strays() == {}, cleanup_s, f"nothing left on the hosts (left: {c.strays()})")


@pytest.mark.integration
def test_over_ssh_the_inputs_reach_the_host_and_its_rank_s_files_reach_the_head(
        private_cluster: Cluster, runs_root: Path) -> None:
    c, head = private_cluster, make_run(runs_root)
    with relay_to_node1(c, head, timeout_s=3) as relay:
        assert relay.handshake(timeout=20).shared is False, "the hosts do not share runs_root"
        relay.send_files()
        assert relay.sync()
        there = subprocess.run(c.run_on("node1", ["sha256sum", *(str(head / n) for n in ("cell.py", "inputs.pkl"))]),
                               capture_output=True, text=True, check=True).stdout.split()[::2]
        here = subprocess.run(["sha256sum", str(head / "cell.py"), str(head / "inputs.pkl")],
                              capture_output=True, text=True, check=True).stdout.split()[::2]
        assert there == here, "the inputs arrived changed on node1"

        relay.start_workers([sys.executable, "-c", FAKE_WORKER, "1"], cwd=str(head))
        metrics, heartbeat = head / "metrics" / "rank-1.jsonl", head / "heartbeats" / "rank-1.json"
        beats_seen = set()

        def partial_record_arrived() -> bool:
            if heartbeat.is_file():
                beat = read_json(heartbeat)
                assert beat is not None, "the head showed half a heartbeat"
                beats_seen.add(beat["step"])
            return metrics.is_file() and metrics.read_bytes().endswith(b'"lo')

        wait_for(partial_record_arrived, 20, "the partial last record from node1")
        assert relay.sync()  # the last heartbeat may come in the same scan, just after the metrics
        partial_record_arrived()
        assert [r["step"] for r in read_records(metrics)[0]] == list(range(1, 21))
        assert len(beats_seen) >= 2 and 20 in beats_seen, f"heartbeat replacements did not stream (saw steps {sorted(beats_seen)})"
        (head / "go").write_text("")
        relay.send_files(["go"])
        wait_for(lambda: (head / "errors" / "rank-1.json").is_file(), 20, "node1's error report on the head")
        assert relay.sync()
        for name in ("metrics/rank-1.jsonl", "logs/rank-1.log", "heartbeats/rank-1.json", "errors/rank-1.json"):
            there_bytes = subprocess.run(c.run_on("node1", ["cat", str(head / name)]), capture_output=True,
                                         check=True).stdout
            assert (head / name).read_bytes() == there_bytes, f"{name} differs between node1 and the head"
        assert read_json(head / "errors" / "rank-1.json")["message"] == "bad batch"
        assert read_records(metrics)[0][-1] == {"step": 21, "rank": 1, "loss": 0.25}
        bye = relay.stop("the run ended")
        assert bye is not None and bye["killed"], "stop must end node1's worker and say so"


@pytest.mark.integration
def test_a_cut_link_ends_the_host_s_workers_and_the_head_names_the_host_lost(
        private_cluster: Cluster, runs_root: Path) -> None:
    c, head = private_cluster, make_run(runs_root)
    tag, timeout = head.name, 2.0
    relay = Relay("node1", head, [1], environ=c.env, timeout_s=timeout)
    # Started as DeepSpeed's pdsh runner starts them (PDSHRunner.get_cmd): the DS_ENV_FILE's variables
    # exported on pdsh's command line, the launcher's directory, the kernel's Python.
    pdsh = subprocess.Popen(["pdsh", "-S", "-f", "1024", "-w", "node1",
                             f"export {TAG_VARIABLE}={tag}; cd {os.getcwd()}; {sys.executable} -u -c '{SLEEPER}'"],
                            env=c.env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        relay.handshake(timeout=20)
        wait_for(lambda: remote_tagged(c, "node1", tag), 20, "the worker started on node1")
        c.cut("node1")
        cut = time.monotonic()
        gone = wait_for(lambda: not remote_tagged(c, "node1", tag), timeout + 8, "node1's workers ended after the cut")
        wait_for(lambda: relay.lost is not None, timeout + 3, "the head reports node1 lost")
        assert pdsh.poll() is None, "pdsh ended by itself: the test proves nothing about a cut link"
        lost_after = time.monotonic() - cut
        assert "node1 sent nothing" in str(relay.lost), relay.lost
        # The last beat came up to a second before the cut: silence began then.
        assert timeout - 1.1 <= gone < timeout + 4, f"workers ended {gone:.1f} s after the cut (timeout {timeout:g} s)"
        assert lost_after < timeout + 3
        wait_for(lambda: not only_sshd_left(c, "node1"), 5, f"only sshd left on node1 ({only_sshd_left(c, 'node1')})")
        with pytest.raises(RelayError, match="host node1: the relay could not start .*timed out"):
            Relay("node1", head, [1], environ=c.env, connect_timeout=1).handshake(timeout=10)
    finally:
        relay.close()
        os.killpg(pdsh.pid, signal.SIGKILL)  # pdsh and its ssh, which wait for the cut link
        pdsh.wait()
        c.restore("node1")
    # sshd's sessions learn that their clients are gone once the link is back (their retransmission is refused).
    wait_for(lambda: c.strays() == {}, 30, f"nothing left on the hosts (left: {c.strays()})")


@pytest.mark.integration
def test_sending_inputs_over_a_cut_link_fails_instead_of_hanging(private_cluster: Cluster, runs_root: Path) -> None:
    c, head = private_cluster, make_run(runs_root)
    (head / "inputs.pkl").write_bytes(os.urandom(16 << 20))  # more than ssh's window and the pipe hold
    # The link is back before the hosts are checked: sshd's sessions learn then that their client is gone.
    with relay_to_node1(c, head, timeout_s=2, cleanup_s=30) as relay:
        relay.handshake(timeout=20)
        c.cut("node1")
        try:
            begun = time.monotonic()
            with pytest.raises(RelayError, match="host node1: the relay closed while inputs.pkl was being sent"):
                relay.send_files()
            assert time.monotonic() - begun < 10, "ssh's keep-alive should have ended the blocked transfer"
        finally:
            c.restore("node1")


@pytest.mark.integration
def test_killing_the_head_side_ssh_ends_the_host_s_workers(private_cluster: Cluster, runs_root: Path) -> None:
    c, head = private_cluster, make_run(runs_root)
    with relay_to_node1(c, head, timeout_s=5) as relay:
        relay.handshake(timeout=20)
        pid = relay.start_workers([sys.executable, "-c", SLEEPER])
        wait_for(lambda: relay.remote_workers == [pid], 5, "node1's beat names its worker")
        assert remote_tagged(c, "node1", head.name) == [pid]
        relay.process.kill()
        gone = wait_for(lambda: not remote_tagged(c, "node1", head.name), 10, "node1's worker ended")
        assert gone < 4, f"the worker outlived its head's ssh by {gone:.1f} s"
        assert relay.lost == "the ssh connection to node1 was killed by SIGKILL", relay.lost


KERNEL = '''
import sys, time
from pathlib import Path
from nbtrain.relay.head import Relay
relay = Relay("node1", Path(sys.argv[1]), [1], timeout_s=30)
relay.handshake(timeout=20)
pid = relay.start_workers([sys.executable, "-c", "import time\\nwhile True: time.sleep(1)"])
print("started", pid, flush=True)
time.sleep(600)
'''


@pytest.mark.integration
def test_the_kernel_dying_ends_the_host_s_workers(private_cluster: Cluster, runs_root: Path) -> None:
    c, head = private_cluster, make_run(runs_root)
    kernel = subprocess.Popen([sys.executable, "-c", KERNEL, str(head)], env=c.env, stdout=subprocess.PIPE,
                              cwd=Path(__file__).parents[1])
    assert kernel.stdout is not None
    said = kernel.stdout.readline().split()
    assert said[:1] == [b"started"], said
    pid = int(said[1])
    # Waited for, not asserted at once: once in about 40 runs the first look right after the
    # start missed the worker that the next look found, tagged (unexplained; see debug_process).
    wait_for(lambda: remote_tagged(c, "node1", head.name) == [pid], 5, f"worker seen: {debug_process(pid, c)}")
    kernel.send_signal(signal.SIGKILL)
    kernel.wait()
    kernel.stdout.close()
    gone = wait_for(lambda: not remote_tagged(c, "node1", head.name), 10, "node1's worker ended with the kernel")
    assert gone < 4, f"the worker outlived the kernel by {gone:.1f} s (its relay's timeout is 30 s)"
    wait_for(lambda: c.strays() == {}, 10, f"nothing left on the hosts (left: {c.strays()})")


@pytest.mark.integration
def test_a_host_that_sees_the_head_s_run_directory_is_told_apart(tmp_path: Path) -> None:
    head = make_run(tmp_path / "runs")
    with cluster(1) as c:  # no private directories: the namespace host sees the head's files
        relay = Relay("node0", head, [1], environ=c.env)
        try:
            assert relay.handshake(timeout=20).shared is True
            assert relay.send_files() == []
        finally:
            relay.stop()
        without = Relay("node0", head, [1], environ=c.env, python="/usr/bin/python3")  # ssh starts in $HOME
        with pytest.raises(RelayError, match=r"host node0: the relay could not start \(exit code 1: .*No module "
                           r"named 'nbtrain'\)\); check that `ssh node0 /usr/bin/python3 -m nbtrain.relay --help` works"):
            without.handshake(timeout=20)
        wait_for(lambda: c.strays() == {}, 10, f"nothing left on the host (left: {c.strays()})")
