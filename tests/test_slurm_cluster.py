"""The SLURM test harness is real: Slurm 22.05 daemons on namespace hosts (tests/slurm.py).

Needs root (network namespaces) and the Slurm and munge packages; skipped without root.
Every test ends with an empty queue and no process in any namespace (the fixtures fail it
otherwise).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests import netns
from tests.slurm import SlurmCluster, _put_back, hosts_blocks, slurm_cluster, sweep_stale

pytestmark = pytest.mark.integration

# What a task reports: its node, Slurm's ranks, the job's node list and its network namespace.
REPORT = "echo $(hostname) $SLURM_PROCID $SLURM_LOCALID $SLURM_NODEID $SLURM_JOB_NODELIST $(readlink /proc/self/ns/net)"
SAME_IN_SALLOC = ["SLURM_JOB_ID", "SLURM_JOBID", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NUM_NODES",
                  "SLURM_NNODES", "SLURM_JOB_PARTITION", "SLURM_CLUSTER_NAME", "SLURM_JOB_CPUS_PER_NODE",
                  "SLURM_TASKS_PER_NODE", "SLURM_SUBMIT_HOST", "SLURM_JOB_NAME"]


def namespace_inode(namespace: str) -> str:
    return f"net:[{os.stat(f'/run/netns/{namespace}').st_ino}]"


def srun(sc: SlurmCluster, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["srun", *argv], env=env or sc.env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, f"srun {' '.join(argv)} failed ({done.returncode}): {done.stderr}\n{sc.logs()}"
    return done


def test_srun_places_two_tasks_in_each_namespace_with_slurm_s_ranks(slurm: SlurmCluster) -> None:
    sc = slurm
    done = srun(sc, "-N2", "-n4", "--ntasks-per-node=2", "sh", "-c", REPORT)
    tasks = sorted(tuple(line.split()) for line in done.stdout.splitlines())
    nodelist = sc.run("scontrol", "show", "hostlist", ",".join(sc.nodes)).stdout.strip()
    expected = sorted((node, str(2 * n + local), str(local), str(n), nodelist,
                       namespace_inode(sc.netns.namespaces[sc.hosts[node]]))
                      for n, node in enumerate(sc.nodes) for local in (0, 1))
    assert tasks == expected, done.stdout


def test_node_names_resolve_to_their_address_in_the_root_namespace_and_on_every_node(slurm: SlurmCluster) -> None:
    sc = slurm
    first = sc.nodes[0]
    assert socket.gethostbyname(first) == sc.addresses[first]
    for node in sc.nodes:
        resolved = subprocess.run(sc.run_on(node, ["getent", "hosts", first]), capture_output=True, text=True)
        assert resolved.stdout.split()[:2] == [sc.addresses[first], first], (node, resolved)
    # ... and a task reaches the first node by its name, the way a worker reaches the master.
    done = srun(sc, "-N2", "-n2", sys.executable, "-c", f"import socket; print(socket.gethostbyname({first!r}))")
    assert done.stdout.split() == [sc.addresses[first]] * 2


def test_the_cluster_s_env_alone_reaches_its_own_munged_and_controller(slurm: SlurmCluster) -> None:
    sc = slurm
    only = {"PATH": sc.env["PATH"], "SLURM_CONF": sc.env["SLURM_CONF"]}
    done = subprocess.run(["sinfo", "-h", "-o", "%P %D %t"], env=only, capture_output=True, text=True, timeout=30)
    assert done.stdout.split() == [f"{sc.partition}*", "2", "idle", "urgent", "2", "idle"], done.stderr
    config = sc.run("scontrol", "show", "config").stdout
    assert f"socket={sc.directory / 'munge.socket'}" in config
    without = {"PATH": sc.env["PATH"]}  # no SLURM_CONF: the system's (absent) configuration
    assert subprocess.run(["sinfo"], env=without, capture_output=True, timeout=30).returncode != 0


def test_salloc_grants_an_allocation_with_salloc_s_environment_and_scancel_ends_it(slurm: SlurmCluster) -> None:
    sc = slurm
    alloc = sc.salloc(2, job_name="held")
    assert [(j.job_id, j.name, j.state) for j in sc.squeue()] == [(alloc.job_id, "held", "RUNNING")]
    assert alloc.nodes == sc.nodes
    sc.scancel(alloc)
    assert sc.squeue() == []
    assert sc.job(alloc)["JobState"] == "CANCELLED"
    # The kernel's environment is the one a real salloc gives its shell (job ids aside).
    real = sc.run("salloc", "-N2", "--exclusive", "--job-name", "held", "printenv").stdout.splitlines()
    real_env = dict(line.split("=", 1) for line in real if line.startswith("SLURM_"))
    assert real_env["SLURM_JOB_ID"] != alloc.job_id
    for key in SAME_IN_SALLOC:
        mine = alloc.env[key] if key not in ("SLURM_JOB_ID", "SLURM_JOBID") else real_env[key]
        assert real_env.get(key) == mine, key


def test_an_allocation_not_granted_in_time_is_named_and_cancelled(slurm: SlurmCluster) -> None:
    sc = slurm
    held = sc.salloc(2, job_name="held")
    with pytest.raises(RuntimeError, match=r"not granted within 3 s: .*name='waiting', state='PENDING'"):
        sc.salloc(2, job_name="waiting", timeout=3)
    wait_for_queue(sc, [(held.job_id, "RUNNING", "None")])  # the waiting one is gone
    sc.scancel(held)


def test_the_allocation_s_traps_really_distort_a_step_run_with_them(slurm: SlurmCluster) -> None:
    # What the launch must strip: with them a step is one task pinned to CPU 0.
    sc = slurm
    alloc = sc.salloc(2)
    probe = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
    trapped = srun(sc, "--jobid", alloc.job_id, "-N2", "--ntasks-per-node=2", *probe, env=alloc.env)
    assert trapped.stdout.split() == ["[0]"], trapped.stdout
    clean = {k: v for k, v in alloc.env.items() if not k.startswith(("SLURM_CPU_BIND", "SLURM_MEM_PER", "SLURM_NTASKS",
                                                                      "SLURM_NPROCS"))}
    stepped = srun(sc, "--jobid", alloc.job_id, "-N2", "--ntasks-per-node=2", *probe, env=clean)
    assert len(stepped.stdout.split()) == 4, stepped.stdout
    sc.scancel(alloc)


def test_a_killed_slurmd_makes_its_node_down_and_a_restart_brings_it_back(slurm: SlurmCluster) -> None:
    sc = slurm
    lost = sc.nodes[1]
    sc.kill_slurmd(lost)
    assert sc.wait_for_state(lost, ("down*",), timeout=30) == "down*"
    assert sc.node_state(sc.nodes[0]) == "idle"
    sc.restart_slurmd(lost)
    assert sc.node_state(lost) == "idle"


def test_what_a_test_left_down_or_drained_is_named_and_put_back_for_the_next(slurm: SlurmCluster) -> None:
    sc = slurm
    sc.run("scontrol", "update", f"NodeName={sc.nodes[0]}", "State=DRAIN", "Reason=test")
    sc.run("scontrol", "update", f"PartitionName={sc.partition}", "State=DOWN")
    problems = _put_back(sc)
    assert problems == [f"partition {sc.partition} ['down']", f"node {sc.nodes[0]} drain"], problems
    assert _put_back(sc) == [] and srun(sc, "-N2", "true").returncode == 0


def test_gpus_and_partitions_are_declared_and_enforced() -> None:
    partitions = {"debug": {"nodes": "all", "max_time": "INFINITE", "default": True},
                  "short": {"nodes": 1, "max_time": "00:10:00"}}
    with slurm_cluster(2, cpus=4, gpus=2, partitions=partitions) as sc:
        assert sc.partition == "debug" and sc.partitions["short"] == sc.nodes[:1]
        seen = sc.run("sinfo", "-h", "-o", "%P|%D|%l|%G|%c").stdout.split()
        assert sorted(seen) == ["debug*|2|infinite|gpu:2|4", "short|1|10:00|gpu:2|4"]
        # Slurm's default (EnforcePartLimits=NO) queues a job over a partition's limits for ever:
        # why nbtrain must check them itself before it asks.
        over = {"PartitionTimeLimit": ["-t", "20"], "PartitionNodeLimit": ["-N2"]}
        for reason, args in over.items():
            job = sc.run("sbatch", "--parsable", "-p", "short", *args, "-o", "/dev/null", "--wrap", "true").stdout.strip()
            wait_for_queue(sc, [(job, "PENDING", reason)])
            sc.scancel(job)
        assert srun(sc, "-p", "short", "-t", "5", "hostname").stdout.split() == sc.nodes[:1]
        gpu = srun(sc, "-N1", "--gpus-per-node=2", "sh", "-c", "echo $SLURM_GPUS_ON_NODE")
        assert gpu.stdout.split() == ["2"]


def test_two_clusters_at_once_have_their_own_names_and_daemons() -> None:
    with slurm_cluster(1) as one, slurm_cluster(1) as two:
        assert set(one.nodes).isdisjoint(two.nodes) and one.conf != two.conf
        for sc in (one, two):
            assert srun(sc, "hostname").stdout.split() == sc.nodes


def test_teardown_ends_every_daemon_and_leaves_no_trace_even_after_a_lost_node() -> None:
    with slurm_cluster(2) as sc:
        daemons = [int((sc.directory / f).read_text()) for f in ("slurmctld.pid", "munged.pid")]
        daemons += [d.pid for d in sc.slurmd.values()]
        daemons += [child.pid for child in psutil.Process(daemons[0]).children(recursive=True)]  # slurmscriptd
        namespaces, tag, directory = list(sc.netns.namespaces.values()), sc.tag, sc.directory
        alloc = sc.salloc(2)
        step = subprocess.Popen(["srun", "--jobid", alloc.job_id, "-N2", "sleep", "600"], env=sc.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: any("sleep 600" in p for procs in sc.strays().values() for p in procs))
        sc.kill_slurmd(sc.nodes[1])  # a node lost mid-step: its task lives on
        sc.scancel(alloc)
        assert step.wait(timeout=30) != 0
    assert [pid for pid in daemons if netns._alive(pid)] == []
    assert set(namespaces).isdisjoint(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())
    assert tag not in hosts_blocks() and not directory.exists()


def test_teardown_fails_a_test_that_left_a_job_and_still_cleans_up() -> None:
    with pytest.raises(AssertionError, match=r"jobs in the queue: .*job_id='1', name='forgotten'"):
        with slurm_cluster(1) as sc:
            sc.salloc(1, job_name="forgotten")
            directory, tag = sc.directory, sc.tag
    assert not directory.exists() and tag not in hosts_blocks()


def test_teardown_fails_a_test_that_left_a_process_on_a_node_and_still_ends_it() -> None:
    with pytest.raises(AssertionError, match=r"processes in the namespaces: .*'node0': \['\d+ sleep 600'\]"):
        with slurm_cluster(1) as sc:
            left = subprocess.Popen(sc.run_on(sc.nodes[0], ["sleep", "600"]))
            namespace = sc.netns.namespaces["node0"]
    assert left.wait(timeout=10) == -signal.SIGKILL
    assert namespace not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_what_a_killed_test_run_left_is_swept_by_the_next(tmp_path: Path) -> None:
    script = ("from tests.slurm import slurm_cluster\nimport time\n"
              "with slurm_cluster(1) as sc:\n    print(sc.directory, flush=True)\n    time.sleep(600)\n")
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    assert run.stdout is not None
    directory = Path(run.stdout.readline().strip())
    controller = int((directory / "slurmctld.pid").read_text())
    os.kill(run.pid, signal.SIGKILL)  # no teardown at all
    run.wait()
    assert netns._alive(controller) and f"{run.pid}-0" in hosts_blocks()
    helpers = [child.pid for child in psutil.Process(controller).children(recursive=True)]  # slurmscriptd
    assert helpers, "slurmctld runs without its slurmscriptd"
    sweep_stale()
    wait_until(lambda: not any(netns._alive(pid) for pid in [controller, *helpers]))
    assert f"{run.pid}-0" not in hosts_blocks() and not directory.exists()
    stale = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
             if n.startswith(f"{netns.NAMESPACE_PREFIX}-{run.pid}-")]
    assert stale == []


def wait_for_queue(sc: SlurmCluster, expected: list[tuple[str, str, str]]) -> None:
    """Wait until squeue shows exactly `expected` (job id, state, reason)."""
    wait_until(lambda: [(j.job_id, j.state, j.reason) for j in sc.squeue()] == expected)


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"not within {timeout:g} s"
        time.sleep(0.1)
