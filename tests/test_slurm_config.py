"""The SLURM flags (issue 17): refused before anything starts when they cannot run.

The pure rules go through `plan_run`, as every `%%bigtrain` line does. The cluster checks
(`slurm_problems`) read sinfo/scontrol text captured from the real test cluster
(tests/slurm.py) and, marked integration, ask such a cluster themselves.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbtrain.config.arguments import parse_line
from nbtrain.config.machine import MachineFacts
from nbtrain.config.plan import plan_run
from nbtrain.config.slurm import (
    TIME_FORMATS,
    Partition,
    _gpu_problems,
    check_slurm,
    default_partition,
    enforces_accounts,
    gpu_count,
    parse_config,
    parse_sinfo,
    parse_time,
    partition_info,
    slurm_problems,
)
from nbtrain.errors import ConfigError, Problem
from tests.slurm import SlurmCluster, slurm_cluster

CPU = MachineFacts(gpu_count=0, has_libaio=True)
GPU = MachineFacts(gpu_count=1, has_libaio=True)


def _problems(line: str, machine: MachineFacts = CPU) -> list[Problem]:
    with pytest.raises(ConfigError) as err:
        plan_run(parse_line(line), machine)
    return list(err.value.problems)


@pytest.mark.parametrize(("line", "flag", "value"), [
    ("--nodes 2", "--nodes", 2), ("--partition gpu", "--partition", "gpu"), ("--time 30", "--time", "30"),
    ("--account proj", "--account", "proj"), ("--gpus-per-node 4", "--gpus-per-node", 4),
])
def test_a_slurm_flag_without_slurm_is_refused_naming_it(line: str, flag: str, value: object) -> None:
    (problem,) = _problems(line)
    assert (problem.where, problem.value) == (flag, value)
    assert "only with --slurm" in problem.rule and f"add --slurm to run on a SLURM allocation, or drop {flag}" \
        in problem.fix


def test_every_slurm_flag_without_slurm_is_one_problem_each() -> None:
    problems = _problems("--nodes 2 --partition gpu --time 30 --account a --gpus-per-node 1")
    assert [p.where for p in problems] == ["--nodes", "--partition", "--time", "--account", "--gpus-per-node"]


@pytest.mark.parametrize("line", ["--slurm --hosts a,b", "--multinode-launcher slurm --hosts a,b"])
def test_slurm_with_hosts_is_refused(line: str) -> None:
    (problem,) = _problems(line)
    assert problem.where == "--hosts" and problem.value == "a,b"
    assert "runs on the nodes SLURM allocates" in problem.rule and "drop --hosts" in problem.fix


def test_slurm_with_a_hostfile_is_refused(tmp_path: object) -> None:
    (problem,) = _problems("--slurm --hostfile hosts.txt")  # refused before the file is read
    assert (problem.where, problem.value) == ("--hostfile", "hosts.txt")


def test_slurm_with_another_launcher_is_refused() -> None:
    (problem,) = _problems("--slurm --multinode-launcher pdsh")
    assert (problem.where, problem.value) == ("--multinode-launcher", "pdsh")
    assert "srun" in problem.rule


@pytest.mark.parametrize("value", ["2h", "1:2:3:4", "1-2-3", "-5", "1:x", "1.5", "1-"])
def test_a_time_in_none_of_slurms_formats_is_refused_naming_them(value: str) -> None:
    (problem,) = _problems(f"--slurm --time={value}")
    assert (problem.where, problem.value) == ("--time", value)
    assert TIME_FORMATS in problem.rule and "M alone is minutes" in problem.rule


@pytest.mark.parametrize(("line", "flag", "says"), [
    ("--slurm --nodes 0", "--nodes", "must be 1 or more"),
    ("--slurm --nodes -1", "--nodes", "must be 1 or more"),
    ("--slurm --gpus-per-node -1", "--gpus-per-node", "must be 0 or more"),
])
def test_counts_out_of_range_are_refused(line: str, flag: str, says: str) -> None:
    (problem,) = _problems(line)
    assert problem.where == flag and says in problem.rule


@pytest.mark.parametrize(("text", "minutes"), [
    ("30", 30), ("0:30", 1), ("90:00", 90), ("2:00:00", 120), ("1-0", 1440), ("1-12:30", 2190),
    ("2-00:00:05", 2881), ("INFINITE", math.inf), ("UNLIMITED", math.inf), ("infinite", math.inf), ("0", math.inf),
])
def test_slurm_time_formats_parse_to_minutes_as_slurm_reads_them(text: str, minutes: float) -> None:
    # Slurm's rules (parse_time.c): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; seconds round up; 0 = no limit.
    assert parse_time(text) == minutes


def test_a_good_slurm_line_plans_the_world_over_the_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    plan = plan_run(parse_line("--slurm --nodes 2 --nproc 2 --partition gpu --time 1-0 --account a "
                               "--gpus-per-node 0 --micro-batch 2"), CPU)
    assert (plan.launcher, plan.nodes, plan.world_size) == ("slurm", 2, 4)
    assert "each of 2 SLURM node(s) (4 in all) through srun" in plan.describe()
    # DeepSpeed's batch rule counts every rank of every node.
    (problem,) = _problems("--slurm --nodes 2 --nproc 2 --micro-batch 2 --set train_batch_size=4")
    assert problem.where == "train_batch_size" and "world size 4" in str(problem)


def test_without_nodes_the_run_takes_the_allocations_nodes_else_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert plan_run(parse_line("--multinode-launcher slurm --nproc 2"), CPU).world_size == 2
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "3")
    assert plan_run(parse_line("--slurm --nproc 2"), CPU).nodes == 3


def test_the_kernels_gpus_do_not_cap_the_processes_per_slurm_node() -> None:
    # The nodes' GPUs are the cluster's to check (slurm_problems), not the notebook machine's.
    assert plan_run(parse_line("--slurm --nproc 4"), GPU).nproc == 4


# -- reading the cluster: text captured from the real test cluster (tests/slurm.py, Slurm 22.05.8,
# partitions debug (default, INFINITE), short (1 node, 00:10:00), day (1-12:00:00); Gres=gpu:2) -------
SINFO = "debug*|up|2|infinite|gpu:2\nshort|up|1|10:00|gpu:2\nday|up|2|1-12:00:00|gpu:2\n"
SINFO_NO_GRES = "debug*|up|2|infinite|(null)\nshort|up|1|10:00|(null)\nday|up|2|1-12:00:00|(null)\n"
SCONTROL_CONFIG_HEAD = """Configuration data as of 2026-11-26T15:02:24
AccountingStorageBackupHost = (null)
AccountingStorageEnforce = none
AccountingStorageHost   = localhost
AccountingStorageExternalHost = (null)
AccountingStorageParameters = (null)
AccountingStoragePort   = 0
AccountingStorageTRES   = cpu,mem,energy,node,billing,fs/disk,vmem,pages
AccountingStorageType   = accounting_storage/none
AccountingStorageUser   = root
AuthInfo                = socket=/tmp/nbtrain-slurm-16904-0-9o33_0f7/munge.socket
"""
SINFO_NO_CONTROLLER = "slurm_load_partitions: Unable to contact slurm controller (connect failure)\n"


def test_sinfo_lines_become_partitions_with_their_default_nodes_and_limits() -> None:
    found = parse_sinfo(SINFO)
    assert [(p.name, p.default, p.state, p.nodes, p.max_time) for p in found] == [
        ("debug", True, "up", 2, "infinite"), ("short", False, "up", 1, "10:00"), ("day", False, "up", 2, "1-12:00:00")]
    assert [p.max_minutes for p in found] == [math.inf, 10, 2160]  # sinfo writes 10 minutes as MM:SS
    assert default_partition(found) is found[0]
    assert found[0].gpus_per_node() == [(2, 2)] and found[1].gpus_per_node() == [(2, 1)]
    assert parse_sinfo(SINFO_NO_GRES)[0].gpus_per_node() == [(0, 2)]


@pytest.mark.parametrize(("gres", "gpus"), [
    ("(null)", 0), ("gpu:2", 2), ("gpu:a100:4(S:0-1)", 4), ("gpu:a100:2,gpu:v100:1(S:1)", 3), ("mps:100,gpu:1", 1),
])
def test_gpus_per_node_from_sinfos_gres_column(gres: str, gpus: int) -> None:
    # Forms of %G from slurm.conf(5)/gres.conf(5): name[:type][:count][(S:sockets)], comma-separated.
    assert gpu_count(gres) == gpus


def test_gpus_asked_of_nodes_without_any_say_so() -> None:
    (problem,) = _gpu_problems(1, 1, parse_sinfo(SINFO_NO_GRES)[0])
    assert "the nodes of partition debug have 2 with no GPU" in problem.rule
    assert problem.fix.startswith("drop --gpus-per-node (or give 0)")


def test_a_cluster_without_accounting_is_not_asked_about_accounts() -> None:
    config = parse_config(SCONTROL_CONFIG_HEAD)
    assert config["AccountingStorageType"] == "accounting_storage/none"
    assert config["AuthInfo"].startswith("socket=")  # a value with '=' in it stays whole
    assert not enforces_accounts(config)
    # slurmdbd alone does not refuse unknown accounts; AccountingStorageEnforce=associations (or more) does.
    dbd = {"AccountingStorageType": "accounting_storage/slurmdbd"}
    assert not enforces_accounts({**dbd, "AccountingStorageEnforce": "none"})
    assert enforces_accounts({**dbd, "AccountingStorageEnforce": "associations,limits"})


def test_no_slurm_client_names_the_packages(tmp_path: Path) -> None:
    # A machine without Slurm's client: srun is not on PATH.
    (problem,) = slurm_problems(parse_line("--slurm"), {"PATH": str(tmp_path)})
    assert problem.where == "--slurm" and "`srun` is not on PATH" in problem.rule
    assert "slurm-client" in problem.fix and "admin" in problem.fix


def test_slurm_problems_say_nothing_without_slurm() -> None:
    assert slurm_problems(parse_line("--nproc 2"), {"PATH": ""}) == []


# -- asking a real cluster -----------------------------------------------------------------------
PARTITIONS = {"debug": {"nodes": "all", "max_time": "INFINITE", "default": True},
              "short": {"nodes": 1, "max_time": "00:10:00"}, "day": {"nodes": "all", "max_time": "1-12:00:00"}}


@pytest.fixture(scope="module")
def partitioned() -> Iterator[SlurmCluster]:
    with slurm_cluster(2, gpus=2, partitions=PARTITIONS) as sc:
        yield sc


def _asked(sc: SlurmCluster, line: str, env: dict[str, str] | None = None) -> list[tuple[str, object, str]]:
    return [(p.where, p.value, str(p)) for p in slurm_problems(parse_line(line), env or sc.env)]


@pytest.mark.integration
def test_what_the_cluster_can_run_passes(partitioned: SlurmCluster) -> None:
    for line in ("--slurm", "--slurm --nodes 2 --partition day --time 1-00:00:00", "--slurm --partition short "
                 "--time 10 --nodes 1", "--slurm --time 5-0", "--slurm --gpus-per-node 2 --nodes 2",
                 "--slurm --account anyone"):  # no accounting here: Slurm takes any account, so do we
        assert _asked(partitioned, line) == [], line
    assert partition_info("short", partitioned.env) == Partition("short", False, "up", 1, "10:00", (("gpu:2", 1),))
    assert partition_info(None, partitioned.env).name == "debug"  # type: ignore[union-attr]
    check_slurm(parse_line("--slurm --nodes 2"), partitioned.env)


@pytest.mark.integration
def test_an_unknown_partition_lists_the_partitions_and_the_default(partitioned: SlurmCluster) -> None:
    ((where, value, text),) = _asked(partitioned, "--slurm --partition gpu --nodes 2")
    assert (where, value) == ("--partition", "gpu")
    assert "no such partition (partitions: debug, short, day; the default is debug)" in text


@pytest.mark.integration
def test_more_nodes_than_the_partition_has_are_refused(partitioned: SlurmCluster) -> None:
    assert _asked(partitioned, "--slurm --partition short --nodes 2") == [
        ("--nodes", 2, "--nodes = 2: partition short has 1 node(s). Fix: give --nodes 1 or fewer, or a larger partition")]
    ((where, _, text),) = _asked(partitioned, "--slurm --nodes 3")  # the default partition
    assert where == "--nodes" and "partition debug has 2 node(s)" in text


@pytest.mark.integration
def test_a_time_over_the_partitions_maxtime_is_refused(partitioned: SlurmCluster) -> None:
    ((where, value, text),) = _asked(partitioned, "--slurm --partition short --time 20")
    assert (where, value) == ("--time", "20")
    assert "partition short allows at most 0:10:00 (its MaxTime; sinfo shows 10:00)" in text
    assert "give --time 0:10:00 or less" in text
    ((_, _, text),) = _asked(partitioned, "--slurm --partition day --time 2-0")
    assert "at most 1-12:00:00" in text
    ((_, _, text),) = _asked(partitioned, "--slurm --partition day --time UNLIMITED")
    assert "at most 1-12:00:00" in text


@pytest.mark.integration
def test_a_partition_that_is_down_is_refused(partitioned: SlurmCluster) -> None:
    partitioned.run("scontrol", "update", "PartitionName=short", "State=DOWN")
    try:
        assert partition_info("short", partitioned.env).state == "down"  # type: ignore[union-attr]
        ((where, value, text),) = _asked(partitioned, "--slurm --partition short")
        assert (where, value) == ("--partition", "short") and "partition short is down (sinfo)" in text
    finally:
        partitioned.run("scontrol", "update", "PartitionName=short", "State=UP")
    assert _asked(partitioned, "--slurm --partition short") == []


@pytest.mark.integration
def test_gpus_per_node_the_nodes_do_not_have_are_refused_naming_what_they_have(partitioned: SlurmCluster) -> None:
    ((where, value, text),) = _asked(partitioned, "--slurm --gpus-per-node 3 --partition short")
    assert (where, value) == ("--gpus-per-node", 3)
    assert "the nodes of partition short have 1 with gpu:2: 0 of them have 3 or more, 1 asked for" in text
    assert "give --gpus-per-node 2 or fewer" in text
    # Slurm itself refuses the same request.
    refused = partitioned.run("srun", "-p", "short", "--gpus-per-node=3", "true", check=False)
    assert refused.returncode != 0, refused


@pytest.mark.integration
def test_a_controller_that_does_not_answer_names_slurm_conf(partitioned: SlurmCluster, tmp_path: Path) -> None:
    # The cluster's own slurm.conf with the controller's port changed to one where nothing listens.
    dead = tmp_path / "slurm.conf"
    dead.write_text(re.sub(r"(?m)^SlurmctldPort=\d+", "SlurmctldPort=1", partitioned.conf.read_text()))
    ((where, _, text),) = _asked(partitioned, "--slurm", {**partitioned.env, "SLURM_CONF": str(dead)})
    assert where == "--slurm"
    assert "the SLURM controller does not answer" in text and SINFO_NO_CONTROLLER.strip() in text
    assert f"SLURM_CONF={dead}" in text and "scontrol ping" in text
    with pytest.raises(ConfigError, match="does not answer"):
        check_slurm(parse_line("--slurm"), {**partitioned.env, "SLURM_CONF": str(dead)})


@pytest.mark.integration
def test_inside_an_allocation_its_nodes_and_partition_count(partitioned: SlurmCluster) -> None:
    allocation = partitioned.salloc(1, partition="short", traps=False)
    try:
        env = allocation.env
        assert _asked(partitioned, "--slurm", env) == [] and _asked(partitioned, "--slurm --nodes 1", env) == []
        ((where, value, text),) = _asked(partitioned, "--slurm --nodes 2", env)
        assert (where, value) == ("--nodes", 2) and f"allocation {allocation.job_id} has 1 node(s)" in text
        ((where, value, text),) = _asked(partitioned, "--slurm --partition day", env)
        assert (where, value) == ("--partition", "day") and "whose partition is short" in text
        ((where, value, text),) = _asked(partitioned, "--slurm --time 5", env)
        assert (where, value) == ("--time", "5") and "whose own time limit applies" in text
        ((where, _, text),) = _asked(partitioned, "--slurm --gpus-per-node 3", env)
        assert where == "--gpus-per-node" and "partition short have 1 with gpu:2" in text
    finally:
        partitioned.scancel(allocation)
