"""The flag ↔ DeepSpeed key table: render writes each flag's key, the panel reads it back, problems carry it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from nbtrain.config.arguments import parse_line
from nbtrain.config.deepspeed_rules import check_batch
from nbtrain.config.keys import FLAG_KEYS, field_of_key
from nbtrain.config.machine import MachineFacts
from nbtrain.config.render import get_path, render
from nbtrain.config.validate import check
from nbtrain.errors import ConfigError, Problem
from nbtrain.panel.fields import fields_of
from nbtrain.panel.form import values_from

# A value of each flag, as typed and as the panel's field holds it.
SAMPLES: dict[str, tuple[str, Any]] = {
    "zero": ("3", 3), "offload_optimizer": ("cpu", "cpu"), "offload_param": ("cpu", "cpu"),
    "precision": ("bf16", "bf16"), "micro_batch": ("4", 4), "grad_accum": ("2", 2), "grad_clip": ("0.5", 0.5),
    "optimizer": ("sgd", "sgd"), "lr": ("0.02", 0.02), "weight_decay": ("0.1", 0.1),
    "scheduler": ("warmup_cosine", "warmup_cosine"), "quant": ("qwz+qgz", None), "hpz": ("2", 2),
}


def test_every_field_of_the_table_has_a_sample() -> None:
    assert {row.field for row in FLAG_KEYS} == set(SAMPLES), "a flag was added to config/keys.py without a sample here"


@pytest.mark.parametrize("row", FLAG_KEYS, ids=lambda row: row.key)
def test_a_flag_renders_its_key_and_the_panel_reads_it_back(row: Any) -> None:
    typed, shown = SAMPLES[row.field]
    cfg = parse_line(f"{row.flag.replace('_', '-')} {typed} --steps 10")
    ds = render(cfg).deepspeed
    assert get_path(ds, row.key) == row.to_key(getattr(cfg, row.field)), f"{row.flag} {typed} did not set {row.key}"
    if shown is not None:  # --quant shows as two boxes, qwz and qgz
        assert values_from(ds)[row.field] == shown, f"the panel reads {row.key} back wrong"


def test_a_problem_carries_the_key_it_is_about_whether_set_by_flag_or_file() -> None:
    key = "zero_optimization.zero_hpz_partition_size"
    line = "--nproc 2 --zero 2 --hpz 2"
    by_flag = check(parse_line(line), render(parse_line(line)).deepspeed, MachineFacts(), 2)
    by_file = check(parse_line("--nproc 2"), {"zero_optimization": {"stage": 2, "zero_hpz_partition_size": 2}},
                    MachineFacts(), 2)
    assert [(p.where, p.key) for p in by_flag if "hpZ needs" in p.rule] == [("--hpz", key)]
    assert [(p.where, p.key) for p in by_file if "hpZ needs" in p.rule] == [(key, key)]
    assert field_of_key()[key] == "hpz", "the panel would not show it next to hpZ"


# -- what a problem is about: its flag and keys, from the table, for the panel to read ---------

def checked(line: str, ds: Mapping[str, Any] | None = None, machine: MachineFacts | None = None) -> list[Problem]:
    """Return the validator's problems with a cell line (and a loaded DeepSpeed dict instead of the rendered one)."""
    cfg = parse_line(line)
    return check(cfg, render(cfg).deepspeed if ds is None else ds, machine or MachineFacts(), cfg.nproc or 2)


def refused(line: str) -> list[Problem]:
    with pytest.raises(ConfigError) as caught:
        parse_line(line)
    return list(caught.value.problems)


def refused_or_checked(line: str) -> list[Problem]:
    """Return the problems of a line that render refuses (a --set against a flag) or the validator finds."""
    try:
        return checked(line)
    except ConfigError as e:
        return list(e.problems)


def one(problems: list[Problem], where: str) -> Problem:
    named = [p for p in problems if p.where == where]
    assert len(named) == 1, f"expected one problem named {where!r}: {[str(p) for p in problems]}"
    return named[0]


NVME_BOTH = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"},
                                   "offload_param": {"device": "nvme", "nvme_path": "/tmp"}}}
# The problems that name several keys or a flag of another field's name (the panel once
# matched these `where` texts by name), as the validators make them, and the fields showing each.
SEVERAL: dict[str, tuple[Callable[[], Problem], set[str]]] = {
    "bf16 and fp16 both on": (lambda: one(checked("", {"bf16": {"enabled": True}, "fp16": {"enabled": True}}),
                                          "bf16.enabled/fp16.enabled"), {"precision"}),
    "NVMe without libaio": (lambda: one(checked("--nproc 2", NVME_BOTH, MachineFacts(has_libaio=False)),
                                        "--offload-optimizer/--offload-param"), {"offload_optimizer", "offload_param"}),
    "a bad --quant": (lambda: one(refused("--quant qwx"), "--quant"), {"qwz", "qgz"}),
    "a missing --nvme-path": (lambda: one(checked("--zero 3 --offload-optimizer nvme --nvme-path /no/such/dir"),
                                          "--nvme-path"), {"nvme_path"}),
    "--warmup-steps without a warm-up": (lambda: one(checked("--warmup-steps 5"), "--warmup-steps"),
                                         {"scheduler.params.warmup_num_steps"}),
    "scheduler parameters DeepSpeed refuses": (  # as schedules.lr_curve words it (that needs DeepSpeed itself)
        lambda: Problem("scheduler.params", {"warmup_num_steps": 0}, "DeepSpeed's WarmupLR refuses them: ...",
                        "change the scheduler parameters"), {"scheduler"}),
    "a global batch for another world size": (
        lambda: one(check_batch(parse_line("--nproc 2"), {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4,
                                                          "gradient_accumulation_steps": 2}, 2), "train_batch_size"),
        {"micro_batch"}),
}


@pytest.mark.parametrize("case", SEVERAL)
def test_a_problem_about_several_keys_or_another_fields_flag_shows_at_every_field_it_is_about(case: str) -> None:
    make, fields = SEVERAL[case]
    problem = make()
    assert set(fields_of(problem)) == fields, f"{problem} (flag {problem.flag}, keys {problem.keys})"


def test_a_problem_about_several_keys_carries_all_of_them() -> None:
    problem = one(checked("--nproc 2", NVME_BOTH, MachineFacts(has_libaio=False)), "--offload-optimizer/--offload-param")
    assert problem.keys == ("zero_optimization.offload_optimizer.device", "zero_optimization.offload_param.device")
    assert problem.flag is None, "two flags: no one flag to name"
    assert one(refused("--quant qwx"), "--quant").keys == tuple(row.key for row in FLAG_KEYS if row.flag == "--quant")


def test_a_problem_about_a_key_no_flag_sets_has_no_flag_and_shows_at_that_keys_field() -> None:
    problem = one(checked("", {"fp16": {"enabled": True, "loss_scale": -1}}), "fp16.loss_scale")
    assert (problem.flag, problem.keys, fields_of(problem)) == (None, ("fp16.loss_scale",), ("fp16.loss_scale",))


def test_a_problem_about_a_flag_that_sets_no_key_has_no_key_and_shows_at_that_flags_field() -> None:
    problem = one(checked("--nproc 0"), "--nproc")
    assert (problem.flag, problem.keys, problem.key, fields_of(problem)) == ("--nproc", (), None, ("nproc",))


def test_a_flag_the_user_set_names_the_problem_and_keeps_its_key() -> None:
    problem = one(checked("--lr -1"), "--lr")
    assert (problem.flag, problem.keys, fields_of(problem)) == ("--lr", ("optimizer.params.lr",), ("lr",))
    conflict = one(refused_or_checked("--zero 2 --set zero_optimization.stage=3"), "--set zero_optimization.stage")
    assert (conflict.flag, conflict.keys, fields_of(conflict)) == ("--set", ("zero_optimization.stage",), ("zero",))


def test_fields_given_by_the_call_site_win_over_what_where_names() -> None:
    # A call site picks one of a flag's keys (--quant sets two), or names a problem in words.
    weights = "zero_optimization.zero_quantized_weights"
    assert Problem("--quant", "qwz", "r", "f", key=weights).keys == (weights,)
    worded = Problem("the ZeRO stage", 5, "r", "f", flag="--zero", keys=["zero_optimization.stage"])
    assert (worded.flag, worded.keys, fields_of(worded)) == ("--zero", ("zero_optimization.stage",), ("zero",))
    assert str(worded) == "the ZeRO stage = 5: r. Fix: f", "the message still names what `where` says"
