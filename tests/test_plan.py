"""The checked plan of a run: config source, process count and the --dry-run text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nbtrain.arguments import parse_line
from nbtrain.errors import ConfigError
from nbtrain.machine import MachineFacts
from nbtrain.plan import default_nproc, load_base, plan_run
from nbtrain.render import FROM_DATALOADER

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


def test_the_plan_is_refused_as_a_whole() -> None:
    with pytest.raises(ConfigError) as err:
        plan_run(parse_line("--micro-batch 0 --grad-accum 0"), CPU)
    assert [p.where for p in err.value.problems] == ["--micro-batch", "--grad-accum"]
