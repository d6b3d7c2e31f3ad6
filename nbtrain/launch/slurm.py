"""SLURM runs: the cell's workers as the tasks of one srun step on an allocation.

`%%bigtrain --slurm --nodes N --nproc P` runs N x P workers as one job step:

    srun --jobid J -N N --ntasks-per-node P --kill-on-bad-exit=1 --label --input=all
         --job-name nbtrain-<launch> python -u -m nbtrain.worker RUN_DIR

- The allocation J is the kernel's own (SLURM_JOB_ID: JupyterLab in salloc/sbatch), else one
  nbtrain requests and gives back (`nbtrain.launch.slurm_allocation`); its queue state is the
  run's first start-up phase.
- Each task finds its rank in SLURM's variables (`nbtrain.worker.slurm`); MASTER_PORT is the
  head's pick. The step gets the kernel's environment minus what an outer allocation or step
  leaves that would distort it (`step_environment`); SLURM_CONF stays.
- Files: the run directory must be shared with the nodes (SLURM's norm: home and scratch
  are cluster filesystems); a probe step checks it before the workers start, and a run
  directory the nodes cannot read is refused, naming --run-dir. (No relay: srun could carry
  one, but a cluster without a shared filesystem is rare, and the relays' copying would cost
  every run what a shared folder gives for free.)
- Jobs reach the tasks on srun's stdin, which srun broadcasts (`--input=all`); reports come
  back as marked lines on srun's stdout, each labelled with its task (`--label`). A succeeded
  run's tasks therefore stay warm in the allocation, like local workers (`nbtrain.launch.pool`).
- Ends: `--kill-on-bad-exit` ends every task when one fails; Stop, an interrupt and a failure
  signal srun (it kills the step) and cancel the step by name if it lingers; the job's state
  (TIMEOUT, NODE_FAIL, PREEMPTED, CANCELLED from outside) is read with squeue and becomes the
  run's reason; an allocation nbtrain requested is cancelled whenever its group ends; the
  kernel's death is met by a guard process (`nbtrain.launch.slurm_guard`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtrain.config.plan import RunPlan
from nbtrain.config.slurm import salloc_command
from nbtrain.launch.launcher import (
    ALIVE_FD_ENV,
    COLLECTIVE_TIMEOUT_ENV,
    STOP_GRACE_S,
    collective_timeout_s,
    free_port,
    reserve_space,
    worker_environment,
)
from nbtrain.launch.slurm_allocation import (
    LIVE_STATES,
    Allocation,
    current_allocation,
    missing_tools,
    probe_shared,
    request_allocation,
    scancel,
    unshared_failure,
)
from nbtrain.launch.slurm_guard import step_ids
from nbtrain.launch.slurm_protocol import LAUNCHED_VARIABLE, REPORT_MARK, expand_hostlist
from nbtrain.rundir import RunDirectory

if TYPE_CHECKING:
    from nbtrain.relay.head import Relay

# What an outer allocation or step (JupyterLab started by salloc, sbatch or `srun --pty`) leaves
# in the kernel's environment that srun would apply to the workers' step: CPU binding to the
# kernel's one core (a 3x slowdown), its memory and task counts, its step's identity. Names are
# SLURM's input variables (srun(1), "INPUT ENVIRONMENT VARIABLES"); SLURM_CONF and the job's
# identity stay.
DISTORTING_PREFIXES = ("SLURM_CPU_BIND", "SLURM_MEM_PER_", "SLURM_NTASKS", "SLURM_STEP", "SLURM_CPUS_PER_",
                       "SLURM_GPUS_PER_TASK", "SLURM_TRES_PER_TASK", "SLURM_SRUN_COMM_", "SLURM_PTY_")
DISTORTING = {"SLURM_NPROCS", "SLURM_TASKS_PER_NODE", "SLURM_DISTRIBUTION", "SLURM_PROCID", "SLURM_LOCALID",
              "SLURM_NODEID", "SLURM_GTIDS", "SLURM_TASK_PID", "SLURM_STEPID", "SLURM_EXPORT_ENV", "SLURM_HINT",
              "SLURM_THREADS_PER_CORE", "SLURM_EXACT", "SLURM_OVERCOMMIT", "SLURM_LAUNCH_NODE_IPADDR",
              "SLURM_CPU_FREQ_REQ", "SLURM_UMASK"}
# torchrun's variables from the kernel's own environment: each task sets its own from SLURM's.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "GROUP_RANK",
                  "TORCHELASTIC_RUN_ID")
STATE_CHECK_EVERY_S = 2.0  # squeue while a step runs: cheap for the controller, quick enough for a user
SETTLE_S = 15.0  # how long a job that is ending may stay COMPLETING before its final state is taken as is
DRAIN_S = 3.0  # after srun ended, for its last lines (the ranks' reports)
_LABELLED = re.compile(r"^\s*(\d+): ?(.*)$")
# SLURM's job states that end a run, and what they mean for the user.
ENDED_BY = {"TIMEOUT": "the allocation reached its time limit", "NODE_FAIL": "a node of the allocation failed",
            "PREEMPTED": "the job was preempted", "CANCELLED": "the job was cancelled",
            "DEADLINE": "the job reached its deadline", "OUT_OF_MEMORY": "a task ran out of memory",
            "BOOT_FAIL": "a node failed to boot", "FAILED": "the job failed", "COMPLETED": "the job ended"}


def preflight(plan: RunPlan, environ: Mapping[str, str]) -> None:
    """Refuse, before the run directory exists, a SLURM run that cannot start: tools missing, the cluster's no."""
    from nbtrain.config.slurm import check_slurm
    from nbtrain.errors import ConfigError, Problem

    missing = missing_tools(environ)
    if missing:
        raise ConfigError([Problem("--slurm", "on", f"needs SLURM's {', '.join(missing)} on this machine's PATH",
                                   "run the notebook on a login node of the cluster, or install the Slurm client "
                                   "(Debian: apt-get install slurm-client)")])
    check_slurm(plan.config, environ)


def step_environment(nproc: int, port: int, hang_timeout_s: float, threads: int) -> dict[str, str]:
    """Return the environment of the srun step: the kernel's, cleaned, plus what every worker needs."""
    env = worker_environment(0, nproc, port, -1, threads)
    for key in [k for k in env if k in DISTORTING or k.startswith(DISTORTING_PREFIXES)]:
        del env[key]
    for key in (*RANK_VARIABLES, ALIVE_FD_ENV):
        env.pop(key, None)
    env.update({LAUNCHED_VARIABLE: "1", "MASTER_PORT": str(port),
                COLLECTIVE_TIMEOUT_ENV: str(collective_timeout_s(hang_timeout_s))})
    return env


def srun_command(job_id: str, name: str, nodes: int, nproc: int, run: RunDirectory, overlap: bool) -> list[str]:
    """Return the srun line of a run's workers."""
    return ["srun", "--jobid", job_id, "-N", str(nodes), "--ntasks-per-node", str(nproc), "--kill-on-bad-exit=1",
            "--label", "--input=all", "--job-name", name, *(["--overlap"] if overlap else []),
            sys.executable, "-u", "-m", "nbtrain.worker", str(run.path)]


class Guard:
    """The guard process of one launch: cancels its SLURM work if the kernel dies (see slurm_guard)."""

    def __init__(self, name: str, job: str | None, owned: bool, environ: Mapping[str, str]):
        read, self._write = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nbtrain.launch.slurm_guard", "--name", name,
                 *(["--job", job] if job else []), *(["--owned"] if owned else [])],
                stdin=read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(environ),
                start_new_session=True)  # the kernel's interrupt or group kill must not reach it
        finally:
            os.close(read)

    def serve(self, run: RunDirectory) -> None:
        """Tell the guard the run the step serves now (marked stopped if the kernel dies during it)."""
        try:
            os.write(self._write, f"run {run.path}\n".encode())
        except OSError:
            pass

    def disarm(self) -> None:
        """End the guard without cancelling anything (the kernel ended the launch itself)."""
        if self._write < 0:
            return
        try:
            os.write(self._write, b"exit\n")
        except OSError:
            pass
        os.close(self._write)
        self._write = -1
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class SlurmGroup:
    """The tasks of one srun step, as the supervisor and the pool see a group of workers."""

    run: RunDirectory  # the run being served
    srun: subprocess.Popen[bytes]
    allocation: Allocation
    guard: Guard
    name: str  # the step's (and an owned job's) name
    nodes: int
    nproc: int
    port: int
    started: float = field(default_factory=time.time)
    runs_served: int = 0
    failure: str | None = None
    failed_rank: int | None = None
    reserve: Path | None = None
    relays: list[Relay] = field(default_factory=list)  # for nodes that do not see the run directory
    _reports: list[list[str]] = field(default_factory=list)
    _stopping: bool = False
    _ended: bool = False
    _next_state_check: float = 0.0
    _reader: threading.Thread | None = None
    _task_nodes: list[str] | None = None  # a step keeps its nodes: squeue is asked once

    def __post_init__(self) -> None:
        self._reports = [[] for _ in range(self.world_size)]
        self._reader = threading.Thread(target=self._read_stdout, name=f"{self.name}-reports", daemon=True)
        self._reader.start()

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc

    @property
    def pids(self) -> list[int]:
        return [self.srun.pid]  # srun leads its own session: Stop from JupyterLab signals it, and it kills the step

    @property
    def pgid(self) -> int:
        return self.srun.pid

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [self.srun]

    def _read_stdout(self) -> None:
        """Sort srun's labelled stdout: reports to their rank, the rest to the launcher log."""
        assert self.srun.stdout is not None
        for raw in self.srun.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            match = _LABELLED.match(line)
            if match and match.group(2).startswith(REPORT_MARK) and int(match.group(1)) < self.world_size:
                self._reports[int(match.group(1))].append(match.group(2)[len(REPORT_MARK):])
                continue
            with open(self.run.launcher_log, "a") as log:
                log.write(line + "\n")

    def submit(self, run: RunDirectory, last: bool = False) -> None:
        """Send `run` to every task (srun broadcasts its stdin); `last`: the tasks end after it."""
        import json

        self.run = run
        self.guard.serve(run)
        if "slurm" not in run.status():  # a warm rerun: say which job it runs in, as a cold run's record does
            run.write_status(slurm={"job": self.allocation.job_id, "owned": self.allocation.owned})
        self.reserve = reserve_space(run)
        self._reports = [[] for _ in range(self.world_size)]
        self.failure, self.failed_rank = None, None
        job = json.dumps({"run": str(run.path), "launched_at": time.time(), "last": last}) + "\n"
        try:
            assert self.srun.stdin is not None
            self.srun.stdin.write(job.encode())
            self.srun.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # srun is gone: exit_codes says so
        self.runs_served += 1

    def exit_codes(self) -> list[int | None]:
        """Return each rank's result: 0 once it reported `done`; 1 for every other rank once the step ended."""
        if None in self._done() and self.failure is None:
            self._notice_end()
        ended = self.failure is not None or self.srun.poll() is not None
        codes = [1 if ended and code is None else code for code in self._done()]  # after _notice_end's drain
        if codes == [0] * len(codes):
            self._sync_relays()  # the ranks' results, outputs and records reach the head first
        return codes

    def _done(self) -> list[int | None]:
        return [0 if "done" in reports else None for reports in self._reports]

    def _notice_end(self) -> None:
        """Name why the step ended (or must end) before every rank was done: SLURM's job state, srun's exit."""
        now = time.monotonic()
        if self.srun.poll() is None and now < self._next_state_check:
            return
        self._next_state_check = now + STATE_CHECK_EVERY_S
        state = self._settled_state()
        if state is not None and state[0] not in LIVE_STATES:
            self._ended_by_slurm(*state)
            return
        code = self.srun.poll()
        if code is None:
            return
        if self._reader is not None:
            self._reader.join(DRAIN_S)  # the last reports may still be on their way
        if None not in self._done():
            return
        self._sync_relays()
        if self.run.errors():
            return  # a rank raised: its own error is the reason (nbtrain.launch.run._failure_reason)
        said = self._srun_error()
        self.failure = (f"the srun step ended with code {code} before every rank finished"
                        + (f": {said}" if said else "")
                        + f" (SLURM job {self.allocation.job_id}; srun's output in {self.run.launcher_log})")

    def _srun_error(self) -> str:
        """Return srun's last error line from the launcher log ("srun: error: ..."), or ""."""
        try:
            tail = self.run.launcher_log.read_text(errors="replace").splitlines()[-100:]
        except OSError:
            return ""
        said = [line.strip() for line in tail if line.lstrip().startswith(("srun: error:", "srun: fatal:"))]
        return said[-1][:500] if said else ""

    def _settled_state(self) -> tuple[str, str] | None:
        """Return the job's state; for a job that is ending (squeue: COMPLETING), the state it ends in."""
        deadline = time.monotonic() + SETTLE_S
        state = self.allocation.state()
        while state is not None and state[0] == "COMPLETING" and time.monotonic() < deadline:
            time.sleep(0.2)  # CANCELLED, TIMEOUT, NODE_FAIL... show once the job's tasks are gone
            state = self.allocation.state()
        return state

    def _ended_by_slurm(self, state: str, reason: str) -> None:
        why = ENDED_BY.get(state.split()[0], "SLURM ended the job")
        said = f"SLURM job {self.allocation.job_id} ended: {state}" + (f" ({reason})" if reason not in ("None", "") else "")
        if state.startswith("CANCELLED") and not self._stopping:
            # scancel from outside nbtrain: the user's (or an admin's) stop, not a failure of the run
            self.run.finish("stopped", f"{said}: cancelled from outside nbtrain (scancel); every task of the "
                            "step ended")
        self.failure = f"{said}: {why}; every task of the step ended"

    def _sync_relays(self, timeout: float = 10) -> None:
        for relay in self.relays:
            relay.sync(timeout=timeout)

    def alive(self) -> bool:
        # Relays carry one run's directory: a step with relays serves that run only.
        return self.srun.poll() is None and self.failure is None and not self.relays

    def running(self) -> bool:
        return self.srun.poll() is None

    def retired(self) -> str | None:
        for rank, reports in enumerate(self._reports):
            retired = [r for r in reports if r.startswith("retire")]
            if retired:
                return f"rank {rank} retired: {retired[0].removeprefix('retire ')}"
        return None

    def ended(self) -> str | None:
        """Return why this idle group cannot serve another run, or None."""
        retired = self.retired()
        if retired:
            return retired
        if self.srun.poll() is not None:
            return f"the srun step of SLURM job {self.allocation.job_id} ended with code {self.srun.returncode}"
        state = self.allocation.state()
        if state is not None and state[0] not in LIVE_STATES:
            return f"SLURM job {self.allocation.job_id} is {state[0]}"
        return None

    def wait_ready(self, timeout: float) -> str | None:
        """Wait until every task is clean for another run; return why the group cannot serve, or None."""
        deadline = time.monotonic() + timeout
        while True:
            if all("ready" in reports for reports in self._reports):
                return None
            ended = self.retired() or (None if self.srun.poll() is None else self.ended())
            if ended:
                return ended
            if time.monotonic() > deadline:
                return f"the workers were not clean again within {timeout:.0f} s of the last run"
            time.sleep(0.02)

    def wait_started(self, timeout: float) -> str | None:
        """Wait until every task took the job just submitted; return why not, or None."""
        deadline = time.monotonic() + timeout
        while not all("started" in reports for reports in self._reports):
            if self.srun.poll() is not None:
                return f"the srun step of SLURM job {self.allocation.job_id} ended while idle"
            if time.monotonic() > deadline:
                return f"the warm workers did not take the run within {timeout:.0f} s"
            time.sleep(0.005)
        return None

    def task_nodes(self) -> list[str]:
        """Return the node of each rank (the step's nodes, --ntasks-per-node tasks on each, in order)."""
        if self._task_nodes is None:
            nodes = self._step_nodes()
            if not nodes:
                return ["?"] * self.world_size  # squeue did not list the step (yet): ask again next time
            self._task_nodes = [nodes[rank // self.nproc] if rank // self.nproc < len(nodes) else "?"
                                for rank in range(self.world_size)]
        return self._task_nodes

    def _step_nodes(self) -> list[str]:
        """Return the nodes squeue lists for this step, in order ([] when it lists none)."""
        listed = subprocess.run(["squeue", "-h", "-s", "-j", self.allocation.job_id, "-o", "%j|%N"],
                                capture_output=True, text=True, env=self.allocation.environ, timeout=20).stdout
        nodelist = next((line.split("|", 1)[1] for line in listed.splitlines() if line.startswith(f"{self.name}|")), "")
        return expand_hostlist(nodelist) if nodelist.strip() else []

    def ended_words(self) -> str:
        """Return what `%bigtrain shutdown` ended, for the user."""
        return (f"ended {self.world_size} warm SLURM tasks of job {self.allocation.job_id}"
                + ("; nbtrain's allocation was released" if self.allocation.owned else ""))

    def describe_tasks(self, idle_s: float, keep_s: float, shape: Any) -> list[dict[str, Any]]:
        """Return one row per idle task for `%bigtrain workers`: rank, node, job, runs served, idle time left."""
        now = time.time()
        return [{"rank": rank, "node": node, "job": self.allocation.job_id, "owned": self.allocation.owned,
                 "srun_pid": self.srun.pid, "age_s": now - self.started, "runs_served": self.runs_served,
                 "idle_s": idle_s, "ends_in_s": max(0.0, keep_s - idle_s), "nproc": shape.nproc,
                 "backend": shape.backend} for rank, node in enumerate(self.task_nodes())]

    def stop(self, grace: float = STOP_GRACE_S) -> float:
        """End every task of the step (srun kills the step on SIGTERM), then give back nbtrain's allocation."""
        begun = time.monotonic()
        self._stopping = True
        self._sync_relays(timeout=2)  # the last records first
        if self.srun.poll() is None:
            self.srun.send_signal(signal.SIGTERM)
            try:
                self.srun.wait(timeout=max(grace, 1.0))
            except subprocess.TimeoutExpired:
                self._cancel_step()
                try:
                    self.srun.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.srun.kill()
                    self.srun.wait()
        self._end()
        return time.monotonic() - begun

    def _cancel_step(self) -> None:
        steps = step_ids(self.allocation.job_id, self.name, self.allocation.environ, timeout=20)
        if steps:
            scancel(steps, self.allocation.environ, "--signal=KILL")

    def _end(self) -> None:
        """Give back what the launch holds beyond the step: nbtrain's own allocation, the guard."""
        if self._ended:
            return
        self._ended = True
        # The tasks have ended: what they wrote last (after `done`: their logs' and metrics' ends)
        # is on their nodes now; carry it before the relays go.
        self._sync_relays()
        for relay in self.relays:
            relay.stop("the run ended", timeout=5)  # (stop closes it)
        self.allocation.release()
        self.guard.disarm()

    def shutdown(self, grace: float = STOP_GRACE_S) -> float:
        """End idle tasks the polite way (their stdin closes), then stop and give back the allocation."""
        begun = time.monotonic()
        self._close_job_channel()
        try:
            self.srun.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self.stop(grace=0)
        self.close()
        return time.monotonic() - begun

    def release_reserve(self) -> None:
        if self.reserve is not None:
            self.reserve.unlink(missing_ok=True)
            self.reserve = None

    def close(self) -> None:
        self._close_job_channel()
        if self.srun.poll() is not None:
            self._end()
        self.release_reserve()

    def _close_job_channel(self) -> None:
        if self.srun.stdin is not None:
            try:
                self.srun.stdin.close()
            except OSError:
                pass


def launch_slurm(run: RunDirectory, plan: RunPlan, hang_timeout_s: float, threads: int) -> SlurmGroup:
    """Get the allocation, check the run directory is shared, start the step; return its group.

    An interrupt or a failure on the way leaves nothing: nbtrain's own allocation is
    cancelled (pending or granted) and the run is marked stopped or failed.
    """
    cfg = plan.config
    environ = {k: v for k, v in os.environ.items() if k not in DISTORTING and not k.startswith(DISTORTING_PREFIXES)}
    name = f"nbtrain-{run.run_id}"
    allocation = current_allocation(os.environ)
    guard = Guard(name, allocation.job_id if allocation else None, owned=allocation is None, environ=environ)
    guard.serve(run)  # the kernel may die while salloc waits
    relays: list[Relay] = []
    try:
        if allocation is None:
            argv = salloc_command(name, plan.nodes, plan.nproc, cfg.partition, cfg.time_limit, cfg.account,
                                  cfg.gpus_per_node)
            allocation = request_allocation(argv, name, environ, run, lambda queue: run.write_status(slurm=queue))
        else:
            allocation.environ = environ
            run.write_status(slurm={"job": allocation.job_id, "owned": False})
        relays = relay_to(probe_shared(run, allocation, plan.nodes, sys.executable), run, allocation, name,
                          plan.nproc)
        port = free_port()
        log = open(run.launcher_log, "ab")
        try:
            srun = subprocess.Popen(srun_command(allocation.job_id, name, plan.nodes, plan.nproc, run,
                                                 overlap=not allocation.owned),
                                    env=step_environment(plan.nproc, port, hang_timeout_s, threads),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                    start_new_session=True)
        finally:
            log.close()
    except BaseException as exc:
        for relay in relays:
            relay.stop("the run did not start", timeout=5)
        if allocation is not None:
            allocation.release()
        guard.disarm()
        _finish_unstarted(run, exc)
        raise
    return SlurmGroup(run, srun, allocation, guard, name, plan.nodes, plan.nproc, port, relays=relays)


def relay_to(blind: Mapping[str, int], run: RunDirectory, allocation: Allocation, name: str,
             nproc: int) -> list[Relay]:
    """Start a relay on each node that does not see the run directory, carried by srun's stdin and stdout.

    The relay (the one that runs over ssh for --hosts) copies the run's input files there and
    carries that node's ranks' files back as they are written. It runs as a one-task step of
    the run's own name, so that the guard's and Stop's cancels reach it too.
    """
    from nbtrain.relay.head import Relay, RelayError, relay_argv

    relays: list[Relay] = []
    try:
        for node, index in sorted(blind.items(), key=lambda item: item[1]):
            ranks = range(index * nproc, (index + 1) * nproc)
            argv = ["srun", "--jobid", allocation.job_id, "--overlap", "-N1", "-n1", "-w", node, "--job-name", name,
                    *relay_argv(run.path, ranks, host=node, tag=name)]
            relays.append(Relay(node, run.path, ranks, tag=name, command=argv, environ=allocation.environ))
        for relay in relays:
            relay.handshake(timeout=60)
            relay.send_files()
    except (RelayError, OSError) as e:
        for relay in relays:
            relay.close()
        raise unshared_failure(run, allocation, blind, str(e)) from e
    return relays


def _finish_unstarted(run: RunDirectory, exc: BaseException) -> None:
    if isinstance(exc, KeyboardInterrupt):
        run.finish("stopped", "interrupted from the notebook before the workers started; nbtrain's SLURM "
                              "request was cancelled")
    else:
        run.finish("failed", str(exc))


def slurm_shape(plan: RunPlan) -> tuple[str, ...]:
    """Return the `hosts` of a SLURM run's launch shape: the request, and the kernel's own job if inside one."""
    cfg = plan.config
    inside = current_allocation(os.environ)
    return ("slurm", f"job {inside.job_id}" if inside else "nbtrain's own allocation", f"{plan.nodes} node(s)",
            f"partition {cfg.partition}", f"time {cfg.time_limit}", f"account {cfg.account}",
            f"gpus per node {cfg.gpus_per_node}")
