"""The same %%bigtrain cell on several hosts: network namespaces with their own sshd (tests/netns.py).

The kernel runs in the root namespace (the head); the workers run on the namespace hosts,
which do not share the run directory with the head (`private_dirs`): every record the
dashboard reads reaches the head through the hosts' relays.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LOOP, NOTEBOOK_SETUP, PACED_FIT, has_trained, losses, status_of
from tests.kernel import Kernel
from tests.netns import INTERFACE, Cluster, cluster

pytestmark = pytest.mark.integration

FIT = "bigtrain.fit(make_model(), ToyData(), loss_fn=loss_fn)"


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[Cluster, Kernel]]:
    """Two namespace hosts without the head's run directory, and a kernel on the head that reaches them."""
    runs = tmp_path / "bigtrain-runs"
    runs.mkdir()
    with cluster(2, private_dirs=[runs]) as c:
        # DeepSpeed's way to give remote workers a variable: KEY=VALUE lines in ./.deepspeed_env.
        # Gloo must use the hosts' own interface (they share this machine's host name).
        (tmp_path / ".deepspeed_env").write_text(f"GLOO_SOCKET_IFNAME={INTERFACE}\n")
        kernel = Kernel(tmp_path, env=c.env)
        try:
            kernel.execute("%load_ext nbtrain")
            kernel.execute(NOTEBOOK_SETUP)
            yield c, kernel
        finally:
            kernel.shutdown()
            without_leftovers(c, timeout=30)
            assert leftovers(c) == {}, f"processes left on the hosts: {leftovers(c)}"


def leftovers(c: Cluster) -> dict[str, list[str]]:
    """Return the processes nbtrain left on the hosts (not ssh sessions a cut link leaves hanging)."""
    found = {host: [p for p in procs if not p.split(" ", 1)[-1].startswith("sshd")]  # "4462 sshd: root@notty"
             for host, procs in c.strays().items()}
    return {host: procs for host, procs in found.items() if procs}


def without_leftovers(c: Cluster, timeout: float) -> float:
    """Wait until nbtrain left nothing on the hosts; return how long that took."""
    begun = time.monotonic()
    while leftovers(c) and time.monotonic() - begun < timeout:
        time.sleep(0.1)
    return time.monotonic() - begun


def start_training_in_the_background(kernel: Kernel, name: str) -> None:
    """Start a long 2-host run as `handle` and return once it has logged a few steps."""
    kernel.execute("%%bigtrain --hosts node0,node1 --nproc 1 --steps 100000 --micro-batch 4 --no-plot --background "
                   f"--name {name}\n{PACED_FIT}")
    kernel.execute("handle = _\nimport time\nwhile len(handle.metrics) < 3: time.sleep(0.2)")


def only(root: Path, name: str) -> Path:
    (found,) = (root / "bigtrain-runs").glob(f"*-{name}-*")
    return found


@pytest.mark.parametrize("launcher", ["pdsh", "standard"])
def test_two_hosts_train_to_the_same_losses_as_one(hosts: tuple[Cluster, Kernel], tmp_path: Path,
                                                   launcher: str) -> None:
    c, kernel = hosts
    kernel.execute(f"%%bigtrain --nproc 2 --steps 6 --micro-batch 8 --zero 2 --no-plot --name one\n{FIT}")
    result = kernel.execute(timeout=180, code=f"%%bigtrain --hosts node0,node1 --multinode-launcher {launcher} --nproc 1 --steps 6 "
                            f"--micro-batch 8 --zero 2 --no-plot --name two --out r\nr = {FIT}")
    one, two = only(tmp_path, "one"), only(tmp_path, "two")
    assert status_of(two)["state"] == "succeeded", result.text
    assert losses(two) == losses(one) and len(losses(two)) == 6
    # Both hosts' records reached the head, and rank 0's result was bound in the notebook.
    assert all((two / f).stat().st_size > 0 for f in ("utilization/rank-1.jsonl", "logs/rank-1.log",
                                                      "heartbeats/rank-1.json", "logs/rank-0.timeline.json"))
    assert kernel.execute("print(r.steps)").text.strip() == "6"


def test_two_hosts_of_two_processes_under_zero3_match_four_processes_on_one(hosts: tuple[Cluster, Kernel],
                                                                            tmp_path: Path) -> None:
    c, kernel = hosts
    flags = "--nproc {n} --steps 5 --micro-batch 4 --zero 3 --no-plot --name {name}"
    kernel.execute(f"%%bigtrain {flags.format(n=4, name='one')}\n{FIT}")
    kernel.execute(f"%%bigtrain --hosts node0,node1 {flags.format(n=2, name='two')}\n{FIT}", timeout=240)
    one, two = only(tmp_path, "one"), only(tmp_path, "two")
    assert losses(two) == losses(one) and len(losses(one)) == 5
    assert status_of(two)["state"] == "succeeded"
    assert {p.name for p in (two / "heartbeats").iterdir()} == {f"rank-{r}.json" for r in range(4)}


def assert_a_rank_raising_fails_the_run(kernel: Kernel, launch: str, root: Path, where: str) -> None:
    """Run a cell whose rank 1 raises ValueError on `launch` (the flags that put it on another machine, `where`):
    the cell's error names the rank, the exception and the cell's line, and the run is marked failed by rank 1."""
    cell = LOOP.format(misbehave=f"if bigtrain.rank == 1:\n            raise ValueError('bad batch on {where}')")
    out = kernel.execute(f"%%bigtrain {launch} --nproc 1 --steps 40 --micro-batch 4 --no-plot --name bad\n{cell}",
                         allow_error=True, timeout=180)
    assert out.error is not None, out.text
    assert f"rank 1 raised ValueError: bad batch on {where} (cell line 11)" in out.error.text
    assert 'File "<bigtrain cell>", line 11' in out.error.text
    status = status_of(only(root, "bad"))
    assert (status["state"], status["failed_rank"]) == ("failed", 1)


def test_a_rank_raising_on_a_remote_host_fails_the_run_with_its_traceback(hosts: tuple[Cluster, Kernel],
                                                                           tmp_path: Path) -> None:
    c, kernel = hosts
    assert_a_rank_raising_fails_the_run(kernel, "--hosts node0,node1", tmp_path, "the second host")
    assert leftovers(c) == {}, "a worker outlived the failed run on a host"


def test_a_host_whose_link_is_cut_is_named_and_every_worker_ends(hosts: tuple[Cluster, Kernel],
                                                                 tmp_path: Path) -> None:
    c, kernel = hosts
    start_training_in_the_background(kernel, "cut")
    c.cut("node1")
    cut_at = time.monotonic()
    failed = kernel.execute("handle.wait()", allow_error=True, timeout=120)
    without_leftovers(c, timeout=60)
    gone_after = time.monotonic() - cut_at
    assert leftovers(c) == {}, f"workers left after the cut: {leftovers(c)}"
    status = status_of(only(tmp_path, "cut"))
    assert status["state"] == "failed" and "host node1 was lost" in status["reason"], status
    assert failed.error is not None and "host node1 was lost" in failed.error.text
    print(f"\nlink of node1 cut -> run failed and every worker on every host gone in {gone_after:.1f} s; "
          f"the user saw: {status['reason']}")


def test_an_unreachable_host_is_refused_before_anything_starts(hosts: tuple[Cluster, Kernel], tmp_path: Path) -> None:
    c, kernel = hosts
    c.cut("node1")
    out = kernel.execute(f"%%bigtrain --hosts node0,node1 --nproc 1 --steps 5 --no-plot --name never\n{FIT}",
                         allow_error=True, timeout=60)
    assert "node1" in out.text and "Connection timed out" in out.text, out.text
    assert not list((tmp_path / "bigtrain-runs").glob("*-never-*")), "a run directory was made"
    c.restore("node1")


def test_interrupting_a_multi_node_run_ends_every_worker_on_every_host(hosts: tuple[Cluster, Kernel],
                                                                       tmp_path: Path) -> None:
    c, kernel = hosts
    kernel.execute(f"%%bigtrain --hosts node0,node1 --nproc 1 --steps 100000 --micro-batch 4 --no-plot "
                   f"--name stopped\n{PACED_FIT}", interrupt_after=has_trained(tmp_path, "stopped"), allow_error=True,
                   timeout=120)
    assert leftovers(c) == {}, f"workers survived the interrupt: {leftovers(c)}"
    assert status_of(only(tmp_path, "stopped"))["state"] == "stopped"


def test_stopping_a_multi_node_run_from_jupyterlab_ends_every_worker(hosts: tuple[Cluster, Kernel],
                                                                     tmp_path: Path) -> None:
    import asyncio

    from nbtrain.rundir import RunDirectory
    from nbtrain.server.workers import stop_run

    c, kernel = hosts
    start_training_in_the_background(kernel, "lab")
    # What the sidebar's Stop calls. Not asyncio.run: it would leave no current event loop for
    # the server tests that run later in this process.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(stop_run(RunDirectory(only(tmp_path, "lab")), grace_s=5))
    finally:
        loop.close()
    kernel.execute("handle.wait()", allow_error=True, timeout=60)
    without_leftovers(c, timeout=30)
    assert leftovers(c) == {}, f"workers left after Stop: {leftovers(c)}"
    status = status_of(only(tmp_path, "lab"))
    assert status["state"] == "stopped" and "stopped from JupyterLab" in status["reason"], status
