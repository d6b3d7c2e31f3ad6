"""Rendering flags (and a DeepSpeed config file) into the DeepSpeed dict.

The golden files under tests/golden/ hold the exact DeepSpeed JSON of representative
`%%bigtrain` lines. After an intended change of the rendering, regenerate them with

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_render.py

and review the diff of tests/golden/ before committing it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from nbtrain.config.arguments import parse_line
from nbtrain.config.machine import MachineFacts
from nbtrain.config.plan import load_base, plan_run
from nbtrain.config.render import (
    FROM_DATALOADER,
    finalize,
    get_path,
    parse_set,
    render,
    resolve_batch,
    set_path,
    unresolved,
)
from nbtrain.config.tree import TrainConfig
from nbtrain.errors import ConfigError

GOLDEN = Path(__file__).with_name("golden")

# A DeepSpeed config file as a user might bring it (for the precedence case).
BASE_FILE = {
    "train_micro_batch_size_per_gpu": 16,
    "gradient_accumulation_steps": 4,
    "steps_per_print": 50,
    "optimizer": {"type": "Adam", "params": {"lr": 0.01, "betas": [0.8, 0.99], "eps": 1e-8}},
    "zero_optimization": {"stage": 1, "overlap_comm": True, "reduce_bucket_size": 50000000},
}

# name -> (the %%bigtrain line, whether --config points at BASE_FILE)
GOLDEN_CASES: dict[str, tuple[str, bool]] = {
    "stage0_defaults": ("", False),
    "zero3_cpu_offload_bf16_warmup_cosine": (
        "--nproc 2 --zero 3 --offload-optimizer cpu --offload-param cpu --precision bf16 --lr 3e-4 "
        "--scheduler warmup_cosine --warmup-steps 20 --steps 200 --micro-batch 4 --grad-accum 2 --grad-clip 1.0", False),
    "zero3_nvme": ("--zero 3 --offload-optimizer nvme --offload-param nvme --nvme-path /tmp --steps 10", False),
    "scheduler_warmup": ("--scheduler warmup --warmup-steps 10 --lr 0.01", False),
    "scheduler_warmup_decay": ("--scheduler warmup_decay --warmup-steps 10 --steps 100 --lr 0.01", False),
    "scheduler_warmup_cosine_epochs": ("--scheduler warmup_cosine --warmup-steps 5 --epochs 2", False),
    "scheduler_one_cycle": ("--scheduler one_cycle --steps 100 --lr 0.01", False),
    "scheduler_lr_range_test": ("--scheduler lr_range_test --steps 101 --lr 0.1", False),
    "sgd_zero2": ("--optimizer sgd --zero 2 --lr 0.1 --weight-decay 0.01", False),
    "config_file_flags_and_set": (
        "--zero 2 --lr 3e-4 --set optimizer.params.eps=1e-6 --set steps_per_print=10 "
        "--set zero_optimization.overlap_comm=false", True),
}


def _rendered(line: str, with_file: bool, tmp_path: Path) -> dict[str, Any]:
    base = None
    if with_file:
        path = tmp_path / "ds_config.json"
        path.write_text(json.dumps(BASE_FILE))
        line = f"--config {path} {line}"
        base = load_base(parse_line(line).config)
    # Through plan_run: a golden config must also pass validation.
    return plan_run(parse_line(line), MachineFacts(gpu_count=0), base).deepspeed


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_deepspeed_json(name: str, tmp_path: Path) -> None:
    line, with_file = GOLDEN_CASES[name]
    actual = _rendered(line, with_file, tmp_path)
    path = GOLDEN / f"{name}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps({"line": line, "config_file": BASE_FILE if with_file else None,
                                    "deepspeed": actual}, indent=2, sort_keys=True) + "\n")
    assert path.exists(), f"no golden file {path}: run with UPDATE_GOLDEN=1 to create it"
    golden = json.loads(path.read_text())
    assert golden["line"] == line, f"{path.name} was made for another line: regenerate with UPDATE_GOLDEN=1"
    assert actual == golden["deepspeed"], (
        f"the DeepSpeed JSON of `%%bigtrain {line}` changed:\n{json.dumps(actual, indent=2, sort_keys=True)}\n"
        "If intended, regenerate with UPDATE_GOLDEN=1 and review the diff.")


def test_defaults_follow_deepspeed_and_the_design() -> None:
    ds = render(TrainConfig()).deepspeed
    assert ds["zero_optimization"] == {"stage": 0}, "stage 0 must be explicit (accelerate assumes 2)"
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}}
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["train_micro_batch_size_per_gpu"] == FROM_DATALOADER
    for absent in ("scheduler", "gradient_clipping", "bf16", "fp16"):
        assert absent not in ds, f"{absent} is on by default, DeepSpeed's default is off"


def test_flags_win_over_the_file_with_a_notice() -> None:
    rendered = render(TrainConfig(zero=2, lr=3e-4), BASE_FILE)
    assert get_path(rendered.deepspeed, "zero_optimization.stage") == 2
    assert get_path(rendered.deepspeed, "optimizer.params.lr") == 3e-4
    assert get_path(rendered.deepspeed, "optimizer.params.betas") == [0.8, 0.99], "the file's other keys stay"
    assert "--zero sets zero_optimization.stage = 2 (the config file had 1)" in rendered.notices
    assert "--lr sets optimizer.params.lr = 0.0003 (the config file had 0.01)" in rendered.notices


def test_a_flag_that_agrees_with_the_file_gives_no_notice() -> None:
    assert render(TrainConfig(zero=1), BASE_FILE).notices == ()


def test_set_wins_over_flags_and_file() -> None:
    ds = render(TrainConfig(zero=2, set=("steps_per_print=10", "zero_optimization.overlap_comm=false",
                                         "optimizer.params.betas=[0.9, 0.95]")), BASE_FILE).deepspeed
    assert ds["steps_per_print"] == 10
    assert ds["zero_optimization"]["overlap_comm"] is False
    assert ds["optimizer"]["params"]["betas"] == [0.9, 0.95]


def test_set_may_repeat_what_a_flag_says() -> None:
    ds = render(TrainConfig(zero=2, set=("zero_optimization.stage=2",))).deepspeed
    assert ds["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize(("cfg", "flag", "key"), [
    (TrainConfig(zero=2, set=("zero_optimization.stage=3",)), "--zero", "zero_optimization.stage"),
    (TrainConfig(precision="bf16", set=("bf16.enabled=false",)), "--precision", "bf16.enabled"),
    (TrainConfig(lr=0.1, set=("optimizer.params.lr=0.2",)), "--lr", "optimizer.params.lr"),
    # A --set of a whole section may not quietly undo a flag inside it.
    (TrainConfig(zero=3, set=('zero_optimization={"stage": 2}',)), "--zero", "zero_optimization"),
    # Flags that fill scheduler parameters count as well.
    (TrainConfig(scheduler="warmup", warmup_steps=10, set=("scheduler.params.warmup_num_steps=20",)),
     "--warmup-steps", "scheduler.params.warmup_num_steps"),
    (TrainConfig(scheduler="warmup_cosine", steps=100, set=("scheduler.params.total_num_steps=50",)),
     "--steps", "scheduler.params.total_num_steps"),
    (TrainConfig(scheduler="none", set=("scheduler.type=WarmupLR",)), "--scheduler", "scheduler.type"),
])
def test_a_flag_and_a_set_that_disagree_are_refused_naming_both(cfg: TrainConfig, flag: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        render(cfg)
    (problem,) = err.value.problems
    assert problem.where == f"--set {key}", problem
    assert flag in problem.rule and flag in problem.fix and f"--set {key}" in problem.fix, problem


def test_scheduler_flags_win_over_the_file() -> None:
    # Regression: the file's warmup_num_steps and warmup_max_lr used to beat --warmup-steps and --lr.
    base = {"scheduler": {"type": "WarmupDecayLR",
                          "params": {"warmup_num_steps": 100, "warmup_max_lr": 0.1, "total_num_steps": 1000}}}
    rendered = render(TrainConfig(warmup_steps=10, lr=0.01, steps=50), base)
    params = rendered.deepspeed["scheduler"]["params"]
    assert (params["warmup_num_steps"], params["warmup_max_lr"], params["total_num_steps"]) == (10, 0.01, 50)
    assert len(rendered.notices) == 3, rendered.notices


def test_the_file_scheduler_keeps_its_values_when_no_flag_says_otherwise() -> None:
    base = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100, "warmup_max_lr": 0.1}}}
    params = render(TrainConfig(), base).deepspeed["scheduler"]["params"]
    assert (params["warmup_num_steps"], params["warmup_max_lr"]) == (100, 0.1)


def test_scheduler_none_drops_the_file_scheduler() -> None:
    # Regression: `--scheduler none` used to keep a scheduler from the config file.
    rendered = render(TrainConfig(scheduler="none"), {"scheduler": {"type": "WarmupLR"}})
    assert "scheduler" not in rendered.deepspeed
    assert any("--scheduler none" in n for n in rendered.notices)


def test_lr_is_the_peak_of_every_scheduler() -> None:
    lr = 0.02
    peaks = {"warmup": "warmup_max_lr", "warmup_decay": "warmup_max_lr", "one_cycle": "cycle_max_lr"}
    for name, key in peaks.items():
        params = render(TrainConfig(scheduler=name, lr=lr, steps=10)).deepspeed["scheduler"]["params"]  # type: ignore[arg-type]
        assert params[key] == lr, (name, params)
    # WarmupCosineLR and LRRangeTest scale the optimizer's LR: it must be the peak.
    cosine = render(TrainConfig(scheduler="warmup_cosine", lr=lr, steps=10)).deepspeed
    assert cosine["optimizer"]["params"]["lr"] == lr
    ranged = render(TrainConfig(scheduler="lr_range_test", lr=lr, steps=11)).deepspeed["scheduler"]["params"]
    min_lr, rate, size = (ranged[k] for k in ("lr_range_test_min_lr", "lr_range_test_step_rate",
                                              "lr_range_test_step_size"))
    # DeepSpeed's LRRangeTest: lr = min_lr * (1 + rate * step / step_size); the last of 11 steps is step 10.
    assert min_lr * (1 + rate * 10 / size) == pytest.approx(lr)


def test_sgd_with_zero_is_allowed_explicitly() -> None:
    assert render(TrainConfig(optimizer="sgd", zero=2)).deepspeed["zero_allow_untested_optimizer"] is True
    assert "zero_allow_untested_optimizer" not in render(TrainConfig(optimizer="sgd")).deepspeed
    assert "zero_allow_untested_optimizer" not in render(TrainConfig(zero=2)).deepspeed


def test_parse_set_reads_json_else_text() -> None:
    assert parse_set("a.b=1") == ("a.b", 1)
    assert parse_set("a=true") == ("a", True)
    assert parse_set("a=[1, 2]") == ("a", [1, 2])
    assert parse_set("a=WarmupLR") == ("a", "WarmupLR")
    assert parse_set(" a = x=y") == ("a", " x=y")


@pytest.mark.parametrize("item", ["novalue", "=3", ""])
def test_parse_set_refuses_malformed_items(item: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_set(item)
    assert err.value.problems[0].where == "--set"
    assert "dotted.key=value" in err.value.problems[0].rule


def test_paths() -> None:
    tree: dict[str, Any] = {"a": 1}
    set_path(tree, "b.c.d", 2)
    set_path(tree, "a.x", 3)  # a non-dict on the way is replaced
    assert tree == {"a": {"x": 3}, "b": {"c": {"d": 2}}}
    assert get_path(tree, "b.c.d") == 2
    assert get_path(tree, "b.z", "default") == "default"
    assert get_path(tree, "a.x.y") is None


def test_finalize_fills_what_only_the_workers_know() -> None:
    planned = render(TrainConfig(scheduler="one_cycle", lr=0.01)).deepspeed
    assert sorted(unresolved(planned)) == ["scheduler.params.cycle_first_step_size", "train_micro_batch_size_per_gpu"]
    done = finalize(planned, micro_batch=8, total_steps=40)
    assert unresolved(done) == []
    assert done["train_micro_batch_size_per_gpu"] == 8
    assert done["scheduler"]["params"]["cycle_first_step_size"] == 20
    assert unresolved(planned), "finalize must not change its input"
    cosine = finalize(render(TrainConfig(scheduler="warmup_cosine", warmup_steps=2, micro_batch=4)).deepspeed,
                      micro_batch=99, total_steps=30)
    assert cosine["train_micro_batch_size_per_gpu"] == 4, "a micro-batch the user gave is kept"
    assert cosine["scheduler"]["params"]["total_num_steps"] == 30


def test_a_global_batch_leaves_micro_batch_and_grad_accum_to_deepspeeds_derivation() -> None:
    # Regression (issue 15): nbtrain's defaults (grad-accum 1, the DataLoader's micro-batch) beside a
    # train_batch_size made DeepSpeed's batch assertion fail in the workers.
    for base, line in (({"train_batch_size": 32}, TrainConfig()),
                       ({}, TrainConfig(set=("train_batch_size=32",)))):  # --set comes after the defaults
        ds = render(line, base).deepspeed
        assert ds["train_batch_size"] == 32
        assert "gradient_accumulation_steps" not in ds and "train_micro_batch_size_per_gpu" not in ds, ds
        assert resolve_batch(ds, 2) == {**ds, "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1}
    ds = render(TrainConfig(micro_batch=4), {"train_batch_size": 32}).deepspeed
    assert "gradient_accumulation_steps" not in ds, "DeepSpeed derives it from the other two"
    assert resolve_batch(ds, 2)["gradient_accumulation_steps"] == 4
    kept = render(TrainConfig(grad_accum=2, micro_batch=4), {"train_batch_size": 16}).deepspeed
    assert resolve_batch(kept, 2) == kept, "all three given: nothing to derive"


def test_lamb_with_zero_is_allowed_like_sgd() -> None:
    # FusedLamb is not in DeepSpeed's ZERO_SUPPORTED_OPTIMIZERS: without this a GPU run of
    # --optimizer lamb --zero 2 failed at initialize.
    assert render(TrainConfig(optimizer="lamb", zero=2)).deepspeed["zero_allow_untested_optimizer"] is True
    assert "zero_allow_untested_optimizer" not in render(TrainConfig(optimizer="adam", zero=3)).deepspeed
