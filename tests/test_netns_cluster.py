"""The multi-node test harness is real: namespace hosts reached by ssh and pdsh, DeepSpeed across them.

Needs root (network namespaces); skipped otherwise. Every test ends with no process left
in any of its namespaces (the cluster's teardown fails the test otherwise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbtrain.config.hosts import check_reachable
from tests.netns import Cluster, cluster

pytestmark = pytest.mark.integration


@pytest.fixture
def two_hosts() -> Iterator[Cluster]:
    with cluster(2) as c:
        yield c


def namespace_inode(namespace: str) -> str:
    """Return the namespace's identity as /proc/<pid>/ns/net shows it (`net:[inode]`)."""
    return f"net:[{os.stat(f'/run/netns/{namespace}').st_ino}]"


def test_pdsh_runs_the_command_on_each_host_inside_its_namespace(two_hosts: Cluster) -> None:
    c = two_hosts
    done = subprocess.run(["pdsh", "-w", ",".join(c.hosts), "echo rank=%n $(hostname -I) $(readlink /proc/self/ns/net)"],
                          env=c.env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    seen = {line.split(":")[0]: line.split()[1:] for line in done.stdout.splitlines()}
    for rank, host in enumerate(c.hosts):
        assert seen.get(host) == [f"rank={rank}", c.addresses[host], namespace_inode(c.namespaces[host])], \
            f"{host} answered {seen.get(host)} (pdsh said: {done.stdout!r} {done.stderr!r})"


def test_every_host_passes_the_reachability_check(two_hosts: Cluster) -> None:
    begun = time.monotonic()
    problems = check_reachable(two_hosts.hosts, sys.executable, workdir=os.getcwd(), environ=two_hosts.env)
    assert problems == [], "\n".join(map(str, problems))
    assert time.monotonic() - begun < 10


def test_a_cut_host_is_named_unreachable_with_ssh_s_words(two_hosts: Cluster) -> None:
    two_hosts.cut("node1")
    problems = check_reachable(two_hosts.hosts, environ=two_hosts.env, connect_timeout=2, deadline=6)
    assert [p.where for p in problems] == ["host node1"], problems
    assert "timed out" in problems[0].value, problems[0]
    assert "cannot be reached with ssh" in problems[0].rule
    two_hosts.restore("node1")
    assert check_reachable(two_hosts.hosts, environ=two_hosts.env) == [], "node1 did not come back"


def test_a_host_without_nbtrain_or_the_python_is_named(two_hosts: Cluster, tmp_path: Path) -> None:
    # The system Python exists on every host but has no nbtrain (ssh starts in $HOME, away from the repo).
    problems = check_reachable(["node0"], "/usr/bin/python3", environ=two_hosts.env)
    assert [(p.where, p.value) for p in problems] == [("host node0", "ModuleNotFoundError: No module named 'nbtrain'")]
    missing = str(tmp_path / "venv" / "bin" / "python")
    problems = check_reachable(two_hosts.hosts, missing, environ=two_hosts.env)
    assert [(p.where, p.value) for p in problems] == [("host node0", missing), ("host node1", missing)]


def test_a_host_that_hangs_after_login_is_given_up_at_the_deadline(two_hosts: Cluster, tmp_path: Path) -> None:
    stuck = tmp_path / "python"
    stuck.write_text("#!/bin/sh\nsleep 60\n")
    stuck.chmod(0o755)
    begun = time.monotonic()
    problems = check_reachable(["node0"], str(stuck), environ=two_hosts.env, deadline=2)
    assert time.monotonic() - begun < 4
    assert [(p.where, p.value) for p in problems] == [("host node0", "no answer within 2 s")]


def test_private_dirs_give_each_host_its_own_filesystem_there(tmp_path: Path) -> None:
    shared = tmp_path / "runs"
    shared.mkdir()
    (shared / "from-head").write_text("head")
    with cluster(1, private_dirs=[shared]) as c:
        listing = c.ssh("node0", f"ls -A {shared}; echo node0 > {shared}/from-node0")
        assert listing.returncode == 0 and listing.stdout == "", listing
        direct = subprocess.run(c.run_on("node0", ["cat", str(shared / "from-node0")]), capture_output=True, text=True)
        assert direct.stdout == "node0\n", "run_on does not see the host's private directory"
    assert sorted(p.name for p in shared.iterdir()) == ["from-head"]


TRAIN_SCRIPT = '''
"""20 steps of a small MLP under DeepSpeed ZeRO-2; rank 0 writes every rank's network namespace and the loss."""
import json, os, sys
import torch, torch.distributed as dist
import deepspeed

deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
config = {"train_micro_batch_size_per_gpu": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
          "zero_optimization": {"stage": 2}}
engine, *_ = deepspeed.initialize(model=model, config=config)
g = torch.Generator().manual_seed(1)
x = torch.randn(320, 16, generator=g)
y = x[:, :4].argmax(dim=1)
losses = []
for step in range(20):
    lo = (step * world + rank) * 8 % 320  # every rank its own 8 samples of the step's global batch
    loss = torch.nn.functional.cross_entropy(engine(x[lo:lo + 8]), y[lo:lo + 8])
    engine.backward(loss)
    engine.step()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    losses.append(mean.item() / world)
namespaces = [None] * world
dist.all_gather_object(namespaces, os.readlink("/proc/self/ns/net"))
if rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump({"losses": losses, "namespaces": namespaces}, f)
# Teardown aborts now and then across hosts: a comm backend's C++ thread is destroyed while it
# runs ("terminate called without an active exception", exit -6), and the other host's torchrun
# then waits for good. A barrier first made it rarer, not gone (a fresh clone's run, 11-27). So
# once every rank has its results, each ends without the teardown, as nbtrain's workers do.
dist.barrier()
sys.stdout.flush()
os._exit(0)
'''


# DeepSpeed's JIT-built CPU ops are cached inside the environment (set-up builds them).
OPS_CACHE = os.path.join(sys.prefix, "var", "torch_extensions")


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def run_all(runs: dict[str, list[str]], folder: Path, timeout: float = 120, **popen: Any) -> None:
    """Run the commands at once; fail with the logs of those that did not exit 0."""
    env = popen.pop("env", {})
    logs = {name: open(folder / f"{name}.log", "w") for name in runs}
    started = {name: subprocess.Popen(argv, env=env.get(name, dict(os.environ, TORCH_EXTENSIONS_DIR=OPS_CACHE)),
                                      stdout=logs[name], stderr=subprocess.STDOUT, **popen)
               for name, argv in runs.items()}
    try:
        codes = {name: run.wait(timeout=timeout) for name, run in started.items()}
    finally:
        for name, run in started.items():
            run.kill()
            run.wait()
            logs[name].close()
    failed = {name: (folder / f"{name}.log").read_text()[-3000:] for name, code in codes.items() if code}
    assert not failed, failed


@pytest.fixture(scope="module")
def one_host_losses(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """The reference: the same training as 1 host x 2 processes."""
    folder = tmp_path_factory.mktemp("one-host")
    (folder / "train.py").write_text(TRAIN_SCRIPT)
    run_all({"local": torchrun("--standalone", "--nproc_per_node", "2", str(folder / "train.py"),
                               str(folder / "out.json"))}, folder)
    return list(json.loads((folder / "out.json").read_text())["losses"])


def assert_trained_across(c: Cluster, out: Path, one_host_losses: list[float]) -> None:
    spread = json.loads(out.read_text())
    assert spread["namespaces"] == [namespace_inode(c.namespaces[h]) for h in c.hosts], \
        "the two ranks did not run on the two hosts"
    assert spread["losses"] == one_host_losses, f"2 hosts x 1: {spread['losses']}\n1 host x 2: {one_host_losses}"
    assert c.strays() == {}, "processes outlived the launcher on the hosts"


def test_deepspeed_trains_across_two_hosts_to_the_single_host_loss(
        two_hosts: Cluster, tmp_path: Path, one_host_losses: list[float]) -> None:
    c = two_hosts
    (tmp_path / "train.py").write_text(TRAIN_SCRIPT)
    runs, envs = {}, {}
    for rank, host in enumerate(c.hosts):
        runs[host] = c.run_on(host, torchrun("--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                                             "--master_addr", c.addresses["node0"], "--master_port", "29500",
                                             str(tmp_path / "train.py"), str(tmp_path / "out.json")))
        envs[host] = dict(os.environ, TORCH_EXTENSIONS_DIR=OPS_CACHE, GLOO_SOCKET_IFNAME=c.interface)
    run_all(runs, tmp_path, env=envs)
    assert_trained_across(c, tmp_path / "out.json", one_host_losses)


def test_deepspeeds_own_pdsh_runner_launches_on_the_hosts(
        two_hosts: Cluster, tmp_path: Path, one_host_losses: list[float]) -> None:
    """`deepspeed --hostfile … --launcher pdsh` from the head, as the multi-node launch will use it."""
    c = two_hosts
    (tmp_path / "train.py").write_text(TRAIN_SCRIPT)
    (tmp_path / "hostfile").write_text("".join(f"{h} slots=1\n" for h in c.hosts))
    # Only PYTHON*/MLFLOW/UCX/MV2 variables and the env file's lines reach the remote workers.
    (tmp_path / "worker.env").write_text(f"GLOO_SOCKET_IFNAME={c.interface}\nTORCH_EXTENSIONS_DIR={OPS_CACHE}\n")
    deepspeed = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--hostfile", str(tmp_path / "hostfile"),
                 "--launcher", "pdsh", "--no_ssh_check", "--no_local_rank",
                 "--master_addr", c.addresses["node0"], "--master_port", "29501",
                 str(tmp_path / "train.py"), str(tmp_path / "out.json")]
    run_all({"deepspeed": deepspeed}, tmp_path, cwd=tmp_path,
            env={"deepspeed": dict(c.env, DS_ENV_FILE=str(tmp_path / "worker.env"))})
    assert_trained_across(c, tmp_path / "out.json", one_host_losses)


def test_teardown_kills_what_a_test_left_behind_and_removes_every_namespace() -> None:
    with cluster(2) as c:
        detached = c.ssh("node0", "setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $!")
        direct = subprocess.Popen(c.run_on("node1", ["sleep", "301"]))
        left = c.strays()
        assert sorted(left) == ["node0", "node1"] and "sleep 300" in left["node0"][0] \
            and "sleep 301" in left["node1"][0], left
        namespaces, sshd = list(c.namespaces.values()), [p.pid for p in c.sshd.values()]
    direct.wait(timeout=5)  # killed by the teardown, so it returns at once
    for pid in [int(detached.stdout), *sshd]:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], \
            f"process {pid} survived the teardown"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in namespaces), listed
