"""Multi-node runs: the same cell's workers on several hosts, started by DeepSpeed's runners.

A run on hosts A, B, … (`--hostfile`/`--hosts`, `--nproc` processes on each) is, from the
kernel's machine (the head):
- one relay per host (`nbtrain.relay`, over ssh): it copies the run's input files there
  unless the run directory is shared, carries that host's ranks' files (metrics, logs,
  heartbeats, errors, results) back into the head's run directory as they are written, and
  ends the host's workers when the head goes silent (kernel death, a cut link) or says stop;
- DeepSpeed's own launch machinery: with `--multinode-launcher pdsh` (the default) the
  command DeepSpeed's PDSHRunner builds (`pdsh -w A,B … python -m deepspeed.launcher.launch
  --node_rank=%n …`), run from here; with `standard` each host's relay starts
  `deepspeed.launcher.launch` for its node itself. Either way every host runs
  `python -m nbtrain.worker RUN_DIR` per rank: the same worker as on one machine, for one
  run (warm workers stay single-machine for now).

The supervisor (`nbtrain.launch.run`) sees a `ClusterGroup`, which answers like a local
`WorkerGroup`: a rank is done once its `results/rank-N.done` arrived, failed once its error
report arrived, and every rank of a host that was lost has failed with the host named.
We do not use DeepSpeed's runner process itself: on a stop it runs `pkill -f "python -u -m
deepspeed.launcher.launch"` on every host, which also kills other runs; the relays end
exactly this run's workers (tagged by NBTRAIN_WORKER_TAG).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from nbtrain.config.hosts import Host, check_launcher, check_reachable, world_info
from nbtrain.errors import ConfigError, Problem
from nbtrain.launch.launcher import (
    COLLECTIVE_TIMEOUT_ENV,
    MALLOC_SETTINGS,
    STOP_GRACE_S,
    collective_timeout_s,
    default_threads,
    free_port,
    reserve_space,
    worker_environment,
)
from nbtrain.rundir import RunDirectory

if TYPE_CHECKING:
    from nbtrain.relay.head import Relay

# Variables the workers need besides what DeepSpeed's runner forwards by prefix (PYTHON*, …);
# the kernel's other variables stay on the head (they may hold secrets).
FORWARDED = ("OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "ACCELERATE_USE_DEEPSPEED", "NBTRAIN_LAUNCHED_AT",
             COLLECTIVE_TIMEOUT_ENV, "PYTHONPATH", "PYTHONUNBUFFERED", *MALLOC_SETTINGS)
FORWARDED_PREFIXES = ("GLOO_", "NCCL_", "TP_SOCKET_IFNAME", "NBTRAIN_SSH_ARGS")
HANDSHAKE_TIMEOUT_S = 30.0


def host_address(host: str, environ: Mapping[str, str] | None = None) -> str:
    """Return the IP address `host` has for ssh (aliases of ~/.ssh/config or NBTRAIN_SSH_ARGS's -F included)."""
    import shlex

    env = dict(os.environ if environ is None else environ)
    name = host.split("@")[-1]
    try:
        shown = subprocess.run(["ssh", "-G", *shlex.split(env.get("NBTRAIN_SSH_ARGS", "")), name],
                               capture_output=True, text=True, timeout=10, env=env)
        for line in shown.stdout.splitlines():
            if line.startswith("hostname "):
                name = line.split(None, 1)[1].strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        return socket.gethostbyname(name)
    except OSError as e:
        raise ConfigError([Problem("--hosts", host, f"its address cannot be resolved here ({e})",
                                   "use a name this machine resolves, or its address")]) from e


def worker_exports(nproc: int, hang_timeout_s: float, tag: str) -> dict[str, str]:
    """Return the variables every remote worker gets: nbtrain's, the forwarded ones, ~/.deepspeed_env's."""
    from nbtrain.relay.protocol import TAG_VARIABLE

    local = worker_environment(0, nproc, 0, -1, default_threads(nproc))
    exports = {k: v for k, v in local.items() if k in FORWARDED or k.startswith(FORWARDED_PREFIXES)}
    exports[COLLECTIVE_TIMEOUT_ENV] = str(collective_timeout_s(hang_timeout_s))
    exports[TAG_VARIABLE] = tag
    # DeepSpeed's convention for anything else the workers need: KEY=VALUE lines in
    # ~/.deepspeed_env or ./.deepspeed_env.
    for folder in (Path.home(), Path.cwd()):
        path = folder / os.environ.get("DS_ENV_FILE", ".deepspeed_env")
        if path.is_file():
            for line in path.read_text().splitlines():
                if "=" in line and not line.lstrip().startswith("#"):
                    key, value = line.split("=", 1)
                    exports[key.strip()] = value.strip()
    return exports


@dataclass
class ClusterGroup:
    """The workers of one multi-node run, as the supervisor sees them."""

    run: RunDirectory
    hosts: tuple[Host, ...]
    nproc: int
    relays: list[Relay]
    port: int
    runner: subprocess.Popen[bytes] | None = None
    started: float = field(default_factory=time.time)
    runs_served: int = 1
    failure: str | None = None  # why the run failed when no rank's own error says it
    failed_rank: int | None = None
    reserve: Path | None = None

    @property
    def world_size(self) -> int:
        return self.nproc * len(self.hosts)

    @property
    def pids(self) -> list[int]:
        return [self.runner.pid] if self.runner is not None else [r.process.pid for r in self.relays]

    @property
    def pgid(self) -> int:
        return self.pids[0]

    def submit(self, run: RunDirectory, last: bool = True) -> None:
        """The run was started with the group (see `launch_cluster`): nothing to send."""

    def exit_codes(self) -> list[int | None]:
        codes: list[int | None] = []
        for rank in range(self.world_size):
            if self.run.done_file(rank).exists():
                codes.append(0)
            elif self.run.error_file(rank).exists():
                codes.append(1)
            else:
                codes.append(None)
        if None in codes and self.failure is None:
            self._notice_loss(codes)
        if self.failure is not None:
            codes = [1 if code is None else code for code in codes]
        return codes

    def _notice_loss(self, codes: list[int | None]) -> None:
        for index, relay in enumerate(self.relays):
            lost = relay.lost
            if lost:
                self.failure, self.failed_rank = (f"host {self.hosts[index].name} was lost: {lost}; every worker "
                                                  "on the other hosts was stopped"), index * self.nproc
                return
        if self.runner is not None and self.runner.poll() not in (None, 0):
            # pdsh ended with an error: let the relays deliver what the ranks said first.
            for relay in self.relays:
                relay.sync(timeout=5)
            if any(self.run.error_file(rank).exists() for rank in range(self.world_size)):
                return
            if not all(self.run.done_file(rank).exists() for rank in range(self.world_size)):
                self.failure = (f"the pdsh launcher ended with code {self.runner.returncode} before every rank "
                                f"finished (see {self.run.launcher_log})")
                self.failed_rank = next(r for r, c in enumerate(codes) if c is None)

    def alive(self) -> bool:
        return False  # a multi-node run's workers serve one run

    def running(self) -> bool:
        return None in self.exit_codes()

    def wait_ready(self, timeout: float) -> str | None:
        return "multi-node workers serve one run"

    def wait_started(self, timeout: float) -> str | None:
        return None  # never warm: the launcher started them for this run

    def stop(self, grace: float = STOP_GRACE_S) -> float:
        """End every worker on every host (through its relay), then the launcher here."""
        begun = time.monotonic()
        for relay in self.relays:
            relay.sync(timeout=2)  # the last records first
        for relay in self.relays:
            relay.stop("the run ended", timeout=grace + 5)
        if self.runner is not None and self.runner.poll() is None:
            try:
                os.killpg(self.runner.pid, signal.SIGKILL)  # not SIGTERM: DeepSpeed's handler pkills too widely
            except ProcessLookupError:
                pass
            self.runner.wait()
        return time.monotonic() - begun

    def shutdown(self, grace: float = STOP_GRACE_S) -> float:
        took = self.stop(grace)
        self.close()
        return took

    def release_reserve(self) -> None:
        if self.reserve is not None:
            self.reserve.unlink(missing_ok=True)
            self.reserve = None

    def close(self) -> None:
        for relay in self.relays:
            relay.close()
        self.release_reserve()


def preflight(hosts: Sequence[Host], launcher: str, nproc: int | None = None) -> None:
    """Refuse, before anything starts, a launcher that cannot run, a host that cannot be reached,
    or one with fewer GPUs than `nproc` processes."""
    problems = check_launcher(launcher) or check_reachable(hosts, workdir=os.getcwd(), nproc=nproc)
    if problems:
        raise ConfigError(problems)


def launch_cluster(run: RunDirectory, hosts: Sequence[Host], nproc: int, launcher: str,
                   hang_timeout_s: float) -> ClusterGroup:
    """Check the hosts, start a relay on each and the workers through `launcher`; return the group."""
    from nbtrain.relay.head import Relay

    addresses = [host_address(h.name) for h in hosts]
    port = free_port()  # a free port here is almost surely free on the first host too; gloo says if not
    tag = run.run_id  # unique per run: a relay ends only this run's workers
    exports = worker_exports(nproc, hang_timeout_s, tag)
    reserve = reserve_space(run)
    relays: list[Relay] = []
    group = ClusterGroup(run, tuple(hosts), nproc, relays, port, reserve=reserve)
    try:
        for index, host in enumerate(hosts):
            ranks = range(index * nproc, (index + 1) * nproc)
            relays.append(Relay(host.name, run.path, ranks, tag=tag))
        for relay in relays:
            relay.handshake(timeout=HANDSHAKE_TIMEOUT_S)
            relay.send_files()
        info = base64.urlsafe_b64encode(json.dumps(world_info(hosts, nproc)).encode()).decode()
        if launcher == "pdsh":
            group.runner = _start_pdsh(run, hosts, info, addresses[0], port, exports)
        else:
            for index, relay in enumerate(relays):
                relay.start_workers([sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={info}",
                                     f"--node_rank={index}", f"--master_addr={addresses[0]}", f"--master_port={port}",
                                     "--module", "--no_local_rank", "nbtrain.worker", str(run.path)],
                                    env=exports, cwd=os.getcwd())
    except BaseException:
        group.stop(grace=0)
        group.close()
        raise
    return group


def _start_pdsh(run: RunDirectory, hosts: Sequence[Host], world_info_base64: str, master_addr: str, port: int,
                exports: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Run, from here, the pdsh command that DeepSpeed's PDSHRunner builds for the run's workers."""
    from deepspeed.launcher.multinode_runner import PDSHRunner

    # The arguments DeepSpeed's runner would pass (deepspeed --module --no_local_rank ...).
    args = argparse.Namespace(user_script="nbtrain.worker", user_args=[str(run.path)], launcher_args="",
                              master_addr=master_addr, master_port=port, ssh_port=None, venv_script=None,
                              no_python=False, module=True, no_local_rank=True, save_pid=False,
                              enable_each_rank_log="None")
    runner = PDSHRunner(args, world_info_base64)
    for key, value in exports.items():
        runner.add_export(key, value)
    cmd, _kills_other_runs_too, env = runner.get_cmd(dict(os.environ), {h.name: [] for h in hosts})
    log = open(run.launcher_log, "ab")
    try:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        log.close()
