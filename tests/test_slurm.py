"""%%bigtrain --slurm on a real two-node Slurm cluster (tests/slurm.py), through a real kernel.

The kernel runs on the head (the root namespace), either inside an allocation (its
environment is what salloc gives a shell, with the traps an outer allocation leaves:
SLURM_CPU_BIND to CPU 0, SLURM_NTASKS=1, ...) or outside any, when nbtrain requests one.
The workers are the tasks of one srun step on the namespace nodes; the run directory is
shared (the namespaces see the head's filesystem), as on a cluster.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from nbtrain.commands import runs_table
from nbtrain.launch.slurm import step_environment
from nbtrain.launch.slurm_allocation import blind_nodes
from nbtrain.launch.slurm_protocol import expand_hostlist
from nbtrain.rundir import RunDirectory
from nbtrain.rundir.progress import read_startup
from nbtrain.worker.slurm import rank_variables
from tests.conftest import NOTEBOOK_SETUP, PACED_FIT, has_trained, losses, status_of
from tests.kernel import Kernel
from tests.slurm import Allocation, SlurmCluster  # its fixtures `slurm`, `slurm_shared` come through tests/conftest.py
from tests.test_multinode import assert_a_rank_raising_fails_the_run, only

integration = pytest.mark.integration  # the real cluster's tests; the unit tests below run everywhere

FIT = "bigtrain.fit(make_model(), ToyData(), loss_fn=loss_fn)"


def test_hostlists_expand_as_slurm_writes_them() -> None:
    assert expand_hostlist("node[1-2,5]") == ["node1", "node2", "node5"]
    assert expand_hostlist("a[01-03]b,login") == ["a01b", "a02b", "a03b", "login"]
    assert expand_hostlist("r[1-2]n[8-9]") == ["r1n8", "r1n9", "r2n8", "r2n9"]


def test_the_probe_names_the_nodes_that_did_not_read_the_token_by_their_index() -> None:
    out = ("n0 0 tok\n"
           "n1 1 FileNotFoundError(2, 'No such file or directory')\n"
           "n2 2 \n"  # read an empty file
           "n3 ? other\n")  # no SLURM_NODEID: its ranks cannot be placed
    assert blind_nodes(out, "tok") == ({"n1": 1, "n2": 2}, ["n3"])
    assert blind_nodes("n0 0 tok\nn1 1 tok\n", "tok") == ({}, [])


def test_a_task_gets_torchs_variables_from_slurms(monkeypatch: pytest.MonkeyPatch) -> None:
    task = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
            "SLURM_JOB_NODELIST": "login,localhost", "SLURM_STEP_NODELIST": "localhost,login",
            "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "MASTER_PORT": "29555"}
    assert rank_variables(task) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "GROUP_RANK": "1",
                                    "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}


def test_the_step_leaves_the_outer_allocations_traps_behind_and_keeps_slurm_conf(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # What a kernel in `srun --pty` or salloc has: binding to CPU 0 (3x slower workers), one task.
    traps = {"SLURM_CPU_BIND": "quiet,mask_cpu:0x1", "SLURM_CPU_BIND_TYPE": "mask_cpu:", "SLURM_MEM_PER_CPU": "100",
             "SLURM_NTASKS": "1", "SLURM_NPROCS": "1", "SLURM_TASKS_PER_NODE": "1", "SLURM_CPUS_PER_TASK": "1",
             "SLURM_DISTRIBUTION": "cyclic", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "RANK": "5"}
    for key, value in {**traps, "SLURM_CONF": "/etc/slurm/x.conf", "SLURM_JOB_ID": "7"}.items():
        monkeypatch.setenv(key, value)
    env = step_environment(nproc=2, port=29555, hang_timeout_s=30, threads=1)
    assert not set(traps) & set(env), sorted(set(traps) & set(env))
    assert env["SLURM_CONF"] == "/etc/slurm/x.conf" and env["SLURM_JOB_ID"] == "7"
    assert env["MASTER_PORT"] == "29555" and env["NBTRAIN_SLURM"] == "1"


def start_kernel(cwd: Path, env: dict[str, str]) -> Kernel:
    kernel = Kernel(cwd, env=env)
    kernel.execute("%load_ext nbtrain")
    kernel.execute(NOTEBOOK_SETUP)
    return kernel


@pytest.fixture
def outside(slurm: SlurmCluster, tmp_path: Path) -> Iterator[Kernel]:
    """A kernel on the head outside any allocation: nbtrain requests one."""
    kernel = start_kernel(tmp_path, slurm.env)
    try:
        yield kernel
    finally:
        kernel.shutdown()


@contextmanager
def allocated(sc: SlurmCluster, nodes: int = 2, **salloc: Any) -> Iterator[Allocation]:
    """An allocation of the test's own (nodes kept busy, or a kernel's home), cancelled at the end."""
    alloc = sc.salloc(nodes, **salloc)
    try:
        yield alloc
    finally:
        sc.scancel(alloc)


@contextmanager
def kernel_inside(sc: SlurmCluster, root: Path, **salloc: Any) -> Iterator[tuple[Allocation, Kernel]]:
    """A kernel started inside an allocation (as JupyterLab under salloc would be), both ended at the end."""
    with allocated(sc, **salloc) as alloc:
        kernel = start_kernel(root, alloc.env)
        try:
            yield alloc, kernel
        finally:
            kernel.shutdown()


def nbtrain_jobs(sc: SlurmCluster) -> list[str]:
    """Return the queue's jobs that nbtrain requested (named nbtrain-<run id>)."""
    return [f"{j.job_id} {j.state}" for j in sc.squeue() if j.name.startswith("nbtrain-")]


def wait_until(condition: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > end:
            raise AssertionError(f"{what} not within {timeout:g} s")
        time.sleep(0.2)


def test_a_machine_without_srun_is_refused_before_anything_starts(tmp_path: Path) -> None:
    from nbtrain.config.arguments import parse_line
    from nbtrain.config.machine import MachineFacts
    from nbtrain.config.plan import plan_run
    from nbtrain.errors import ConfigError
    from nbtrain.launch.slurm import preflight

    plan = plan_run(parse_line("--slurm --nodes 2 --nproc 1"), MachineFacts(gpu_count=0))
    with pytest.raises(ConfigError) as refused:
        preflight(plan, {"PATH": str(tmp_path)})  # no Slurm client there
    assert "--slurm" in str(refused.value) and "srun" in str(refused.value) and "slurm-client" in str(refused.value)


@integration
def test_inside_an_allocation_2x1_and_2x2_under_zero3_reach_the_single_host_losses(
        slurm: SlurmCluster, tmp_path: Path) -> None:
    alloc = slurm.salloc(2)  # whole nodes, and the outer allocation's traps in the kernel's environment
    kernel = start_kernel(tmp_path, alloc.env)
    try:
        flags = "--steps 5 --micro-batch 4 --zero 3 --no-plot --keep-warm 0"
        # The single-host runs on the head, which has no veth0 (the nodes' interface, for gloo).
        kernel.execute("import os\nifname = os.environ.pop('GLOO_SOCKET_IFNAME')")
        kernel.execute(f"%%bigtrain --nproc 2 {flags} --name one2\n{FIT}")
        kernel.execute(f"%%bigtrain --nproc 4 {flags} --name one4\n{FIT}", timeout=240)
        kernel.execute("os.environ['GLOO_SOCKET_IFNAME'] = ifname")
        out = kernel.execute(f"%%bigtrain --slurm --nproc 1 {flags} --name two1 --out r\nr = {FIT}", timeout=240)
        kernel.execute(f"%%bigtrain --slurm --nodes 2 --nproc 2 {flags} --name two2\n{FIT}", timeout=300)
        assert kernel.execute("print(r.steps)").text.strip() == "5", out.text
    finally:
        kernel.shutdown()
        queue = slurm.squeue()
        slurm.scancel(alloc)
    two1, two2 = only(tmp_path, "two1"), only(tmp_path, "two2")
    assert status_of(two1)["state"] == "succeeded" and status_of(two2)["state"] == "succeeded"
    assert losses(two1) == losses(only(tmp_path, "one2")) and len(losses(two1)) == 5
    assert losses(two2) == losses(only(tmp_path, "one4")) and len(losses(two2)) == 5
    # Every rank ran on a SLURM node, and the step ran in the kernel's own allocation.
    assert {p.name for p in (two2 / "heartbeats").iterdir()} == {f"rank-{r}.json" for r in range(4)}
    assert status_of(two2)["slurm"] == {"job": alloc.job_id, "owned": False}
    said = (two2 / "logs/launcher.log").read_text()
    placed = dict(re.findall(r"nbtrain: rank (\d) of 4 on (\S+) ", said))
    assert sorted(placed) == ["0", "1", "2", "3"] and set(placed.values()) == set(alloc.nodes), said
    assert [j.job_id for j in queue] == [alloc.job_id], "the runs left a job in the queue"


@integration
def test_nbtrain_requests_an_allocation_shows_it_pending_then_gives_it_back(
        slurm: SlurmCluster, outside: Kernel, tmp_path: Path) -> None:
    busy = slurm.salloc(2)  # every node taken: nbtrain's request waits for Resources
    seen: list[str] = []
    tables: list[str] = []

    def free_the_nodes_once_pending() -> None:
        runs = tmp_path / "bigtrain-runs"
        end = time.monotonic() + 120
        while time.monotonic() < end:
            for path in runs.glob("*-queued-*") if runs.is_dir() else ():
                startup = read_startup(RunDirectory(path))
                if startup is not None and startup.current.key == "queue":
                    seen.append(startup.current.label)
                    if "pending (Resources)" in startup.current.label:
                        tables.append(runs_table(runs))  # what `%bigtrain runs` shows meanwhile
                        slurm.scancel(busy)
                        return
            time.sleep(0.2)

    helper = threading.Thread(target=free_the_nodes_once_pending, daemon=True)
    helper.start()
    out = outside.execute(f"%%bigtrain --slurm --nodes 2 --nproc 1 --steps 3 --micro-batch 4 --no-plot --keep-warm 0 "
                          f"--time 10 --name queued\n{FIT}", timeout=300)
    helper.join(timeout=5)
    run = only(tmp_path, "queued")
    status = status_of(run)
    assert status["state"] == "succeeded", out.text
    assert any("pending (Resources)" in label for label in seen), seen
    assert "starting: waiting for SLURM's allocation: job" in tables[0] and "pending (Resources)" in tables[0]
    assert status["slurm"]["owned"] and status["slurm"]["granted"] >= status["slurm"]["requested"]
    assert nbtrain_jobs(slurm) == [], "nbtrain's allocation was left in the queue"


@integration
def test_a_rerun_starts_in_the_warm_tasks_on_nbtrains_allocation_until_shutdown(
        slurm: SlurmCluster, outside: Kernel, tmp_path: Path) -> None:
    cell = f"%%bigtrain --slurm --nodes 2 --nproc 1 --steps 3 --micro-batch 4 --no-plot --name {{name}}\n{FIT}"
    outside.execute(cell.format(name="cold"), timeout=240)
    (job,) = nbtrain_jobs(slurm)  # kept, with the idle tasks in it
    workers = outside.execute("%bigtrain workers").text
    outside.execute(cell.format(name="warm"), timeout=120)
    cold, warm = only(tmp_path, "cold"), only(tmp_path, "warm")
    assert status_of(warm)["workers"]["warm"], status_of(warm)["workers"]
    assert losses(warm) == losses(cold) and len(losses(warm)) == 3
    assert nbtrain_jobs(slurm) == [job], "the rerun did not stay in the same allocation"
    # Regression (issue 17 review): a warm rerun's status.json had no `slurm` record, only the cold run said its job.
    job_id = job.split()[0]
    assert status_of(cold)["slurm"]["job"] == job_id and status_of(warm)["slurm"] == {"job": job_id, "owned": True}
    assert "2 SLURM tasks on 2 node(s)" in workers and all(node in workers for node in slurm.nodes), workers
    firsts = [status_of(run)["timings"]["first_step_s"] for run in (cold, warm)]
    print(f"\nfirst step after the cell started: cold {firsts[0]:.1f} s (allocation, probe, srun, imports), "
          f"warm {firsts[1]:.1f} s\n{workers}")
    ended = outside.execute("%bigtrain shutdown").text
    assert "nbtrain's allocation was released" in ended, ended
    assert nbtrain_jobs(slurm) == [], "shutdown left nbtrain's allocation in the queue"
    wait_until(lambda: slurm.strays() == {}, 30, "every task gone from the nodes")


def start_in_the_background(kernel: Kernel, name: str, extra: str = "") -> None:
    """Start a long 2-node run as `handle` and return once it has logged a few steps."""
    kernel.execute(f"%%bigtrain --slurm --nodes 2 --nproc 1 --steps 100000 --micro-batch 4 --no-plot --background "
                   f"--name {name} {extra}\n{PACED_FIT}", timeout=180)
    kernel.execute("handle = _\nimport time\nwhile len(handle.metrics) < 3: time.sleep(0.2)", timeout=120)


def assert_nothing_left(sc: SlurmCluster, what: str) -> None:
    wait_until(lambda: nbtrain_jobs(sc) == [], 30, f"nbtrain's allocation gone after {what}")
    wait_until(lambda: sc.strays() == {}, 30, f"every task gone from the nodes after {what} ({sc.strays()})")


def assert_ended(root: Path, name: str, state: str, words: str) -> dict[str, Any]:
    """Assert the run `name` ended in `state` with `words` in its reason (both shown when not); return its status."""
    status = status_of(only(root, name))
    assert status["state"] == state and words in str(status.get("reason")), (status["state"], status.get("reason"))
    return status


@integration
def test_scancel_from_outside_stops_the_run_with_slurms_word(
        slurm: SlurmCluster, outside: Kernel, tmp_path: Path) -> None:
    start_in_the_background(outside, "cancelled")
    (job,) = nbtrain_jobs(slurm)
    slurm.run("scancel", job.split()[0])
    out = outside.execute("handle.wait()", allow_error=True, timeout=120)
    status = assert_ended(tmp_path, "cancelled", "stopped", "CANCELLED")
    assert "cancelled from outside nbtrain" in out.text, out.text
    assert_nothing_left(slurm, "scancel")
    print(f"\nscancel from outside -> the user saw: {status['reason']}")


@integration
def test_a_lost_node_fails_the_run_with_node_fail(
        slurm: SlurmCluster, outside: Kernel, tmp_path: Path) -> None:
    start_in_the_background(outside, "lost")
    slurm.kill_slurmd(slurm.nodes[1])
    out = outside.execute("handle.wait()", allow_error=True, timeout=180)
    status = status_of(only(tmp_path, "lost"))
    assert status["state"] == "failed", (status["state"], status.get("reason"))
    assert "NODE_FAIL" in status["reason"], (status["state"], status.get("reason"))
    assert out.error is not None and "NODE_FAIL" in out.error.text
    print(f"\nslurmd of {slurm.nodes[1]} killed -> the user saw: {status['reason']}")
    wait_until(lambda: nbtrain_jobs(slurm) == [], 60, "nbtrain's allocation gone after the node loss")
    slurm.restart_slurmd(slurm.nodes[1])  # SLURM ends the lost node's leftover step once it is back
    wait_until(lambda: slurm.strays() == {}, 60, f"every task gone from the nodes ({slurm.strays()})")


@integration
def test_preemption_by_a_higher_tier_fails_the_run_with_preempted(
        slurm: SlurmCluster, outside: Kernel, tmp_path: Path) -> None:
    start_in_the_background(outside, "preempted")
    # A job of the "urgent" partition (a higher PriorityTier on the same nodes) takes them: SLURM
    # cancels nbtrain's job as PREEMPTED.
    with allocated(slurm, partition="urgent", job_name="urgent"):
        out = outside.execute("handle.wait()", allow_error=True, timeout=120)
        status = assert_ended(tmp_path, "preempted", "failed", "PREEMPTED")
        assert out.error is not None and "the job was preempted" in out.error.text, out.text
        assert_nothing_left(slurm, "preemption")
    print(f"\npreempted by an urgent job -> the user saw: {status['reason']}")


def interrupt_the_cell(kernel: Kernel, root: Path) -> None:
    kernel.execute(f"%%bigtrain --slurm --nodes 2 --nproc 1 --steps 100000 --micro-batch 4 --no-plot "
                   f"--name stopped\n{PACED_FIT}", interrupt_after=has_trained(root, "stopped"), allow_error=True,
                   timeout=180)


def stop_from_jupyterlab(kernel: Kernel, root: Path) -> None:
    import asyncio

    from nbtrain.server.workers import stop_run

    start_in_the_background(kernel, "stopped")
    loop = asyncio.new_event_loop()  # not asyncio.run: later server tests need a current loop
    try:
        loop.run_until_complete(stop_run(RunDirectory(only(root, "stopped")), grace_s=5))
    finally:
        loop.close()
    kernel.execute("handle.wait()", allow_error=True, timeout=60)


def kill_the_kernel(kernel: Kernel, root: Path) -> None:
    start_in_the_background(kernel, "stopped")
    kernel.kill()


# How a user (or fate) stops a run -> the words its reason must hold.
STOPS = {"an interrupt": (interrupt_the_cell, "interrupted"),
         "Stop from JupyterLab": (stop_from_jupyterlab, "stopped from JupyterLab"),
         "the kernel's death": (kill_the_kernel, "the kernel died")}


@integration
@pytest.mark.parametrize("how", list(STOPS))
def test_each_way_of_stopping_ends_every_task_and_gives_nbtrains_allocation_back(
        how: str, slurm: SlurmCluster, outside: Kernel, tmp_path: Path) -> None:
    stop, words = STOPS[how]
    stop(outside, tmp_path)
    assert_nothing_left(slurm, how)
    assert_ended(tmp_path, "stopped", "stopped", words)


@integration
def test_a_rank_raising_fails_the_run_with_its_traceback_and_ends_the_step(
        slurm: SlurmCluster, outside: Kernel, tmp_path: Path) -> None:
    assert_a_rank_raising_fails_the_run(outside, "--slurm --nodes 2", tmp_path, "the second node")
    assert_nothing_left(slurm, "a failing rank")


@integration
def test_keep_warm_expiry_ends_the_tasks_and_releases_nbtrains_allocation(
        slurm: SlurmCluster, outside: Kernel, tmp_path: Path) -> None:
    outside.execute(f"%%bigtrain --slurm --nodes 2 --nproc 1 --steps 2 --micro-batch 4 --no-plot --keep-warm 3 "
                    f"--name brief\n{FIT}", timeout=180)
    assert status_of(only(tmp_path, "brief"))["state"] == "succeeded"
    assert_nothing_left(slurm, "--keep-warm 3 ran out")
    assert "no warm workers" in outside.execute("%bigtrain workers").text


@integration
def test_a_node_that_does_not_see_the_run_directory_gets_its_files_through_a_relay_over_srun(
        slurm: SlurmCluster, outside: Kernel, tmp_path: Path) -> None:
    import subprocess

    runs = tmp_path / "bigtrain-runs"
    runs.mkdir()
    # An empty tmpfs over the runs folder in one node's mount namespace (its slurmd's, which
    # its tasks inherit): that node no longer sees what the head writes there.
    slurmd = str(slurm.slurmd[slurm.nodes[1]].pid)

    def on_the_node(*argv: str) -> str:
        return subprocess.run(["nsenter", "-t", slurmd, "-m", *argv], capture_output=True, text=True).stdout

    subprocess.run(["nsenter", "-t", slurmd, "-m", "mount", "-t", "tmpfs", "none", str(runs)], check=True)
    try:
        out = outside.execute(f"%%bigtrain --slurm --nodes 2 --nproc 1 --steps 4 --micro-batch 4 --no-plot "
                              f"--keep-warm 0 --name unshared\n{FIT}", timeout=240)
        run = only(tmp_path, "unshared")
        # What rank 1 wrote on its node, whole.
        written = {name: on_the_node("cat", str(run / name)) for name in ("logs/rank-1.log", "utilization/rank-1.jsonl")}
    finally:
        subprocess.run(["nsenter", "-t", slurmd, "-m", "umount", str(runs)], check=True)
    assert status_of(run)["state"] == "succeeded", out.text
    assert "rank 1 of 2" in (run / "logs/launcher.log").read_text()  # rank 1 ran on the node that cannot see
    assert len(losses(run)) == 4
    assert written["utilization/rank-1.jsonl"].strip(), "rank 1 wrote no utilization records on its node"
    for name, text in written.items():  # an empty one too: the head has it, empty
        assert (run / name).read_text() == text, f"{name} did not reach the head whole"
    assert {p.name for p in (run / "heartbeats").iterdir()} == {"rank-0.json", "rank-1.json"}
    assert_nothing_left(slurm, "the relayed run")


@integration
def test_the_allocations_time_limit_fails_the_run_with_timeout(
        slurm: SlurmCluster, outside: Kernel, tmp_path: Path) -> None:
    start_in_the_background(outside, "late", extra="--time 1")  # one minute
    out = outside.execute("handle.wait()", allow_error=True, timeout=240)
    status = assert_ended(tmp_path, "late", "failed", "TIMEOUT")
    assert out.error is not None and "time limit" in out.error.text, out.text
    assert_nothing_left(slurm, "the time limit")
    print(f"\n--time 1 ran out -> the user saw: {status['reason']}")


@integration
def test_interrupting_a_request_still_pending_takes_it_out_of_the_queue(
        slurm: SlurmCluster, outside: Kernel, tmp_path: Path) -> None:
    with allocated(slurm):  # every node busy: nbtrain's request waits
        outside.execute(f"%%bigtrain --slurm --nodes 2 --nproc 1 --steps 2 --no-plot --name waiting\n{FIT}",
                        interrupt_after=8, allow_error=True, timeout=60)
        status = assert_ended(tmp_path, "waiting", "stopped", "before the workers started")
        assert status["slurm"]["state"] == "PENDING", (status["state"], status.get("reason"))
        assert nbtrain_jobs(slurm) == [], "the pending request was left in the queue"


@integration
def test_inside_the_users_allocation_the_kernels_death_ends_the_step_but_keeps_the_allocation(
        slurm: SlurmCluster, tmp_path: Path) -> None:
    with kernel_inside(slurm, tmp_path) as (alloc, kernel):
        start_in_the_background(kernel, "theirs")
        kernel.kill()
        wait_until(lambda: slurm.strays() == {}, 30, f"every task gone from the nodes ({slurm.strays()})")
        assert [(j.job_id, j.state) for j in slurm.squeue()] == [(alloc.job_id, "RUNNING")]
        assert_ended(tmp_path, "theirs", "stopped", "job step was cancelled")


@integration
def test_a_step_srun_refuses_fails_the_run_with_sruns_own_words(
        slurm: SlurmCluster, tmp_path: Path) -> None:
    # One CPU per node: no room for two tasks on a node.
    with kernel_inside(slurm, tmp_path, exclusive=False) as (_, kernel):
        out = kernel.execute(f"%%bigtrain --slurm --nproc 2 --steps 2 --no-plot --name cramped\n{FIT}",
                             allow_error=True, timeout=120)
    status = assert_ended(tmp_path, "cramped", "failed", "srun: error:")
    assert out.error is not None and "srun: error:" in out.error.text
    print(f"\nthe user saw: {status['reason']}")


@integration
def test_the_kernels_death_while_the_request_is_pending_takes_it_out_of_the_queue(
        slurm: SlurmCluster, outside: Kernel, tmp_path: Path) -> None:
    import psutil

    with allocated(slurm):  # every node busy: nbtrain's request waits
        outside.client.execute(f"%%bigtrain --slurm --nodes 2 --nproc 1 --steps 2 --no-plot --name dying\n{FIT}")
        runs = tmp_path / "bigtrain-runs"
        wait_until(lambda: any(status_of(p).get("slurm", {}).get("state") == "PENDING" for p in runs.glob("*-dying-*")),
                   60, "nbtrain's request shown pending")
        outside.kill()
        wait_until(lambda: nbtrain_jobs(slurm) == [], 30, "the pending request gone after the kernel's death")
        wait_until(lambda: not [p for p in psutil.process_iter(["cmdline"]) if "--no-shell" in (p.info["cmdline"] or [])
                                and any(a.startswith("nbtrain-") for a in p.info["cmdline"] or [])],
                   30, "nbtrain's salloc gone")
        status = status_of(only(tmp_path, "dying"))
        assert status["state"] == "stopped" and "allocation was cancelled" in status["reason"], status.get("reason")
