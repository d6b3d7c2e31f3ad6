"""Hosts of a multi-node run: hostfiles read as DeepSpeed reads them, bad lines named, ssh checked.

Reachability over real ssh into real hosts is in test_netns_cluster.py (needs root); here
ssh only ever talks to loopback.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbtrain.config.hosts import (
    Host,
    _Answer,
    _judge,
    check_host_flags,
    check_reachable,
    check_slots,
    hostfile_text,
    parse_host_list,
    parse_hostfile_lines,
    probe_script,
    read_hostfile,
    resolve_hosts,
    ssh_command,
    world_info,
)
from nbtrain.errors import ConfigError
from tests.nvml import fake_nvml_environment

# Hostfiles DeepSpeed accepts or refuses; nbtrain must agree on every one (same hosts, same order).
DEEPSPEED_CORPUS = {
    "plain": "worker-0 slots=16\nworker-1 slots=16\n",
    "comments and blank lines": "# cluster\n\n  # indented comment\nworker-0 slots=4\n\n",
    "tabs and indentation": "  worker-0\tslots=2\n\tworker-1   slots=3\n",
    "trailing text (OpenMPI's max_slots)": "worker-0 slots=2 max_slots=4\nworker-1 slots=2 # the GPU box\n",
    "user@host and addresses": "root@10.0.0.7 slots=1\n10.0.0.8 slots=1\n",
    "order kept": "c slots=1\na slots=2\nb slots=3\n",
    "zero slots": "worker-0 slots=0\n",
    "duplicate": "worker-0 slots=2\nworker-0 slots=2\n",
    "missing slots": "worker-0\n",
    "misspelt slots": "worker-0 slot=4\n",
    "negative slots": "worker-0 slots=-1\n",
    "slots without host": "slots=4\n",
    "empty": "\n# nothing\n",
}


def nbtrain_reads(text: str) -> dict[str, int] | None:
    hosts, problems = parse_hostfile_lines(text.splitlines(), "hosts.txt")
    return None if problems else {h.name: h.slots for h in hosts}  # type: ignore[misc]


def deepspeed_reads(text: str) -> dict[str, int] | None:
    from deepspeed.launcher.runner import _parse_hostfile

    try:
        return dict(_parse_hostfile(text.splitlines(keepends=True)))
    except ValueError:
        return None


def test_every_hostfile_reads_as_deepspeed_reads_it() -> None:
    for name, text in DEEPSPEED_CORPUS.items():
        ours, theirs = nbtrain_reads(text), deepspeed_reads(text)
        assert ours == theirs, f"{name}: nbtrain read {ours}, DeepSpeed read {theirs}"
        if ours is not None:
            assert list(ours) == list(theirs or {}), f"{name}: host order differs from DeepSpeed's"


def test_hosts_keep_their_order_and_line_numbers() -> None:
    hosts, problems = parse_hostfile_lines(["# head first", "node-b slots=2", "", "node-a slots=4"], "h")
    assert problems == []
    assert hosts == [Host("node-b", 2, 2), Host("node-a", 4, 4)]


def test_a_bad_line_names_the_file_line_text_rule_and_fix() -> None:
    _, problems = parse_hostfile_lines(["node-a slots=2", "node-b slot=2"], "hosts.txt")
    assert len(problems) == 1
    message = str(problems[0])
    assert problems[0].where == "--hostfile hosts.txt:2", message
    assert problems[0].value == "node-b slot=2", message
    assert "not a `host slots=N` line" in message and "node-b slots=N" in message, message


def test_every_bad_line_is_reported_at_once(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("node-a slots=2\nnode-b\nnode-a slots=2\n-oProxyCommand=x slots=1\nnode-c slots=two\n")
    with pytest.raises(ConfigError) as caught:
        resolve_hosts(str(hostfile), None, nproc=1)
    wheres = [p.where for p in caught.value.problems]
    assert wheres == [f"--hostfile {hostfile}:{n}" for n in (2, 3, 4, 5)], str(caught.value)
    text = str(caught.value)
    assert "already listed on line 1" in text, text
    assert "misread by ssh or pdsh" in text, text
    assert text.startswith("4 problems"), text


@pytest.mark.parametrize("name", ["-oProxyCommand=touch", "node[1-3]", "a,b", "node;reboot", "$(id)"])
def test_host_names_that_ssh_or_pdsh_would_misread_are_refused(name: str) -> None:
    _, from_file = parse_hostfile_lines([f"{name} slots=1"], "h")
    _, from_flag = parse_host_list([name])
    assert [p.where for p in from_file] == ["--hostfile h:1"], from_file
    assert "misread" in str(from_file[0]) and "misread" in str(from_flag[0]), (from_file, from_flag)


def test_a_hostfile_without_hosts_is_refused() -> None:
    _, problems = parse_hostfile_lines(["# only a comment", ""], "hosts.txt")
    assert [p.where for p in problems] == ["--hostfile hosts.txt"]
    assert "lists no host" in str(problems[0])


def test_a_missing_hostfile_is_refused_not_run_locally(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    _, problems = read_hostfile(missing)
    assert [(p.where, p.value) for p in problems] == [("--hostfile", str(missing))]
    assert "no such file" in str(problems[0]) and "this machine alone" in str(problems[0])


def test_hosts_shorthand_has_no_slot_cap() -> None:
    hosts, problems = parse_host_list(" node-a, node-b ,")
    assert problems == []
    assert hosts == [Host("node-a", None), Host("node-b", None)]
    assert check_slots(hosts, 64) == []


def test_hosts_shorthand_refuses_repeats_and_emptiness() -> None:
    _, repeated = parse_host_list(("node-a", "node-a"))
    assert [(p.where, p.value) for p in repeated] == [("--hosts", "node-a")]
    assert "listed twice" in str(repeated[0])
    _, empty = parse_host_list(",")
    assert "names no host" in str(empty[0])


def test_hostfile_and_hosts_together_are_refused() -> None:
    problems = check_host_flags("hosts.txt", ("a", "b"))
    assert [(p.where, p.value) for p in problems] == [("--hosts", "a,b")]
    assert "not both" in problems[0].fix
    assert check_host_flags("hosts.txt", None) == [] and check_host_flags(None, "a,b", "pdsh") == []


def test_a_multinode_launcher_without_hosts_is_refused() -> None:
    problems = check_host_flags(None, None, "pdsh")
    assert [(p.where, p.value) for p in problems] == [("--multinode-launcher", "pdsh")]


def test_the_slurm_launcher_needs_no_hosts_and_refuses_them() -> None:
    # Issue 17: `--multinode-launcher slurm` (= --slurm) was refused outright; SLURM allocates the nodes.
    assert check_host_flags(None, None, "slurm") == [] and check_host_flags(None, None, None, slurm=True) == []
    problems = check_host_flags("hosts.txt", None, "slurm")
    assert [(p.where, p.value) for p in problems] == [("--hostfile", "hosts.txt")]
    assert "drop --hostfile" in problems[0].fix
    problems = check_host_flags(None, ("a", "b"), None, slurm=True)
    assert [(p.where, p.value) for p in problems] == [("--hosts", "a,b")]
    assert "--slurm runs on the nodes SLURM allocates" in str(problems[0])
    problems = check_host_flags(None, None, "pdsh", slurm=True)
    assert [(p.where, p.value) for p in problems] == [("--multinode-launcher", "pdsh")]


def test_more_processes_than_slots_names_the_host_and_its_slots() -> None:
    hosts = [Host("node-a", 8, 1), Host("node-b", 2, 2), Host("node-c", 0, 3)]
    problems = check_slots(hosts, 4)
    assert [p.where for p in problems] == ["--nproc", "--nproc"]
    assert "node-b has slots=2 (hostfile line 2)" in str(problems[0]), problems[0]
    assert "node-c has slots=0" in str(problems[1]), problems[1]
    assert "--nproc 2 or less" in problems[0].fix


def test_resolve_hosts_returns_the_hosts_when_all_is_well(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    assert [h.name for h in resolve_hosts(str(hostfile), None, nproc=2)] == ["node-a", "node-b"]
    assert resolve_hosts(None, ("x", "y"), nproc=16) == [Host("x", None), Host("y", None)]


def test_the_written_hostfile_reads_back_and_matches_deepspeeds_world_info() -> None:
    hosts = [Host("node-b", None), Host("node-a", 8, 1)]
    text = hostfile_text(hosts, 2)
    assert deepspeed_reads(text) == {"node-b": 2, "node-a": 2}
    assert world_info(hosts, 2) == {"node-b": [0, 1], "node-a": [0, 1]}


def test_extra_ssh_options_come_from_nbtrain_ssh_args() -> None:
    command = ssh_command("node-a", "true", 3, {"NBTRAIN_SSH_ARGS": "-F '/tmp/my config' -p 2222"})
    assert command == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3",
                       "-F", "/tmp/my config", "-p", "2222", "--", "node-a", "true"]


# -- the probe, run by a local shell exactly as sshd's login shell would run it -----------

def run_probe_here(python: str, workdir: str | None, cwd: Path, env: dict[str, str] | None = None) -> _Answer:
    done = subprocess.run(["sh", "-c", probe_script(python, workdir)], cwd=cwd, capture_output=True, text=True,
                          env=env)
    return _Answer("node-a", done.returncode, done.stdout, done.stderr)


def test_the_probe_accepts_this_environment(tmp_path: Path) -> None:
    answer = run_probe_here(sys.executable, str(tmp_path), tmp_path)
    assert _judge(answer, sys.executable, str(tmp_path), f"{sys.version_info[0]}.{sys.version_info[1]}", 5) is None, \
        answer


def test_the_probe_names_a_missing_python(tmp_path: Path) -> None:
    missing = str(tmp_path / "venv" / "bin" / "python")
    problem = _judge(run_probe_here(missing, None, tmp_path), missing, None, "3.11", 5)
    assert problem is not None and (problem.where, problem.value) == ("host node-a", missing)
    assert "does not exist there" in problem.rule and "same path" in problem.fix


def test_the_probe_names_a_missing_workdir(tmp_path: Path) -> None:
    gone = str(tmp_path / "gone")
    problem = _judge(run_probe_here(sys.executable, gone, tmp_path), sys.executable, gone, "3.11", 5)
    assert problem is not None and problem.value == gone and "directory does not exist" in problem.rule


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs a system Python without nbtrain")
def test_the_probe_names_a_python_without_nbtrain_with_its_error(tmp_path: Path) -> None:
    problem = _judge(run_probe_here("/usr/bin/python3", None, tmp_path), "/usr/bin/python3", None, "3.11", 5)
    assert problem is not None, "the system Python imported nbtrain: is it installed there?"
    assert problem.value == "ModuleNotFoundError: No module named 'nbtrain'", problem
    assert "install nbtrain into that environment on node-a" in problem.fix


HERE = f"{sys.version_info[0]}.{sys.version_info[1]}"


def test_the_probe_names_a_host_with_fewer_gpus_than_processes(tmp_path: Path) -> None:
    # The multi-node form of issue 14's `--nproc 2` on one GPU. The login shell's
    # CUDA_VISIBLE_DEVICES does not count: DeepSpeed's launch sets it there to the run's slots.
    answer = run_probe_here(sys.executable, None, tmp_path, fake_nvml_environment(gpus=1, CUDA_VISIBLE_DEVICES=""))
    problem = _judge(answer, sys.executable, None, HERE, 5, nproc=2)
    assert problem is not None, answer
    assert (problem.where, problem.value) == ("--nproc", 2)
    assert "each process needs a GPU of its own, and host node-a has 1 GPU" in problem.rule, problem.rule
    assert problem.fix == "use --nproc 1, or run on hosts with 2 GPUs or more (--nproc is per host)"
    assert _judge(answer, sys.executable, None, HERE, 5, nproc=1) is None
    assert _judge(answer, sys.executable, None, HERE, 5) is None, "without --nproc, GPUs are not judged"


def test_a_host_without_gpus_runs_cpu_processes(tmp_path: Path) -> None:
    answer = run_probe_here(sys.executable, None, tmp_path, fake_nvml_environment(gpus=1, FAKE_NVML_DRIVER="missing"))
    assert _judge(answer, sys.executable, None, HERE, 5, nproc=4) is None, answer


# -- ssh itself, against loopback only ----------------------------------------------------

needs_ssh = pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the ssh client (Debian: openssh-client)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A loopback port that accepts connections and never says a word (a hung sshd)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def loopback_ssh(port: int) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "NBTRAIN_SSH_ARGS": f"-F /dev/null -p {port}"}


@needs_ssh
def test_an_unreachable_host_is_named_with_ssh_s_own_words() -> None:
    problems = check_reachable(["127.0.0.1"], environ=loopback_ssh(free_port()))
    assert len(problems) == 1, problems
    assert problems[0].where == "host 127.0.0.1"
    assert "Connection refused" in problems[0].value, problems[0]
    assert "runs sshd" in problems[0].fix, problems[0]


@needs_ssh
def test_the_check_ends_at_its_deadline_when_a_host_hangs(silent_server: int) -> None:
    begun = time.monotonic()
    problems = check_reachable(["127.0.0.1", "root@127.0.0.1"], environ=loopback_ssh(silent_server),
                               connect_timeout=30, deadline=1.5)
    took = time.monotonic() - begun
    assert took < 5, f"the check took {took:.1f} s with a 1.5 s deadline"
    assert [p.where for p in problems] == ["host 127.0.0.1", "host root@127.0.0.1"], problems
    # ssh's ConnectTimeout (never longer than what is left of the deadline) covers the silent
    # handshake; the deadline itself covers a host that hangs after logging in.
    for problem in problems:
        assert "timed out" in problem.value or "no answer within 1.5 s" in problem.value, problem
