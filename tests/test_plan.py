"""The checked plan of a run: config source, process count and the --dry-run text."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from nbtrain.config.arguments import parse_line
from nbtrain.config.machine import MachineFacts, detect_machine
from nbtrain.config.plan import default_nproc, load_base, plan_run
from nbtrain.config.render import FROM_DATALOADER
from nbtrain.config.validate import check
from nbtrain.errors import ConfigError, Problem
from tests.kernel import Kernel
from tests.nvml import fake_nvml_environment, use_fake_nvml

CPU = MachineFacts(gpu_count=0)


def test_load_base_reads_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2}}')
    assert load_base(str(path)) == {"zero_optimization": {"stage": 2}}
    assert load_base({"a": 1}) == {"a": 1}
    assert load_base(None) == {}


@pytest.mark.parametrize(("content", "says"), [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be an object"),
])
def test_a_bad_config_file_is_refused(tmp_path: Path, content: str | None, says: str) -> None:
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        load_base(str(path))
    (problem,) = err.value.problems
    assert problem.where == "--config" and problem.value == str(path) and says in problem.rule


def test_without_a_gpu_two_cpu_processes_with_a_notice() -> None:
    nproc, notice = default_nproc(CPU)
    assert nproc == 2 and notice is not None and "--nproc" in notice
    assert default_nproc(MachineFacts(gpu_count=4)) == (4, None)


def test_the_plan_keeps_the_notices_of_rendering() -> None:
    plan = plan_run(parse_line("--zero 2"), CPU, {"zero_optimization": {"stage": 1}})
    assert plan.nproc == 2
    assert plan.notices == ("no GPU found: running 2 CPU processes (set --nproc to change)",
                            "--zero sets zero_optimization.stage = 2 (the config file had 1)")


def test_nproc_given_means_no_notice() -> None:
    plan = plan_run(parse_line("--nproc 3"), CPU)
    assert (plan.nproc, plan.notices) == (3, ())


def test_dry_run_text_shows_the_exact_json_and_the_estimate() -> None:
    plan = plan_run(parse_line("--nproc 2 --zero 3 --precision bf16 --scheduler warmup_cosine --warmup-steps 2"), CPU)
    text = plan.describe()
    assert text.startswith("%%bigtrain dry run: 2 processes on CPU (gloo backend); nothing was started.")
    start = text.index("DeepSpeed config:\n") + len("DeepSpeed config:\n")
    shown = json.JSONDecoder().raw_decode(text[start:])[0]
    assert shown == plan.deepspeed, "--dry-run must print exactly the dict the workers get"
    assert f"'{FROM_DATALOADER}' is filled in by the workers: scheduler.params.total_num_steps, " \
           "train_micro_batch_size_per_gpu" in text
    assert "Model-state memory per process (2 processes" in text


def no_subprocess(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"--dry-run ran a command: {args}")


def test_slurm_dry_run_shows_the_salloc_it_would_run_without_asking_the_cluster(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Regression (issue 17 review): `--slurm ... --dry-run` said nothing of the allocation it would request.
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    plan = plan_run(parse_line("--slurm --nodes 2 --nproc 4 --partition gpu --time 2:00:00 --account lab "
                               "--gpus-per-node 4"), CPU)
    assert "allocation: none here (no SLURM_JOB_ID), nbtrain would request one: salloc --no-shell --job-name "\
           "nbtrain-<run id> -N 2 --ntasks-per-node 4 -p gpu -t 2:00:00 -A lab --gpus-per-node 4\n" in plan.describe()


def test_slurm_dry_run_inside_an_allocation_names_the_kernels_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "3")
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    text = plan_run(parse_line("--slurm --nproc 1"), CPU).describe()
    assert text.startswith("%%bigtrain dry run: 1 processes on each of 3 SLURM node(s) (3 in all) through srun; "
                           "nothing was started.\nallocation: in SLURM job 42 (the kernel's allocation), as a step "
                           "with --overlap\n")
    assert "salloc" not in text


def test_the_plan_is_refused_as_a_whole() -> None:
    with pytest.raises(ConfigError) as err:
        plan_run(parse_line("--micro-batch 0 --grad-accum 0"), CPU)
    assert [p.where for p in err.value.problems] == ["--micro-batch", "--grad-accum"]


# -- more processes than GPUs (issue 14: `--nproc 2` on a one-GPU machine started, and rank 1
# died with accelerate's "device_id cuda:1 is out of range") --------------------------------------
def refusal(line: str) -> Problem:
    """Return the one problem of planning `line` on the machine detected now."""
    with pytest.raises(ConfigError) as err:
        plan_run(parse_line(line), detect_machine())
    (problem,) = err.value.problems
    return problem


def test_more_processes_than_gpus_is_refused_with_the_count_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_nvml(monkeypatch, gpus=1)
    problem = refusal("--nproc 2")
    assert (problem.where, problem.value) == ("--nproc", 2)
    assert "each process needs a GPU of its own, and this machine shows 1 GPU;" in problem.rule, problem.rule
    assert "cuda:1 is out of range" in problem.rule
    assert problem.fix == "use --nproc 1, or make more GPUs visible"
    assert "--nproc = 2" in str(ConfigError([problem])), "the message names the flag and its value"


def test_the_refusal_names_cuda_visible_devices_when_it_hides_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_nvml(monkeypatch, gpus=4, CUDA_VISIBLE_DEVICES="2,3")
    problem = refusal("--nproc 3")
    assert "this machine shows 2 GPUs (CUDA_VISIBLE_DEVICES=2,3)" in problem.rule, problem.rule
    assert problem.fix == "use --nproc 2, or make more GPUs visible"


def test_as_many_processes_as_gpus_or_the_default_plan_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_nvml(monkeypatch, gpus=1)
    assert plan_run(parse_line("--nproc 1"), detect_machine()).nproc == 1
    assert plan_run(parse_line(""), detect_machine()).nproc == 1


def test_a_cpu_machine_runs_any_number_of_cpu_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_nvml(monkeypatch, gpus=1, FAKE_NVML_DRIVER="missing")
    plan = plan_run(parse_line("--nproc 4"), detect_machine())
    assert plan.nproc == 4 and not plan.machine.cuda
    use_fake_nvml(monkeypatch, gpus=1, CUDA_VISIBLE_DEVICES="")  # every GPU hidden: CPU processes
    assert plan_run(parse_line("--nproc 4"), detect_machine()).nproc == 4


def test_a_multinode_run_is_not_judged_by_this_machines_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    # --nproc is per host there; each host's GPUs are counted by the reachability probe (test_hosts).
    use_fake_nvml(monkeypatch, gpus=1)
    problems = check(parse_line("--hosts a,b --nproc 8"), {}, detect_machine(), 8)
    assert not [p for p in problems if "GPU" in p.rule], problems


@pytest.mark.integration
def test_the_magic_refuses_it_before_anything_starts(tmp_path: Path) -> None:
    kernel = Kernel(tmp_path, env=fake_nvml_environment(gpus=1))
    try:
        kernel.execute("%load_ext nbtrain")
        shown = kernel.execute("%%bigtrain --nproc 2 --steps 2\nprint('the cell ran')", allow_error=True).text
    finally:
        kernel.shutdown()
    assert shown.startswith("UsageError: ") and "--nproc = 2" in shown, shown
    assert "this machine shows 1 GPU" in shown and "use --nproc 1, or make more GPUs visible" in shown, shown
    assert "the cell ran" not in shown and not (tmp_path / "bigtrain-runs").exists(), "something was started"
