"""The SLURM flags (issue 17): refused before anything starts when they cannot run.

The pure rules go through `plan_run`, as every `%%bigtrain` line does. The cluster checks
(`slurm_problems`) read sinfo/scontrol text captured from the real test cluster
(tests/slurm.py) and, marked integration, ask such a cluster themselves.
"""

from __future__ import annotations

import math

import pytest

from nbtrain.config.arguments import parse_line
from nbtrain.config.machine import MachineFacts
from nbtrain.config.plan import plan_run
from nbtrain.config.slurm import TIME_FORMATS, parse_time
from nbtrain.errors import ConfigError, Problem

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
