"""Several "hosts" on one machine: network namespaces on a bridge, each with its own sshd.

    with cluster(2) as c:                      # needs root (CI runs as root)
        subprocess.run(["pdsh", "-w", ",".join(c.hosts), "hostname -I"], env=c.env)
        subprocess.run(c.run_on("node1", ["python", "-c", "..."]))   # no ssh, straight in
        c.cut("node1")                         # pull node1's cable

Layout: a bridge in the root namespace holds HEAD_HOST_NUMBER's address (a kernel in the
root namespace is the head); host i is namespace `nbtrain-test-<pid>-<k>-node<i>` whose
interface `veth0` has address .(10+i) of a private /24 chosen free on this machine, with
only that /24 routed (no default route, and the root namespace does not forward): traffic
never leaves the machine. Each host runs `sshd -D` bound to its address alone, with
test-made host and client keys, root login by key only. `env` makes ssh, pdsh and nbtrain
use the cluster's ssh_config (aliases node0, node1, ... with verified host keys).

With `private_dirs`, each host sees its own empty tmpfs over those directories (no shared
filesystem there); everything started through ssh or `run_on` sees it.

Teardown kills every process in every namespace, deletes the namespaces and links, and
fails the test if anything is left. Namespaces left by a killed test run are swept away
by the next cluster.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

INTERFACE = "veth0"  # every host's link to the bridge: GLOO_SOCKET_IFNAME=veth0 there
HEAD_HOST_NUMBER = 1
FIRST_NODE_HOST_NUMBER = 10
SUBNET_POOL = ipaddress.ip_network("10.213.0.0/16")  # private; one free /24 of it per cluster
NAMESPACE_PREFIX = "nbtrain-test"
_NAMESPACE_RULE = re.compile(rf"^{NAMESPACE_PREFIX}-(\d+)-(\d+)-node\d+$")
TOOLS = {"ip": "iproute2", "sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client",
         "pdsh": "pdsh"}
_serial = itertools.count()


def skip_unless_root() -> None:
    """Skip the calling test where namespaces cannot be made; fail where root lacks the tools."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (CI runs the tests as root)")
    missing = sorted({pkg for tool, pkg in TOOLS.items() if _which(tool) is None})
    if missing:
        pytest.fail(f"missing Debian packages {', '.join(missing)}: run .ci/setup-env as root "
                    f"(or apt-get install {' '.join(missing)})")


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


def namespace_pids(namespace: str) -> list[int]:
    """Return the processes living in a namespace (`ip netns pids`)."""
    done = _run("ip", "netns", "pids", namespace, check=False)
    return [int(p) for p in done.stdout.split()]


@dataclass
class Cluster:
    """A running set of namespace hosts; see the module docstring."""

    hosts: list[str]  # ssh aliases: node0, node1, ...
    addresses: dict[str, str]  # alias -> IPv4 address
    namespaces: dict[str, str]  # alias -> network namespace name
    head_address: str  # the root namespace's address on the bridge
    subnet: str
    interface: str  # each host's interface (the same name in every namespace)
    ssh_config: Path
    env: dict[str, str]  # os.environ plus what makes ssh/pdsh/nbtrain use ssh_config
    bridge: str
    links: dict[str, str]  # alias -> the bridge-side end of its veth pair
    private_dirs: tuple[str, ...] = ()
    sshd: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def run_on(self, host: str, argv: Sequence[str]) -> list[str]:
        """Return `argv` prefixed to run on `host` directly (its network and, if any, private mounts)."""
        if self.private_dirs:  # the private tmpfs lives in sshd's mount namespace: join it
            return ["nsenter", "--target", str(self.sshd[host].pid), "--net", "--mount", "--", *argv]
        return ["ip", "netns", "exec", self.namespaces[host], *argv]

    def ssh(self, host: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a shell command on `host` through ssh (as pdsh would) and return its result."""
        return subprocess.run(["ssh", host, command], env=self.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)

    def cut(self, host: str) -> None:
        """Pull the host's cable: its link to the bridge goes down; its processes keep running."""
        _run("ip", "link", "set", self.links[host], "down")

    def restore(self, host: str) -> None:
        """Plug the host's cable back in."""
        _run("ip", "link", "set", self.links[host], "up")

    def pids(self, host: str | None = None) -> dict[str, list[int]]:
        """Return the processes on each host (or on one), sshd included."""
        names = [host] if host else self.hosts
        return {h: namespace_pids(self.namespaces[h]) for h in names}

    def strays(self) -> dict[str, list[str]]:
        """Return `pid command` of every process on the hosts but their listening sshd ({} when none)."""
        found = {}
        for host in self.hosts:
            others = [pid for pid in namespace_pids(self.namespaces[host]) if pid != self.sshd[host].pid]
            if others:
                found[host] = [f"{pid} {_command_line(pid)}" for pid in others]
        return found


@contextmanager
def cluster(n_hosts: int, *, private_dirs: Sequence[str | os.PathLike[str]] = ()) -> Iterator[Cluster]:
    """Make `n_hosts` namespace hosts with sshd running; tear everything down on exit."""
    skip_unless_root()
    if not 1 <= n_hosts <= 200:
        raise ValueError(f"n_hosts must be 1 to 200, not {n_hosts}")
    sweep_stale_namespaces()
    pid, serial = os.getpid(), next(_serial)
    with tempfile.TemporaryDirectory(prefix=f"nbtrain-cluster-{pid}-") as tmp:
        made = _Made(prefix=f"nb{pid}{serial}", namespace_stem=f"{NAMESPACE_PREFIX}-{pid}-{serial}")
        try:
            c = _build(n_hosts, Path(tmp), made, tuple(os.fspath(d) for d in private_dirs))
            yield c
        finally:
            made.tear_down()


@dataclass
class _Made:
    """What a cluster created so far, so that a half-built cluster is torn down too."""

    prefix: str  # interface names: <prefix>b (bridge), <prefix>v<i> (veth); at most 15 chars
    namespace_stem: str
    namespaces: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def tear_down(self) -> None:
        for namespace in self.namespaces:
            _kill_everything_in(namespace)
        for child in self.children:  # reap our sshds (their pids are gone from the namespaces)
            child.kill()
            child.wait(timeout=10)
        for link in reversed(self.links):  # a veth pair goes with either end
            _run("ip", "link", "del", link, check=False)
        for namespace in self.namespaces:
            _run("ip", "netns", "del", namespace, check=False)
        left_namespaces = [n for n in _run("ip", "netns", "list").stdout.split() if n in self.namespaces]
        left_links = [name for name in _link_names() if name.startswith(self.prefix)]
        assert not left_namespaces and not left_links, \
            f"cluster teardown left namespaces {left_namespaces} and links {left_links}"


def _kill_everything_in(namespace: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in the namespace until none is left (a dying sshd may still fork)."""
    end = time.monotonic() + timeout
    while pids := namespace_pids(namespace):
        if time.monotonic() > end:
            raise AssertionError(f"processes {pids} in namespace {namespace} survived SIGKILL for {timeout:g} s")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "(exited)"


def _link_names() -> list[str]:
    out = _run("ip", "-o", "link", "show").stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def sweep_stale_namespaces() -> None:
    """Remove namespaces (and their links) left by test runs whose process has died."""
    for namespace in _run("ip", "netns", "list").stdout.split():
        match = _NAMESPACE_RULE.match(namespace)
        if match is None or _alive(int(match.group(1))):
            continue
        _kill_everything_in(namespace)
        _run("ip", "netns", "del", namespace, check=False)
        prefix = f"nb{match.group(1)}{match.group(2)}"
        for link in _link_names():
            if re.fullmatch(rf"{prefix}(b|v\d+)", link):
                _run("ip", "link", "del", link, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _free_subnet() -> ipaddress.IPv4Network:
    """Pick a /24 of SUBNET_POOL that no address or route of this machine overlaps."""
    taken = []
    for line in _run("ip", "-4", "-o", "addr", "show").stdout.splitlines():
        taken.append(ipaddress.ip_interface(line.split()[3]).network)
    for line in _run("ip", "-4", "route", "show").stdout.splitlines():
        dest = line.split()[0]
        if dest != "default":
            taken.append(ipaddress.ip_network(dest, strict=False))
    candidates = list(SUBNET_POOL.subnets(new_prefix=24))
    start = os.getpid() % len(candidates)  # parallel runs start apart
    for net in candidates[start:] + candidates[:start]:
        if not any(net.overlaps(t) for t in taken):
            return net  # type: ignore[return-value]
    raise RuntimeError(f"no free /24 left in {SUBNET_POOL}")


def _build(n_hosts: int, tmp: Path, made: _Made, private_dirs: tuple[str, ...]) -> Cluster:
    subnet = _free_subnet()
    head = str(subnet[HEAD_HOST_NUMBER])
    bridge = f"{made.prefix}b"
    _run("ip", "link", "add", bridge, "type", "bridge")
    made.links.append(bridge)
    _run("ip", "addr", "add", f"{head}/24", "dev", bridge)
    _run("ip", "link", "set", bridge, "up")

    client_key = _keygen(tmp / "client_key")
    (tmp / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    hosts, addresses, namespaces, links = [], {}, {}, {}
    for i in range(n_hosts):
        alias, address = f"node{i}", str(subnet[FIRST_NODE_HOST_NUMBER + i])
        namespace, link = f"{made.namespace_stem}-{alias}", f"{made.prefix}v{i}"
        _run("ip", "netns", "add", namespace)
        made.namespaces.append(namespace)
        _run("ip", "link", "add", link, "type", "veth", "peer", "name", INTERFACE, "netns", namespace)
        made.links.append(link)
        _run("ip", "link", "set", link, "master", bridge, "up")
        _run("ip", "-n", namespace, "link", "set", "lo", "up")
        _run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", INTERFACE)
        _run("ip", "-n", namespace, "link", "set", INTERFACE, "up")
        _keygen(tmp / f"host_key_{alias}")
        hosts.append(alias)
        addresses[alias], namespaces[alias], links[alias] = address, namespace, link

    ssh_config = _write_ssh_config(tmp, addresses, client_key)
    env = _client_env(tmp, ssh_config)
    c = Cluster(hosts=hosts, addresses=addresses, namespaces=namespaces, head_address=head, subnet=str(subnet),
                interface=INTERFACE, ssh_config=ssh_config, env=env, bridge=bridge, links=links,
                private_dirs=private_dirs)
    for alias in hosts:
        c.sshd[alias] = _start_sshd(tmp, alias, addresses[alias], namespaces[alias], private_dirs)
        made.children.append(c.sshd[alias])
    for alias in hosts:
        _wait_for_sshd(alias, addresses[alias], c.sshd[alias], tmp / f"sshd-{alias}.log")
    return c


def _keygen(path: Path) -> Path:
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path))
    return path


def _write_ssh_config(tmp: Path, addresses: dict[str, str], client_key: Path) -> Path:
    known = []
    for alias, address in addresses.items():
        key_type, key = (tmp / f"host_key_{alias}.pub").read_text().split()[:2]
        known.append(f"{alias},{address} {key_type} {key}")
    (tmp / "known_hosts").write_text("\n".join(known) + "\n")
    blocks = [f"Host {alias}\n  HostName {address}\n" for alias, address in addresses.items()]
    blocks.append(
        "Host *\n"
        "  User root\n"
        f"  IdentityFile {client_key}\n"
        "  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {tmp / 'known_hosts'}\n"
        "  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n"  # the host keys are known: a wrong host is an error
        "  BatchMode yes\n"
        "  ConnectTimeout 5\n"
        "  LogLevel ERROR\n"
    )
    path = tmp / "ssh_config"
    path.write_text("".join(blocks))
    return path


def _client_env(tmp: Path, ssh_config: Path) -> dict[str, str]:
    """Make every ssh (nbtrain's check, pdsh, DeepSpeed's own `ssh host hostname`) read ssh_config."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ssh"
    # DeepSpeed's runner calls plain `ssh` for its checks, ignoring PDSH_SSH_ARGS_APPEND: a
    # wrapper first on PATH is the one way to reach every ssh without touching ~/.ssh.
    wrapper.write_text(f'#!/bin/sh\nexec {_which("ssh")} -F {ssh_config} "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ)
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}", PDSH_RCMD_TYPE="ssh",
               NBTRAIN_SSH_ARGS=f"-F {ssh_config}")
    return env


def _start_sshd(tmp: Path, alias: str, address: str, namespace: str,
                private_dirs: tuple[str, ...]) -> subprocess.Popen[bytes]:
    config = tmp / f"sshd_config_{alias}"
    config.write_text(
        f"ListenAddress {address}:22\n"
        f"HostKey {tmp / f'host_key_{alias}'}\n"
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "StrictModes no\n"  # the keys live under /tmp, which is world-writable
        "PidFile none\n"
        "PrintMotd no\n"
        "PrintLastLog no\n"
        "MaxStartups 200\n"
        "LogLevel INFO\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    sshd = ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)]
    if private_dirs:  # `ip netns exec` already gave it its own mount namespace: mount there
        mounts = " && ".join(f"mount -t tmpfs nbtrain-private {shlex.quote(d)}" for d in private_dirs)
        sshd = ["sh", "-c", f"{mounts} && exec {' '.join(map(shlex.quote, sshd))}"]
    log = open(tmp / f"sshd-{alias}.log", "wb")  # the child keeps its own copy
    with log:
        return subprocess.Popen(["ip", "netns", "exec", namespace, *sshd], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)


def _wait_for_sshd(alias: str, address: str, sshd: subprocess.Popen[bytes], log: Path,
                   timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sshd.poll() is not None:
            raise RuntimeError(f"sshd of {alias} exited ({sshd.returncode}): {log.read_text().strip()}")
        try:
            with socket.create_connection((address, 22), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd of {alias} did not listen on {address}:22 within {timeout:g} s: {log.read_text()}")
