"""The flag ↔ DeepSpeed key table: render writes each flag's key, the panel reads it back, problems carry it."""

from __future__ import annotations

from typing import Any

import pytest

from nbtrain.config.arguments import parse_line
from nbtrain.config.keys import FLAG_KEYS, field_of_key
from nbtrain.config.machine import MachineFacts
from nbtrain.config.render import get_path, render
from nbtrain.config.validate import check
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
