"""The SLURM allocation a run's step goes into: the kernel's own, or one nbtrain requests and gives back.

Inside an allocation (SLURM_JOB_ID in the kernel's environment: JupyterLab started by
salloc or sbatch) nbtrain uses it. Otherwise it runs `salloc --no-shell --job-name
nbtrain-<run> -N nodes ...`, which blocks until SLURM grants it, and meanwhile publishes
the job's queue state (`squeue`: "PENDING|Resources") in the run's status.json, where every
view reads the start-up phase (`nbtrain.rundir.progress`). Job states come from squeue
(`-t all`: a job that ended stays listed for MinJobAge) and `scontrol show job`, never from
sacct: accounting is optional on a cluster.

Every command gets the kernel's environment (SLURM_CONF kept) and a timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from nbtrain.errors import Problem, RunFailed
from nbtrain.rundir import RunDirectory

COMMAND_TIMEOUT_S = 20.0
QUEUE_POLL_S = 1.0
RELEASE_TIMEOUT_S = 30.0
# States in which a job's tasks may run; any other state of a live step's job ends the run
# (COMPLETING: the job is ending, its final state follows).
LIVE_STATES = ("RUNNING", "CONFIGURING", "PENDING")
_JOB_LINE = re.compile(r"(?:Pending|Granted) job allocation (\d+)")


@dataclass
class Allocation:
    """A SLURM job whose nodes run the steps; `owned` when nbtrain requested it (and must release it)."""

    job_id: str
    owned: bool
    environ: dict[str, str]

    def state(self) -> tuple[str, str] | None:
        """Return the job's (state, reason), e.g. ("RUNNING", "None"); None once SLURM forgot it."""
        return job_state(self.job_id, self.environ)

    def release(self) -> None:
        """Cancel the job if nbtrain requested it, and wait until it has left the queue."""
        if not self.owned:
            return
        scancel([self.job_id], self.environ)
        deadline = time.monotonic() + RELEASE_TIMEOUT_S
        while time.monotonic() < deadline:
            state = self.state()
            if state is None or state[0] not in LIVE_STATES + ("COMPLETING",):
                return
            time.sleep(0.2)


def job_state(job_id: str, environ: Mapping[str, str]) -> tuple[str, str] | None:
    """Return (state, reason) of job `job_id` from squeue, else from scontrol; None when unknown."""
    out = _run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T|%r"], environ)
    line = out.strip().splitlines()[0] if out and out.strip() else ""
    if "|" in line:
        state, reason = line.split("|", 1)
        return state.strip(), reason.strip()
    shown = _run(["scontrol", "show", "job", job_id], environ) or ""
    found = dict(re.findall(r"\b(JobState|Reason)=(\S+)", shown))
    return (found["JobState"], found.get("Reason", "None")) if "JobState" in found else None


def scancel(targets: list[str], environ: Mapping[str, str], *options: str) -> None:
    """Run `scancel OPTIONS TARGETS` (job ids, job.step ids); a job already gone is no error."""
    _run(["scancel", *options, *targets], environ)


def _run(argv: list[str], environ: Mapping[str, str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=dict(environ), timeout=COMMAND_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout


def current_allocation(environ: Mapping[str, str]) -> Allocation | None:
    """Return the allocation the kernel runs inside (SLURM_JOB_ID), or None."""
    job = environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID")
    return Allocation(job, owned=False, environ=dict(environ)) if job else None


def request_allocation(argv: list[str], name: str, environ: dict[str, str], run: RunDirectory,
                       publish: Callable[[dict[str, object]], object]) -> Allocation:
    """Run `argv` (salloc) until SLURM grants the job, publishing its queue state each second.

    Interrupted (KeyboardInterrupt) or failing, nothing is left in the queue: the job,
    granted or still pending, is cancelled by its name.
    """
    salloc = subprocess.Popen(argv, env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(salloc.stdout or ()), daemon=True)  # type: ignore[arg-type]
    reader.start()
    requested = time.time()
    try:
        job_id: str | None = None
        while salloc.poll() is None:
            job_id = job_id or _job_id(said)
            if job_id is not None:
                state = job_state(job_id, environ) or ("PENDING", "")
                publish({"job": job_id, "owned": True, "state": state[0], "reason": state[1],
                         "requested": requested})
            time.sleep(QUEUE_POLL_S)
        reader.join(timeout=5)
        job_id = job_id or _job_id(said)
        if salloc.returncode != 0 or job_id is None:
            words = " ".join(line.strip() for line in said).strip() or f"exit code {salloc.returncode}"
            raise RunFailed(f"run {run.run_id} failed: SLURM refused the allocation: {words}")
    except BaseException:
        salloc.kill()
        scancel([], environ, "--name", name)
        salloc.wait()
        raise
    publish({"job": job_id, "owned": True, "state": "RUNNING", "reason": "None", "requested": requested,
             "granted": time.time()})
    return Allocation(job_id, owned=True, environ=environ)


def _job_id(lines: list[str]) -> str | None:
    for line in list(lines):
        match = _JOB_LINE.search(line)
        if match:
            return match.group(1)
    return None


def missing_tools(environ: Mapping[str, str]) -> list[str]:
    """Return the SLURM commands nbtrain needs that are not on the kernel's PATH."""
    path = environ.get("PATH", os.defpath)
    return [tool for tool in ("srun", "salloc", "squeue", "scancel", "scontrol") if shutil.which(tool, path=path) is None]


def probe_shared(run: RunDirectory, allocation: Allocation, nodes: int, python: str) -> dict[str, int]:
    """Return the nodes of the step that do not see the run directory, with their index in the step
    (SLURM_NODEID: the ranks of node k are k*nproc...), from a tiny srun step that reads a token there."""
    import secrets

    token = secrets.token_hex(8)
    probe = run.path / ".slurm-probe"
    probe.write_text(token)
    code = ("import os,socket,sys; p=sys.argv[1]\n"
            "try: seen=open(p).read()\nexcept OSError as e: seen=repr(e)\n"
            "print(socket.gethostname(), os.environ.get('SLURM_NODEID', '?'), seen)")
    argv = ["srun", "--jobid", allocation.job_id, "-N", str(nodes), "--ntasks-per-node", "1", "--overlap",
            "--kill-on-bad-exit=1", python, "-c", code, str(probe)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=allocation.environ, timeout=120,
                              stdin=subprocess.DEVNULL)
        out, err, code_ = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired:
        out, err, code_ = "", "the probe step did not end within 120 s", None
    finally:
        probe.unlink(missing_ok=True)
    blind, unplaced = blind_nodes(out, token)
    if unplaced:  # no node index: their ranks' files could not be carried to the right node
        raise unshared_failure(run, allocation, unplaced, "their probe tasks had no SLURM_NODEID")
    if code_ != 0 and not blind:
        raise RunFailed(f"run {run.run_id} failed: the srun probe step in SLURM job {allocation.job_id} failed "
                        f"(code {code_}): {err.strip()[-500:]}")
    return blind


def blind_nodes(probe_output: str, token: str) -> tuple[dict[str, int], list[str]]:
    """Read the probe's `HOST SLURM_NODEID WHAT-IT-READ` lines: return the nodes that did not read
    `token`, by their index in the step, and those among them with no index."""
    blind: dict[str, int] = {}
    unplaced: list[str] = []
    for line in probe_output.splitlines():
        if not line.strip():
            continue
        host, index, seen = ([*line.split(None, 2), "", ""])[:3]
        if seen.strip() == token:
            continue
        if index.isdigit():
            blind[host] = int(index)
        else:
            unplaced.append(host)
    return blind, unplaced


def unshared_failure(run: RunDirectory, allocation: Allocation, blind: Iterable[str], why: str) -> RunFailed:
    """Return the failure of a run whose directory some nodes do not see and whose files could not be carried."""
    # Not a ConfigError ("nothing was started"): the allocation was requested and the run folder exists.
    problem = Problem("--run-dir", str(run.path.parent),
                      f"the run directory is not on a filesystem that SLURM's nodes share: "
                      f"{', '.join(sorted(blind))} cannot read {run.path}, and relaying its files there failed "
                      f"({why})",
                      "put the runs folder on a shared filesystem (home or a cluster filesystem "
                      "mounted on every node) with --run-dir DIR")
    ended = "nbtrain's allocation was released" if allocation.owned else "no workers were started in it"
    return RunFailed(f"run {run.run_id} failed before its workers started (SLURM job {allocation.job_id}: "
                     f"{ended}): {problem}")
