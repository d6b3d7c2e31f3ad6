"""A real two-node Slurm 22.05 cluster for tests, on tests/netns.py's namespace hosts.

    with slurm_cluster(2) as sc:                          # needs root, slurmctld/slurmd/munge
        subprocess.run(["srun", "-N2", "hostname"], env=sc.env)
        alloc = sc.salloc(2)                              # a job granted by `salloc --no-shell`
        kernel = Kernel(path, env=alloc.env)              # a kernel "inside" that allocation
        ...
        sc.scancel(alloc)

Layout: `netns.cluster(n)` makes the hosts (namespaces on a bridge, each with sshd). This
module adds, all under the cluster's own temp dir:
- its own `munged` (own key and socket; slurm.conf's `AuthInfo=socket=...` points every Slurm
  command and daemon at it, so `sc.env` alone reaches the cluster);
- `slurmctld` in the root namespace (the head) on a free `SlurmctldPort`, listening on every
  address so the namespaces reach it over the bridge;
- one `slurmd` per namespace, run as `ip netns exec NS unshare --uts sh -c 'hostname NAME;
  exec slurmd -D'` (its own UTS namespace gives it its node name);
- node names unique per cluster, `nbt<pid>-<serial>-node<i>` (host i of the netns cluster),
  resolvable in the root namespace and in every namespace through a marked block of
  /etc/hosts (removed at teardown; blocks and daemons of dead test runs are swept).

`slurm_cluster(n_nodes=2, cpus=2, gpus=0, partitions=None)`:
- `cpus`: CPUs per node as slurm.conf declares them (`SlurmdParameters=config_overrides`:
  the declared count holds whatever the machine has).
- `gpus`: `Gres=gpu:N` per node so that checks can read GPU counts from `sinfo` and steps get
  SLURM_GPUS_ON_NODE; gres.conf names N empty files of the temp dir as the devices (slurmd
  reports no GPU without a File=). No GPU is needed or used.
- `partitions`: {name: {"nodes": "all" | k (the first k nodes) | [node names],
  "max_time": Slurm time or "INFINITE", "default": bool}}; None means
  {"debug": {"nodes": "all", "max_time": "INFINITE", "default": True}}.

The cluster (`SlurmCluster`) gives
- `env`: os.environ without any outer SLURM_* variable, plus SLURM_CONF, the netns cluster's
  ssh set-up and GLOO_SOCKET_IFNAME=veth0, which srun hands to the tasks (a process of the
  root namespace that runs gloo itself must drop it: there is no veth0 there);
- `nodes`, `addresses` (node -> NodeAddr), `hosts` (node -> netns alias), `partition` (the
  default one), `partitions` (name -> nodes), `netns` (the tests/netns.py Cluster), `directory`
  (slurm.conf and every daemon's log; `logs()` gives their tails);
- `squeue()` -> [Job(job_id, name, state, reason, nodes)], the active jobs; `job(id)` -> the
  `scontrol show job` fields (JobState=CANCELLED/NODE_FAIL/TIMEOUT ... for MinJobAge, 300 s);
- `salloc(nodes, partition=, time_limit=, job_name=, exclusive=True, traps=True, extra=)` ->
  Allocation(job_id, nodes, env): a job granted by `salloc --no-shell`, and the environment
  salloc gives its shell (SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_JOB_NUM_NODES, ... checked
  against a real salloc by the tests), plus with `traps` what a kernel started by
  `srun --pty` inside it also has: SLURM_CPU_BIND*=mask_cpu:0x1, SLURM_MEM_PER_CPU,
  SLURM_NTASKS=SLURM_NPROCS=1. They are real traps: TaskPlugin=task/affinity binds, so a step
  run with them is one task pinned to CPU 0;
- `scancel(job)` (waits until it left the queue), `node_state(node)` (sinfo's idle, alloc,
  down*, ...), `wait_for_state(node, states)`, `kill_slurmd(node)` (a node lost),
  `restart_slurmd(node)`, `run(*argv)` (a client command with `env`), `run_on(node, argv)`
  (straight into the namespace) and `strays()` (every process in the namespaces but sshd and
  slurmd: slurmstepd and tasks included).

Timeouts are short (SlurmdTimeout=5: a lost node is DOWN* within ~15 s; KillWait=2).
A cluster starts in about 1.3 s and is torn down in about 0.5 s here.

Teardown cancels every job, waits for the steps to end, ends every daemon by the pid it
started (slurmd, slurmctld, munged), removes the hosts block, the namespaces and the temp dir,
and then fails if a job was left in the queue or a process in a namespace. A slurmd that a
test killed is started again first, so that Slurm cleans its node as when a node returns.
The fixtures (registered by tests/conftest.py): `slurm_shared` (a module's cluster) and
`slurm` (per test: that cluster, checked after the test, and left clean for the next one).
"""

from __future__ import annotations

import fcntl
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests import netns

DAEMONS = {"slurmctld": "slurmctld", "slurmd": "slurmd", "munged": "munge", "srun": "slurm-client",
           "unshare": "util-linux"}
HOSTS_FILE = Path("/etc/hosts")
_DIR_PREFIX = "nbtrain-slurm-"  # temp dirs: nbtrain-slurm-<pid>-<serial>-XXXX
_HOSTS_MARK = "# nbtrain-test-slurm"  # "# nbtrain-test-slurm <pid>-<serial> begin" ... "end"
_HOSTS_BLOCK = re.compile(rf"^{_HOSTS_MARK} (\d+)-(\d+) begin\n.*?^{_HOSTS_MARK} \1-\2 end\n", re.M | re.S)
_HOSTS_LOCK = Path(tempfile.gettempdir()) / "nbtrain-slurm-hosts.lock"
_SETTLE = 30.0  # seconds for the nodes to come up or the jobs to end (a lost node's: SlurmdTimeout and more)
_STEPS_GONE = 10.0  # seconds for the processes to leave the nodes once no job is left
_serial = itertools.count()
# "urgent" is a higher tier on the same nodes: a job there preempts (cancels) the jobs of "debug",
# as an urgent queue does on a real cluster (PreemptType=preempt/partition_prio, PreemptMode=CANCEL).
DEFAULT_PARTITIONS: dict[str, dict[str, Any]] = {"debug": {"nodes": "all", "max_time": "INFINITE", "default": True},
                                                 "urgent": {"nodes": "all", "priority_tier": 10}}


def skip_unless_slurm() -> None:
    """Skip where namespaces cannot be made (not root); fail where root lacks Slurm or munge."""
    netns.skip_unless_root()
    missing = sorted({pkg for tool, pkg in DAEMONS.items() if netns._which(tool) is None})
    if missing:
        pytest.fail(f"missing Debian packages {', '.join(missing)}: run .ci/setup-env as root "
                    f"(or apt-get install {' '.join(missing)})")


@dataclass
class Job:
    """One line of `squeue`."""

    job_id: str
    name: str
    state: str  # PENDING, RUNNING, COMPLETING, ...
    reason: str  # why pending ("Resources"), "None" when running
    nodes: str  # the node list as Slurm writes it, e.g. nbt12-0-node[0-1]


@dataclass
class Allocation:
    """An allocation granted by `salloc --no-shell`, and the environment a kernel inside it has."""

    job_id: str
    nodes: list[str]
    env: dict[str, str]

    def __str__(self) -> str:
        return self.job_id


@dataclass
class SlurmCluster:
    """A running Slurm cluster on namespace hosts; see the module docstring."""

    nodes: list[str]  # Slurm node names, in host order
    addresses: dict[str, str]  # node -> NodeAddr (its namespace's address)
    hosts: dict[str, str]  # node -> the netns cluster's host alias (node0, node1, ...)
    partition: str  # the default partition
    partitions: dict[str, list[str]]  # name -> its nodes
    name: str  # ClusterName
    tag: str  # <pid>-<serial>: names this cluster's hosts block and temp dir
    conf: Path  # slurm.conf
    directory: Path
    env: dict[str, str]
    netns: netns.Cluster
    slurmd: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def run(self, *argv: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command with the cluster's environment."""
        done = subprocess.run(argv, env=self.env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def run_on(self, node: str, argv: Sequence[str]) -> list[str]:
        """Return `argv` prefixed to run directly in the node's namespace (not through Slurm)."""
        return self.netns.run_on(self.hosts[node], argv)

    def squeue(self) -> list[Job]:
        """Return the cluster's active jobs (pending, running, completing)."""
        out = self.run("squeue", "-h", "-o", "%i|%j|%T|%r|%N").stdout
        return [Job(*line.split("|", 4)) for line in out.splitlines() if line.strip()]

    def node_state(self, node: str) -> str:
        """Return the node's state as `sinfo` writes it: idle, alloc, mix, down*, idle* (not responding), ..."""
        return self.run("sinfo", "-h", "-N", "-n", node, "-o", "%t").stdout.split()[0]

    def wait_for_state(self, node: str, states: Sequence[str], timeout: float = _SETTLE) -> str:
        """Wait until the node is in one of `states` (sinfo's short names); return that state."""
        end = time.monotonic() + timeout
        while (state := self.node_state(node)) not in states:
            if time.monotonic() > end:
                raise AssertionError(f"node {node} stayed {state!r}, not one of {list(states)}, for {timeout:g} s\n"
                                     f"{self.logs()}")
            time.sleep(0.2)
        return state

    def salloc(self, nodes: int | None = None, *, partition: str | None = None, time_limit: str | None = None,
               job_name: str = "test-allocation", exclusive: bool = True, traps: bool = True,
               extra: Sequence[str] = (), timeout: float = 30) -> Allocation:
        """Get an allocation with `salloc --no-shell` and the environment salloc gives its shell.

        `exclusive` takes whole nodes (all their CPUs), as a user who reserves nodes for a
        notebook does. `traps` adds what an outer allocation or step leaves in a kernel's
        environment that must not reach a job step: SLURM_CPU_BIND* (binding to CPU 0),
        SLURM_MEM_PER_CPU, SLURM_NTASKS/SLURM_NPROCS=1 (as in a kernel started by `srun --pty`).
        """
        argv = ["salloc", "--no-shell", "-N", str(nodes or len(self.nodes)), "--job-name", job_name]
        argv += ["-p", partition] if partition else []
        argv += ["-t", time_limit] if time_limit else []
        argv += ["--exclusive"] if exclusive else []
        try:
            done = self.run(*argv, *extra, timeout=timeout)
        except subprocess.TimeoutExpired:  # a killed salloc leaves its pending job: cancel it
            queued = self.squeue()
            self.run("scancel", "--name", job_name, check=False)
            raise RuntimeError(f"`{' '.join(argv)}` was not granted within {timeout:g} s: {queued}") from None
        granted = re.search(r"Granted job allocation (\d+)", done.stderr)
        if granted is None:
            raise RuntimeError(f"`{' '.join(argv)}` granted nothing: {done.stderr.strip()}")
        job_id = granted.group(1)
        return Allocation(job_id, self.job_nodes(job_id), self._allocation_env(job_id, traps))

    def job(self, job_id: str | Allocation) -> dict[str, str]:
        """Return `scontrol show job` as a dict (JobState, NodeList, Reason, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def job_nodes(self, job_id: str | Allocation) -> list[str]:
        """Return the job's nodes, one name each (`scontrol show hostnames`)."""
        nodelist = self.job(job_id)["NodeList"]
        return self.run("scontrol", "show", "hostnames", nodelist).stdout.split()

    def _allocation_env(self, job_id: str, traps: bool) -> dict[str, str]:
        """The variables salloc sets for its shell (its own names), from the job's record."""
        job = self.job(job_id)
        cpus = self.run("squeue", "-h", "-j", job_id, "-o", "%C").stdout.split()[0]  # all the job's CPUs
        per_node = int(cpus) // int(job["NumNodes"])
        env = dict(self.env)
        env.update(SLURM_JOB_ID=job_id, SLURM_JOBID=job_id, SLURM_JOB_NAME=job["JobName"],
                   SLURM_JOB_NODELIST=job["NodeList"], SLURM_NODELIST=job["NodeList"],
                   SLURM_JOB_NUM_NODES=job["NumNodes"], SLURM_NNODES=job["NumNodes"],
                   SLURM_JOB_PARTITION=job["Partition"], SLURM_CLUSTER_NAME=self.name,
                   SLURM_JOB_CPUS_PER_NODE=f"{per_node}(x{job['NumNodes']})",
                   SLURM_TASKS_PER_NODE=f"{per_node}(x{job['NumNodes']})",
                   SLURM_SUBMIT_HOST=socket.gethostname(), SLURM_SUBMIT_DIR=os.getcwd())
        if traps:
            env.update(SLURM_CPU_BIND="quiet,mask_cpu:0x1", SLURM_CPU_BIND_VERBOSE="quiet",
                       SLURM_CPU_BIND_TYPE="mask_cpu:", SLURM_CPU_BIND_LIST="0x1", SLURM_MEM_PER_CPU="100",
                       SLURM_NTASKS="1", SLURM_NPROCS="1")
        return env

    def scancel(self, job_id: str | Allocation, wait: bool = True) -> None:
        """Cancel a job and (by default) wait until it has left the queue."""
        self.run("scancel", str(job_id))
        end = time.monotonic() + _SETTLE
        while wait and any(j.job_id == str(job_id) for j in self.squeue()):
            if time.monotonic() > end:
                raise AssertionError(f"job {job_id} still queued {_SETTLE:g} s after scancel: {self.squeue()}")
            time.sleep(0.2)

    def kill_slurmd(self, node: str) -> None:
        """Lose a node: SIGKILL its slurmd. Its steps' tasks live on, as under a crashed daemon, until
        `restart_slurmd` (Slurm then kills what belongs to no running job; the fixtures restart it)."""
        daemon = self.slurmd[node]
        daemon.kill()
        daemon.wait(timeout=10)

    def restart_slurmd(self, node: str, timeout: float = _SETTLE) -> None:
        """Start the node's slurmd again and wait until the node is back (ReturnToService=2)."""
        if self.slurmd[node].poll() is None:
            raise RuntimeError(f"slurmd of {node} is running (pid {self.slurmd[node].pid})")
        self.slurmd[node] = _start_slurmd(self, node)
        self.wait_for_state(node, ("idle", "alloc", "mix"), timeout)

    def strays(self) -> dict[str, list[str]]:
        """Return `pid command` of every process in the namespaces but sshd and slurmd ({} when none).

        A job step's slurmstepd and its tasks count: they are what a test must not leave.
        """
        daemons = {d.pid for d in self.slurmd.values()}
        found = {}
        for host, procs in self.netns.strays().items():
            left = [p for p in procs if int(p.split(" ", 1)[0]) not in daemons]
            if left:
                found[host] = left
        return found

    def logs(self, lines: int = 15) -> str:
        """Return the tail of every daemon's log (for error messages)."""
        parts = []
        for log in sorted(self.directory.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}:\n" + "\n".join(tail))
        return "\n".join(parts)


@contextmanager
def slurm_cluster(n_nodes: int = 2, *, cpus: int = 2, gpus: int = 0,
                  partitions: Mapping[str, Mapping[str, Any]] | None = None) -> Iterator[SlurmCluster]:
    """Make an `n_nodes` Slurm cluster on namespace hosts; tear it all down (and check) on exit."""
    skip_unless_slurm()
    if cpus < 1 or gpus < 0:
        raise ValueError(f"cpus must be >= 1 and gpus >= 0, not cpus={cpus} gpus={gpus}")
    sweep_stale()
    tag = f"{os.getpid()}-{next(_serial)}"
    with netns.cluster(n_nodes) as hosts:
        directory = Path(tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{tag}-"))
        directory.chmod(0o755)  # munged wants its socket's directory searchable by all
        daemons: list[subprocess.Popen[bytes]] = []
        sc: SlurmCluster | None = None
        failed = True
        try:
            sc = _configure(hosts, directory, tag, cpus, gpus, partitions or DEFAULT_PARTITIONS)
            _add_hosts_block(tag, sc.addresses)
            _start_controller(sc, daemons)
            for node in sc.nodes:
                sc.slurmd[node] = _start_slurmd(sc, node)
            _wait_until_idle(sc)
            yield sc
            failed = False
        finally:
            problems = _tear_down(sc, daemons, tag, directory)
        if problems and not failed:
            raise AssertionError("the Slurm cluster was left with " + "; ".join(problems))


def _configure(hosts: netns.Cluster, directory: Path, tag: str, cpus: int, gpus: int,
               partitions: Mapping[str, Mapping[str, Any]]) -> SlurmCluster:
    """Write slurm.conf, cgroup.conf, gres.conf and the munge key; return the (not yet started) cluster."""
    pid, serial = tag.split("-")
    node_of = {alias: f"nbt{pid}-{serial}-{alias}" for alias in hosts.hosts}
    nodes = list(node_of.values())
    addresses = {node_of[alias]: hosts.addresses[alias] for alias in hosts.hosts}
    for part, spec in partitions.items():
        if unknown := sorted(set(spec) - {"nodes", "max_time", "default", "priority_tier"}):
            raise ValueError(f"partitions[{part!r}]: unknown keys {unknown}; give nodes, max_time, default, "
                             "priority_tier")
    members = {name: _partition_nodes(name, spec.get("nodes", "all"), nodes) for name, spec in partitions.items()}
    defaults = [name for name, spec in partitions.items() if spec.get("default")] or [next(iter(partitions))]
    if len(defaults) > 1:
        raise ValueError(f"partitions: only one may be the default, not {defaults}")
    for sub in ("state", *(f"spool/{n}" for n in nodes)):
        (directory / sub).mkdir(parents=True)
    key = directory / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    name = f"nbt{pid}x{serial}"
    lines = [
        f"ClusterName={name}",
        f"SlurmctldHost={socket.gethostname()}({hosts.head_address})",
        f"SlurmctldPort={_free_port()}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={directory / 'munge.socket'}",
        "SlurmUser=root", "SlurmdUser=root",
        f"StateSaveLocation={directory / 'state'}", f"SlurmdSpoolDir={directory / 'spool' / '%n'}",
        f"SlurmctldPidFile={directory / 'slurmctld.pid'}", f"SlurmdPidFile={directory / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={directory / 'slurmctld.log'}", f"SlurmdLogFile={directory / 'slurmd-%n.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/affinity",  # real CPU binding: an inherited SLURM_CPU_BIND pins tasks, as on a cluster
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "SlurmdParameters=config_overrides",  # the declared CPUs/GPUs hold on any machine
        "ReturnToService=2", "MpiDefault=none", "MailProg=/bin/true",
        "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
        # A lost node is noticed within seconds, a cancelled step is killed after 2 s.
        "SlurmdTimeout=5", "MessageTimeout=5", "KillWait=2", "InactiveLimit=0",
        "SchedulerParameters=sched_interval=1",
        # Only partitions of a higher PriorityTier preempt, and only the jobs of lower ones.
        "PreemptType=preempt/partition_prio", "PreemptMode=CANCEL",
    ]
    if gpus:
        lines.append("GresTypes=gpu")
        # slurmd counts a GPU per device file and reports none without: empty files stand in.
        (directory / "dev").mkdir()
        files = [directory / "dev" / f"nvidia{i}" for i in range(gpus)]
        for file in files:
            file.touch()
        (directory / "gres.conf").write_text(f"AutoDetect=off\nName=gpu File={','.join(map(str, files))}\n")
    gres = f" Gres=gpu:{gpus}" if gpus else ""
    lines += [f"NodeName={n} NodeAddr={a} CPUs={cpus} RealMemory=1000{gres} State=UNKNOWN" for n, a in addresses.items()]
    for part, spec in partitions.items():
        lines.append(f"PartitionName={part} Nodes={','.join(members[part])} MaxTime={spec.get('max_time', 'INFINITE')} "
                     f"Default={'YES' if part == defaults[0] else 'NO'} "
                     f"PriorityTier={spec.get('priority_tier', 1)} State=UP")
    conf = directory / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    # The v1 cgroup plugin with nothing constrained: slurmd refuses to start without a cgroup.conf.
    # It needs no hierarchy: `ip netns exec` gives slurmd a fresh /sys with no cgroup mounted.
    (directory / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nConstrainCores=no\nConstrainRAMSpace=no\n"
                                           "ConstrainDevices=no\n")
    env = {k: v for k, v in hosts.env.items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=str(conf), GLOO_SOCKET_IFNAME=netns.INTERFACE)
    return SlurmCluster(nodes=nodes, addresses=addresses, hosts={node: alias for alias, node in node_of.items()},
                        partition=defaults[0], partitions=members, name=name, tag=tag, conf=conf, directory=directory,
                        env=env, netns=hosts)


def _partition_nodes(name: str, spec: object, nodes: list[str]) -> list[str]:
    if spec == "all":
        return list(nodes)
    if isinstance(spec, int) and 1 <= spec <= len(nodes):
        return nodes[:spec]
    if isinstance(spec, (list, tuple)) and spec and set(spec) <= set(nodes):
        return list(spec)
    raise ValueError(f"partitions[{name!r}]['nodes'] = {spec!r}: give 'all', a count 1 to {len(nodes)} "
                     f"or some of {nodes}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _start_controller(sc: SlurmCluster, daemons: list[subprocess.Popen[bytes]]) -> None:
    """Start munged and slurmctld in the root namespace, adding each to `daemons` as it starts."""
    d = sc.directory
    munged = _spawn(["munged", "-F", f"--key-file={d / 'munge.key'}", f"--socket={d / 'munge.socket'}",
                     f"--pid-file={d / 'munged.pid'}", f"--seed-file={d / 'munged.seed'}", "--num-threads=4"],
                    d / "munged.log", sc.env)
    daemons.append(munged)
    _wait_for(lambda: (d / "munge.socket").exists(), munged, "munged", sc)
    daemons.append(_spawn(["slurmctld", "-D", "-f", str(sc.conf)], d / "slurmctld.out.log", sc.env))


def _start_slurmd(sc: SlurmCluster, node: str) -> subprocess.Popen[bytes]:
    script = f"hostname {node} && exec slurmd -D -f {sc.conf}"
    return _spawn(sc.run_on(node, ["unshare", "--uts", "sh", "-c", script]), sc.directory / f"slurmd-{node}.out.log",
                  sc.env)


def _spawn(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:  # the child keeps its own copy
        # In the test run's process group: a signal that ends the run (Ctrl-C, `timeout`) ends them too.
        return subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env)


def _wait_for(ready: Any, daemon: subprocess.Popen[bytes], what: str, sc: SlurmCluster, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if daemon.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"{what} did not start (exit {daemon.poll()})\n{sc.logs()}")
        time.sleep(0.02)


def _wait_until_idle(sc: SlurmCluster, timeout: float = _SETTLE) -> None:
    end = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < end:
        done = sc.run("sinfo", "-h", "-N", "-o", "%N %t", timeout=10, check=False)
        seen = done.stdout.strip() or done.stderr.strip()
        states = dict(line.split() for line in done.stdout.splitlines() if len(line.split()) == 2)
        if done.returncode == 0 and all(states.get(n) == "idle" for n in sc.nodes):
            return
        dead = [n for n, d in sc.slurmd.items() if d.poll() is not None]
        if dead:
            break
        time.sleep(0.1)
    raise RuntimeError(f"the Slurm nodes did not come up idle within {timeout:g} s (sinfo: {seen})\n{sc.logs()}")


def _tear_down(sc: SlurmCluster | None, daemons: list[subprocess.Popen[bytes]], tag: str,
               directory: Path) -> list[str]:
    """Cancel the jobs, end the daemons, remove the hosts block and the temp dir; return what was left."""
    problems = []
    try:
        if sc is not None and len(daemons) == 2 and all(d.poll() is None for d in daemons):
            problems += _cancel_everything(sc)
    finally:
        if sc is not None:
            for daemon in sc.slurmd.values():
                _end(daemon)
        for daemon in reversed(daemons):  # slurmctld, then munged
            _end(daemon)
        _remove_hosts_block(tag)
        shutil.rmtree(directory, ignore_errors=True)
    return problems


def _cancel_everything(sc: SlurmCluster) -> list[str]:
    """scancel every job and wait for the queue and the namespaces to empty; return what had been left."""
    problems = []
    for node, daemon in sc.slurmd.items():  # a lost node returns, so that Slurm cleans it up as it would
        if daemon.poll() is not None:
            sc.restart_slurmd(node)
    jobs = sc.squeue()
    if left := [j for j in jobs if j.state != "COMPLETING"]:  # a completing job was ended by its owner
        problems.append(f"jobs in the queue: {left}")
    if jobs:
        sc.run("scancel", *(j.job_id for j in jobs), check=False)
    if not _wait_while(sc.squeue, _SETTLE):
        problems.append(f"jobs still queued {_SETTLE:g} s after scancel: {sc.squeue()}")
    # With no job left, a step's slurmstepd is gone within a second or two (KillWait=2).
    if not _wait_while(sc.strays, _STEPS_GONE):
        strays = sc.strays()
        problems.append(f"processes in the namespaces: {strays}")
        for procs in strays.values():  # the next test of a shared cluster starts clean
            for proc in procs:
                with suppress(ProcessLookupError):
                    os.kill(int(proc.split(" ", 1)[0]), signal.SIGKILL)
    return problems


def _wait_while(found: Callable[[], object], timeout: float) -> bool:
    """Poll `found` until it returns nothing; return False if it still does after `timeout` seconds."""
    end = time.monotonic() + timeout
    while found():
        if time.monotonic() > end:
            return False
        time.sleep(0.2)
    return True


def _end(daemon: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the daemon we started, SIGKILL it after `grace` seconds, and reap it."""
    if daemon.poll() is None:
        daemon.terminate()
        try:
            daemon.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=10)


# --- /etc/hosts: a marked block per cluster -------------------------------------------------------

@contextmanager
def _hosts_locked() -> Iterator[None]:
    """Serialise edits of /etc/hosts between test processes."""
    with open(_HOSTS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _edit_hosts(edit: Any) -> None:
    # Rewritten in place: /etc/hosts is often a bind mount (containers), which a rename would fail on.
    with _hosts_locked(), open(HOSTS_FILE, "r+") as f:
        text = f.read()
        new = edit(text)
        if new != text:
            f.seek(0)
            f.write(new)
            f.truncate()


def _add_hosts_block(tag: str, addresses: dict[str, str]) -> None:
    entries = "".join(f"{address} {node}\n" for node, address in addresses.items())
    block = f"{_HOSTS_MARK} {tag} begin\n{entries}{_HOSTS_MARK} {tag} end\n"
    _edit_hosts(lambda text: (text if text.endswith("\n") or not text else text + "\n") + block)


def _remove_hosts_block(tag: str) -> None:
    _edit_hosts(lambda text: _HOSTS_BLOCK.sub(lambda m: "" if f"{m.group(1)}-{m.group(2)}" == tag else m.group(0),
                                              text))


def hosts_blocks() -> list[str]:
    """Return the tags (`<pid>-<serial>`) of the clusters' blocks in /etc/hosts."""
    return [f"{m.group(1)}-{m.group(2)}" for m in _HOSTS_BLOCK.finditer(HOSTS_FILE.read_text())]


# --- what a killed test run left ------------------------------------------------------------------

def sweep_stale() -> None:
    """Remove what clusters of dead test processes left: daemons, hosts blocks and temp dirs.

    Their slurmds died with their namespaces (netns sweeps those); slurmctld and munged live in
    the root namespace and are found by their temp dir on their command line.
    """
    netns.sweep_stale_namespaces()
    stale = [d for d in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*-*-*")
             if d.is_dir() and not netns._alive(int(d.name[len(_DIR_PREFIX):].split("-")[0]))]
    for pid in _daemons_of([str(d) for d in stale]):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    _edit_hosts(lambda text: _HOSTS_BLOCK.sub(lambda m: m.group(0) if netns._alive(int(m.group(1))) else "", text))


def _daemons_of(paths: list[str]) -> set[int]:
    """Return the processes whose command line names one of `paths`, and their descendants
    (slurmctld's slurmscriptd names no path)."""
    found: set[int] = set()
    if not paths:
        return found
    for proc in psutil.process_iter(["cmdline"]):
        if any(p in " ".join(proc.info["cmdline"] or ()) for p in paths):
            found.add(proc.pid)
            with suppress(psutil.Error):
                found.update(child.pid for child in proc.children(recursive=True))
    return found


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm_shared() -> Iterator[SlurmCluster]:
    """One two-node cluster for a whole test module."""
    with slurm_cluster(2) as sc:
        yield sc


@pytest.fixture
def slurm(slurm_shared: SlurmCluster) -> Iterator[SlurmCluster]:
    """The module's cluster, checked after the test: no job queued, no process in a namespace,
    every node idle and every partition up (what is not is put back for the next test)."""
    yield slurm_shared
    problems = _cancel_everything(slurm_shared)
    problems += _put_back(slurm_shared)
    assert not problems, "the test left " + "; ".join(problems)


def _put_back(sc: SlurmCluster) -> list[str]:
    """Resume nodes a test left down or drained and bring its partitions up; return what was changed."""
    problems = []
    for part in sc.partitions:
        if (state := sc.run("sinfo", "-h", "-p", part, "-o", "%a").stdout.split()) != ["up"]:
            problems.append(f"partition {part} {state}")
            sc.run("scontrol", "update", f"PartitionName={part}", "State=UP")
    for node in sc.nodes:
        if (node_state := sc.node_state(node)) != "idle":
            problems.append(f"node {node} {node_state}")
            sc.run("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)
            sc.wait_for_state(node, ("idle",))
    return problems
