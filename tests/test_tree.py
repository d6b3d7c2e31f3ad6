"""The typed, frozen TrainConfig tree."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from nbtrain.config.tree import TrainConfig, choices_of, config_fields, flag_name, freeze_mapping


def test_the_config_is_frozen_and_changes_through_replace() -> None:
    cfg = TrainConfig(zero=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.zero = 2  # type: ignore[misc]
    changed = cfg.replace(precision="bf16")
    assert (changed.zero, changed.precision, cfg.precision) == (3, "bf16", None)


def test_unset_means_none_so_a_config_file_keeps_its_values() -> None:
    cfg = TrainConfig()
    assert all(getattr(cfg, f.name) in (None, (), False) for f in config_fields()), \
        "a field has a default value: it would override the user's DeepSpeed config file"


def test_given_lists_only_what_the_user_set() -> None:
    assert TrainConfig(zero=0, lr=1e-3, out=("a",), dry_run=True).given() == \
        {"zero": 0, "lr": 1e-3, "out": ("a",), "dry_run": True}


def test_every_field_documents_its_flag() -> None:
    undocumented = [f.name for f in config_fields() if len(f.metadata.get("help", "")) < 10]
    assert not undocumented, f"fields without help text: {undocumented}"


def test_flag_names_use_dashes() -> None:
    assert flag_name("micro_batch") == "--micro-batch"
    assert flag_name("offload_optimizer") == "--offload-optimizer"


def test_choices_come_from_the_literal_types() -> None:
    fields = {f.name: f for f in config_fields()}
    assert choices_of(fields["zero"].type) == (0, 1, 2, 3)
    assert choices_of(fields["precision"].type) == ("fp32", "bf16", "fp16")
    assert choices_of(fields["lr"].type) is None


def test_freeze_mapping_copies_deeply() -> None:
    source = {"a": {"b": [1, {"c": 2}]}, "t": (1, 2)}
    copy = freeze_mapping(source)
    copy["a"]["b"][1]["c"] = 99
    assert source["a"]["b"][1]["c"] == 2
    assert copy["t"] == [1, 2]


def test_importing_nbtrain_stays_light() -> None:
    # The magic, the config panel and the server import nbtrain; none may pay for torch.
    code = ("import sys, nbtrain, nbtrain.config.plan, nbtrain.config.arguments; "
            "heavy = [m for m in ('torch', 'deepspeed', 'IPython', 'ipywidgets', 'accelerate') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"import nbtrain pulled in {out.stdout.strip()}"
