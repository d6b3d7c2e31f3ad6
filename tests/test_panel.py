"""The config panel: real ipywidgets driven in-process (no frontend needed), and one real kernel run."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import ipywidgets as w
import pytest
import torch
from deepspeed.runtime import lr_schedules
from traitlets import TraitError

from nbtrain import ConfigError
from nbtrain.config.arguments import parse_line
from nbtrain.config.estimate import GIB
from nbtrain.config.machine import MachineFacts
from nbtrain.config.plan import load_base, plan_run
from nbtrain.config.render import get_path, render
from nbtrain.config.schema import load_schema
from nbtrain.config.tree import TrainConfig
from nbtrain.panel import ConfigPanel, config_panel, form
from nbtrain.panel.fields import scheduler_param_fields

CPU = MachineFacts(gpu_count=0, has_libaio=True)
GPUS = MachineFacts(gpu_count=2, has_libaio=True)


def make_panel(**kwargs: Any) -> ConfigPanel:
    kwargs.setdefault("machine", CPU)
    return ConfigPanel(**kwargs)


def widgets_in(widget: w.Widget) -> list[w.Widget]:
    """Return `widget` and everything below it in the widget tree."""
    found = [widget]
    for child in getattr(widget, "children", ()):
        found += widgets_in(child)
    return found


def button(panel: ConfigPanel, description: str) -> w.Button:
    return next(b for b in widgets_in(panel.widget) if isinstance(b, w.Button) and b.description == description)


def visible(panel: ConfigPanel, name: str) -> bool:
    return panel.inputs[name].row.layout.display != "none"


def run_dict(panel: ConfigPanel) -> dict:
    """Return what %%bigtrain would run from the panel's copied line alone."""
    cfg = parse_line(panel.flags)
    return plan_run(cfg, panel.machine, load_base(cfg.config) if cfg.config else None).deepspeed


# -- the form <-> config mapping, without widgets -------------------------------------------

def test_an_untouched_form_adds_no_flag_to_a_loaded_config(tmp_path: Path) -> None:
    for name, original in realistic_configs(tmp_path).items():
        values = form.display_defaults(form.values_from(render(TrainConfig(), original).deepspeed), 4, 100)
        result = form.to_config(values, original)
        assert result.config == TrainConfig(nproc=4, steps=100), f"{name}: {result.config.given()}"
        assert result.base == original and result.notes == ()


def test_only_fields_the_user_set_become_set_items() -> None:
    values = form.display_defaults(form.values_from(render(TrainConfig()).deepspeed), 2, 50)
    values.update(scheduler="warmup_cosine", lr=0.01)
    values["scheduler.params.cos_min_ratio"] = 0.2
    values["scheduler.params.total_num_steps"] = 999  # derived from --steps: never written
    unpinned = form.to_config(values, {})
    assert unpinned.config.set == () and unpinned.config.lr == 0.01 and unpinned.config.scheduler == "warmup_cosine"
    pinned = form.to_config(values, {}, pinned={"scheduler.params.cos_min_ratio", "scheduler.params.total_num_steps"})
    assert pinned.config.set == ("scheduler.params.cos_min_ratio=0.2",)


# -- defaults, live summary ---------------------------------------------------------------

def test_a_fresh_panel_is_a_valid_config_with_deepspeeds_defaults() -> None:
    panel = make_panel()
    ds = panel.to_deepspeed()
    assert panel.problems == ()
    assert ds["zero_optimization"] == {"stage": 0}
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 0.001, "weight_decay": 0.0}}
    assert "bf16" not in ds and "fp16" not in ds and "scheduler" not in ds, "defaults must follow DeepSpeed"
    assert panel.train_config.nproc == 2 and panel.train_config.micro_batch == 8
    assert panel.config == ds, "panel.config is the DeepSpeed dict, as RunResult.config is"


def test_stage_explanation_and_global_batch_follow_the_form() -> None:
    panel = make_panel()
    html_of = {id(x): x for x in widgets_in(panel.widget) if isinstance(x, w.HTML)}
    panel.set(zero=2, micro_batch=4, grad_accum=3, nproc=4)
    texts = " ".join(x.value for x in html_of.values())
    assert "partitions the optimizer state and the gradients" in texts
    assert "global batch = 4 x 3 x 4 processes = <b>48</b>" in texts
    assert panel.to_deepspeed()["gradient_accumulation_steps"] == 3


# -- impossible combinations cannot be produced ---------------------------------------------

def test_parameter_offload_is_not_offered_below_stage_3() -> None:
    panel = make_panel()
    offload = panel.inputs["offload_param"].parts[0]
    for stage in (0, 1, 2):
        panel.set(zero=stage)
        assert tuple(offload.options) == ("none",) and offload.disabled, f"stage {stage} offers {offload.options}"
        with pytest.raises(TraitError):
            offload.value = "cpu"
        assert "needs ZeRO stage 3" in panel.inputs["offload_param"].message.value
    panel.set(zero=3)
    assert tuple(offload.options) == ("none", "cpu", "nvme") and not offload.disabled
    panel.set(offload_param="cpu")
    assert panel.to_deepspeed()["zero_optimization"]["offload_param"]["device"] == "cpu"
    # Leaving stage 3 takes the offload back, and says so.
    panel.set(zero=2)
    assert offload.value == "none"
    assert "offload_param" not in panel.to_deepspeed()["zero_optimization"]
    assert any("offload_param reset from 'cpu'" in note for note in panel.notes)


def test_nvme_is_offered_at_stage_3_only_and_asks_for_a_path() -> None:
    panel = make_panel()
    panel.set(zero=2)
    assert tuple(panel.inputs["offload_optimizer"].parts[0].options) == ("none", "cpu")
    assert "nvme needs ZeRO-3" in panel.inputs["offload_optimizer"].message.value
    panel.set(zero=3, offload_optimizer="nvme")
    assert visible(panel, "nvme_path")
    # No path yet: the validator's message shows next to the path field; the value stays valid.
    assert [p.rule for p in panel.problems] == ["NVMe offload needs a directory to write to"]
    assert "add --nvme-path" in panel.inputs["offload_optimizer"].message.value
    assert "offload_optimizer" not in panel.to_deepspeed()["zero_optimization"]


def test_nvme_without_libaio_is_not_offered() -> None:
    panel = make_panel(machine=MachineFacts(gpu_count=0, has_libaio=False))
    panel.set(zero=3)
    assert "nvme" not in panel.inputs["offload_optimizer"].parts[0].options
    assert "libaio" in panel.inputs["offload_optimizer"].message.value


def test_quantization_is_offered_but_unavailable_without_cuda() -> None:
    panel = make_panel()
    panel.set(zero=3)
    for name in ("qwz", "qgz"):
        assert visible(panel, name), f"{name} must be offered"
        assert panel.inputs[name].parts[0].disabled, f"{name} must be unavailable without CUDA"
        assert "no GPU" in panel.inputs[name].message.value
    panel.set(qat="int8")
    assert "--qat int8" in panel.flags
    # hpZ runs on CPU: available at stage 3, and checked against the process count.
    assert not panel.inputs["hpz"].parts[0].disabled
    panel.set(nproc=4, hpz=3)
    assert panel.problems and panel.problems[0].rule.startswith("the hpZ partition size must divide")
    panel.set(hpz=2)
    assert panel.problems == () and panel.to_deepspeed()["zero_optimization"]["zero_hpz_partition_size"] == 2


def test_quantization_on_a_gpu_machine_reaches_the_config() -> None:
    panel = make_panel(machine=GPUS)
    panel.set(zero=2)
    assert panel.inputs["qwz"].parts[0].disabled and "needs ZeRO stage 3" in panel.inputs["qwz"].message.value
    panel.set(zero=3, qwz=True, qgz=True)
    zero = panel.to_deepspeed()["zero_optimization"]
    assert zero["zero_quantized_weights"] is True and zero["zero_quantized_gradients"] is True
    assert "--quant qwz+qgz" in panel.flags


def test_fp16_and_lamb_are_gpu_only_and_fp16_shows_loss_scaling() -> None:
    cpu = make_panel()
    assert tuple(cpu.inputs["precision"].parts[0].options) == ("fp32", "bf16")
    assert "fp16" in cpu.inputs["precision"].message.value and "no GPU" in cpu.inputs["precision"].message.value
    assert "lamb" not in cpu.inputs["optimizer"].parts[0].options
    gpu = make_panel(machine=GPUS)
    assert not visible(gpu, "fp16.loss_scale")
    gpu.set(precision="fp16")
    assert visible(gpu, "fp16.loss_scale") and visible(gpu, "fp16.initial_scale_power")
    gpu.set(**{"fp16.loss_scale": 128.0, "fp16.hysteresis": 4})
    assert gpu.to_deepspeed()["fp16"] == {"enabled": True, "loss_scale": 128.0, "hysteresis": 4}
    assert gpu.to_deepspeed()["bf16"] == {"enabled": False}


# -- validation: every problem shown, the value stays valid ----------------------------------

def test_a_bad_value_shows_the_validators_message_and_keeps_the_last_valid_config() -> None:
    panel = make_panel()
    panel.set(lr=0.02)
    panel.set(lr=0.0)
    assert [(p.where, p.rule) for p in panel.problems] == [("--lr", "must be greater than 0")]
    assert "must be greater than 0" in panel.inputs["lr"].message.value
    box = " ".join(x.value for x in widgets_in(panel.widget) if isinstance(x, w.HTML))
    assert "1 problem" in box and "give --lr a value greater than 0" in box
    assert panel.to_deepspeed()["optimizer"]["params"]["lr"] == 0.02, "an invalid edit leaked into the value"
    assert "1 problem(s) in the form" in panel.summary()
    panel.set(lr=0.03)
    assert panel.problems == () and panel.inputs["lr"].message.value == ""


def test_a_problem_shows_next_to_the_fields_it_is_about_whatever_its_text_says(monkeypatch: pytest.MonkeyPatch) -> None:
    # Regression (issue 16): the panel found a problem's field by matching its `where` text
    # (`--lr`, `bf16.enabled/fp16.enabled`, ...); it reads the problem's flag and keys now.
    # Every validator problem is renamed here, so matching the text again would find no field.
    planned = config_panel.plan_run

    def renamed(*args: Any, **kwargs: Any) -> Any:
        try:
            return planned(*args, **kwargs)
        except ConfigError as e:
            raise ConfigError(dataclasses.replace(p, where=f"problem {i}") for i, p in enumerate(e.problems)) from e

    monkeypatch.setattr(config_panel, "plan_run", renamed)
    panel = make_panel()
    panel.set(lr=0.0)
    assert [(p.where, p.flag) for p in panel.problems] == [("problem 0", "--lr")]
    assert "must be greater than 0" in panel.inputs["lr"].message.value
    warming = make_panel(steps=40)
    warming.set(scheduler="warmup_cosine")  # a --warmup-steps problem: the flag's key is the field
    assert "exceeds the run's 40 steps" in warming.inputs["scheduler.params.warmup_num_steps"].message.value
    # One problem about two keys (the NVMe offload of both, without libaio) shows at both fields.
    both = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"},
                                  "offload_param": {"device": "nvme", "nvme_path": "/tmp"}}}
    loaded = make_panel(config=both, machine=MachineFacts(gpu_count=0, has_libaio=False))
    assert [p.where for p in loaded.problems] == ["problem 0"], loaded.problems
    for name in ("offload_optimizer", "offload_param"):
        assert "needs DeepSpeed's async_io op" in loaded.inputs[name].message.value, name


def test_every_problem_of_a_loaded_config_is_listed_and_nothing_is_valid() -> None:
    panel = make_panel(config={"zero_optimisation": {"stage": 2}, "train_micro_batch_size_per_gpu": 4,
                               "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betaz": [0.9, 0.99]}}})
    rules = {p.where: p.fix for p in panel.problems}
    assert rules["zero_optimisation"] == "did you mean 'zero_optimization'?"
    assert "optimizer.params.betaz" in rules
    with pytest.raises(ConfigError, match="zero_optimisation"):
        panel.to_deepspeed()
    assert panel.summary().startswith("ConfigPanel: no valid settings yet")


def test_scheduler_parameters_deepspeed_refuses_are_a_problem() -> None:
    panel = make_panel()
    panel.set(scheduler="one_cycle", **{"scheduler.params.cycle_first_step_size": 0})
    # nbtrain's check of DeepSpeed's own rule (lr_schedules.OneCycle), next to the field it names.
    assert [p.where for p in panel.problems] == ["scheduler.params.cycle_first_step_size"], panel.problems
    assert "first half must last more than 0 steps" in \
        panel.inputs["scheduler.params.cycle_first_step_size"].message.value
    assert panel.to_deepspeed()["scheduler"]["params"]["cycle_first_step_size"] == 50


def test_warmup_longer_than_the_run_is_refused_next_to_the_warmup_field() -> None:
    panel = make_panel(steps=40)
    panel.set(scheduler="warmup_cosine")
    assert "exceeds the run's 40 steps" in panel.inputs["scheduler.params.warmup_num_steps"].message.value
    panel.set(**{"scheduler.params.warmup_num_steps": 5})
    assert panel.problems == () and "--warmup-steps 5" in panel.flags


# -- memory estimate --------------------------------------------------------------------------

def memory_cells(panel: ConfigPanel) -> dict[str, tuple[float, float]]:
    """Read the memory table as a user sees it: state -> (device, host)."""
    import re

    table = panel._memory.value
    rows = re.findall(r"<tr><td>([a-z ]+)</td><td>([0-9.]+)</td><td>([0-9.]+)</td></tr>", table)
    return {name: (float(device), float(host)) for name, device, host in rows}


def test_memory_per_parameter_follows_stage_offload_precision_and_processes() -> None:
    panel = make_panel()
    # fp32 Adam without ZeRO: 4 (weights) + 4 (grads) + 8 (two moments) bytes per parameter.
    assert memory_cells(panel)["total"] == (16.0, 0.0)
    assert "1.3B parameters" in panel._memory.value
    panel.set(zero=3, nproc=4)
    assert memory_cells(panel)["total"] == (4.0, 0.0), "ZeRO-3 splits all 16 bytes over 4 processes"
    panel.set(offload_optimizer="cpu", offload_param="cpu")
    assert memory_cells(panel)["optimizer states"] == (0.0, 2.0)
    assert memory_cells(panel)["parameters"] == (0.0, 1.0)
    panel.set(precision="bf16")
    # bf16 weights and grads (2 + 2) plus fp32 master weights with the moments (4 + 8), over 4.
    assert memory_cells(panel)["total"][0] + memory_cells(panel)["total"][1] == 4.0


def test_memory_of_a_model_counts_its_parameters() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 10))
    count = sum(p.numel() for p in model.parameters())
    panel = make_panel(model=model)
    assert f"{count:,} parameters" in panel._memory.value and "on device (MiB)" in panel._memory.value
    device, host = memory_cells(panel)["total"]
    assert device == pytest.approx(16 * count / 2**20, abs=1e-3) and host == 0.0
    assert "MiB on the device" in panel.summary()
    assert "DeepSpeed's own" not in panel._memory.value, "DeepSpeed's estimators do not cover fp32"
    big = make_panel(model=1_300_000_000)
    assert memory_cells(big)["total"][0] == pytest.approx(16 * 1.3e9 / GIB, abs=1e-3)
    assert "on device (GiB)" in big._memory.value


@pytest.mark.parametrize("stage,offload", [(2, "none"), (2, "cpu"), (3, "none"), (3, "cpu")])
def test_memory_shows_deepspeeds_own_estimate_where_it_applies(stage: int, offload: str) -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.Linear(4096, 1024))
    count = sum(p.numel() for p in model.parameters())
    panel = make_panel(model=model, nproc=4)
    panel.set(zero=stage, precision="bf16", offload_optimizer=offload)
    if stage == 2:
        host, device = estimate_zero2_model_states_mem_needs(count, 4, cpu_offload=offload == "cpu")
    else:
        host, device, _ = estimate_zero3_model_states_mem_needs(count, 4096 * 4096 + 4096, 4, cpu_offload=offload == "cpu",
                                                             cpu_offload_params=False, zero_init=False)
    shown = f"{device / 2**20:.3f} MiB per device, {host / 2**20:.3f} MiB host"
    assert shown in panel._memory.value, panel._memory.value


# -- LR schedule preview --------------------------------------------------------------------

def deepspeed_lrs(ds: dict, steps: int) -> list[float]:
    """Step DeepSpeed's scheduler of `ds` one optimizer step at a time; return the LR each step used."""
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=ds["optimizer"]["params"]["lr"])
    scheduler = getattr(lr_schedules, ds["scheduler"]["type"])(optimizer, **ds["scheduler"]["params"])
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    return used


@pytest.mark.parametrize("scheduler,extra", [
    ("warmup", {"scheduler.params.warmup_num_steps": 10, "scheduler.params.warmup_type": "linear"}),
    ("warmup_decay", {"scheduler.params.warmup_num_steps": 20}),
    ("warmup_cosine", {"scheduler.params.warmup_num_steps": 15, "scheduler.params.cos_min_ratio": 0.1}),
    ("one_cycle", {"scheduler.params.decay_step_size": 5, "scheduler.params.decay_lr_rate": 0.3,
                   "scheduler.params.cycle_first_step_size": 30}),
    ("lr_range_test", {"scheduler.params.lr_range_test_staircase": True, "scheduler.params.lr_range_test_step_size": 7}),
])
def test_schedule_preview_is_deepspeeds_scheduler(scheduler: str, extra: dict) -> None:
    panel = make_panel(steps=120)
    panel.set(lr=0.01, scheduler=scheduler)
    before = panel._plot.value
    panel.set(**extra)
    assert panel.problems == ()
    ds = panel.to_deepspeed()
    for key, value in extra.items():
        assert ds["scheduler"]["params"][key.rsplit(".", 1)[1]] == value
    assert list(panel.lr_curve.lrs) == pytest.approx(deepspeed_lrs(ds, 120), rel=1e-12)
    assert bytes(panel._plot.value).startswith(b"\x89PNG") and bytes(panel._plot.value) != bytes(before), \
        "the plot did not update"


def test_each_scheduler_shows_exactly_its_deepspeed_parameters() -> None:
    schema = load_schema().scheduler_params
    for kind, fields in scheduler_param_fields().items():
        names = {f.name.rsplit(".", 1)[1] for f in fields}
        assert names == set(schema[kind]) - {"last_batch_iteration"}, f"{kind} form differs from DeepSpeed"
    panel = make_panel()
    panel.set(scheduler="lr_range_test")
    shown = {n for n in panel.inputs if n.startswith("scheduler.params.") and visible(panel, n)}
    assert shown == {f.name for f in scheduler_param_fields()["LRRangeTest"]}


def test_derived_schedule_values_follow_steps_and_lr_until_the_user_sets_them() -> None:
    panel = make_panel(steps=100)
    panel.set(scheduler="warmup_decay", **{"scheduler.params.warmup_num_steps": 10})
    panel.set(steps=60, lr=0.005)
    params = panel.to_deepspeed()["scheduler"]["params"]
    assert params["total_num_steps"] == 60 and params["warmup_max_lr"] == 0.005
    assert panel.inputs["scheduler.params.total_num_steps"].value == 60, "the form shows a stale total"
    assert panel.inputs["scheduler.params.total_num_steps"].parts[0].disabled
    panel.set(**{"scheduler.params.warmup_min_lr": 1e-4})
    panel.set(lr=0.002)
    assert panel.to_deepspeed()["scheduler"]["params"]["warmup_min_lr"] == 1e-4, "a value the user set moved"


# -- advanced ---------------------------------------------------------------------------------

def test_advanced_settings_reach_the_zero_section_and_stage3_ones_need_stage_3() -> None:
    panel = make_panel()
    assert panel.inputs["zero_optimization.stage3_max_live_parameters"].parts[0].disabled
    assert panel.inputs["zero_optimization.overlap_comm"].value is False
    panel.set(zero=3)
    assert panel.inputs["zero_optimization.overlap_comm"].value is True, "DeepSpeed overlaps by default at stage 3"
    panel.set(**{"zero_optimization.reduce_bucket_size": 2_000_000,
                 "zero_optimization.stage3_max_live_parameters": 10_000_000,
                 "zero_optimization.overlap_comm": False})
    zero = panel.to_deepspeed()["zero_optimization"]
    assert zero == {"stage": 3, "reduce_bucket_size": 2_000_000, "stage3_max_live_parameters": 10_000_000,
                    "overlap_comm": False}


# -- round trips, buttons, repr -------------------------------------------------------------

def realistic_configs(nvme: Path) -> dict[str, dict]:
    """DeepSpeed configs as users write them (tutorial-style), with keys the form does not show."""
    return {
        "zero2_cpu_offload": {
            "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
            "steps_per_print": 50, "wall_clock_breakdown": False,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                      "weight_decay": 0.1}},
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                  "allgather_partitions": True, "allgather_bucket_size": 200_000_000,
                                  "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": 200_000_000,
                                  "contiguous_gradients": True}},
        "zero3_nvme": {
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "weight_decay": 0.0}},
            "zero_optimization": {
                "stage": 3, "sub_group_size": 100_000_000,
                "offload_optimizer": {"device": "nvme", "nvme_path": str(nvme), "pin_memory": True,
                                      "buffer_count": 4, "fast_init": False},
                "offload_param": {"device": "nvme", "nvme_path": str(nvme), "pin_memory": True,
                                  "buffer_count": 5, "buffer_size": 100_000_000, "max_in_cpu": 1_000_000_000},
                "stage3_prefetch_bucket_size": 5_000_000, "stage3_param_persistence_threshold": 10_000,
                "stage3_max_live_parameters": 100_000_000, "stage3_max_reuse_distance": 100_000_000},
            "aio": {"block_size": 1048576, "queue_depth": 8, "single_submit": False, "overlap_events": True}},
        "bf16_warmup_cosine": {
            "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 4,
            "bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
            "optimizer": {"type": "AdamW", "params": {"lr": 6e-4, "weight_decay": 0.1, "betas": [0.9, 0.95]}},
            "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 2000, "warmup_num_steps": 100,
                                                                "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1}}},
        "one_cycle_sgd": {
            "train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0},
            "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}},
            "scheduler": {"type": "OneCycle", "params": {
                "cycle_min_lr": 0.005, "cycle_max_lr": 0.05, "cycle_first_step_size": 400,
                "cycle_second_step_size": 400, "decay_step_size": 100, "decay_lr_rate": 0.001,
                "cycle_momentum": True, "cycle_min_mom": 0.85, "cycle_max_mom": 0.95}}},
        "lr_range_test": {
            "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
            "scheduler": {"type": "LRRangeTest", "params": {"lr_range_test_min_lr": 1e-6,
                                                             "lr_range_test_step_size": 200,
                                                             "lr_range_test_step_rate": 5.0,
                                                             "lr_range_test_staircase": False}}},
    }


@pytest.mark.parametrize("name", ["zero2_cpu_offload", "zero3_nvme", "bf16_warmup_cosine", "one_cycle_sgd",
                                  "lr_range_test"])
def test_a_realistic_config_comes_back_out_unchanged(name: str, tmp_path: Path) -> None:
    original = realistic_configs(tmp_path)[name]
    panel = make_panel(config=copy.deepcopy(original))
    assert panel.problems == (), panel.problems
    assert panel.to_deepspeed() == original
    assert run_dict(panel) == original, f"the copied line does not reproduce the config: {panel.flags}"
    # Saved and loaded again: still the same, and the form shows the same values.
    path = panel.save_json(tmp_path / "saved.json")
    again = make_panel(config=str(path))
    assert again.to_deepspeed() == original and again.values() == panel.values()
    assert f"--config {path}" in again.flags and "--set" not in again.flags


def test_editing_a_loaded_config_keeps_the_keys_the_form_does_not_show(tmp_path: Path) -> None:
    original = realistic_configs(tmp_path)["bf16_warmup_cosine"]
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(original))
    panel = make_panel(config=str(path))
    panel.set(zero=3, micro_batch=2)
    ds = panel.to_deepspeed()
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["scheduler"] == original["scheduler"] and ds["optimizer"] == original["optimizer"]
    assert f"--config {path}" in panel.flags and "--zero 3 --micro-batch 2" in panel.flags
    assert run_dict(panel) == ds
    # A new scheduler type replaces the old one's parameters instead of carrying unknown keys.
    panel.set(scheduler="lr_range_test")
    assert panel.problems == ()
    assert set(panel.to_deepspeed()["scheduler"]["params"]) == {
        "lr_range_test_min_lr", "lr_range_test_step_size", "lr_range_test_step_rate"}
    assert any("WarmupCosineLR" in n for n in panel.notes)
    assert "--config" not in panel.flags and run_dict(panel) == panel.to_deepspeed()


def test_a_config_with_an_optimizer_the_form_does_not_know_keeps_it() -> None:
    original = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0},
                "optimizer": {"type": "RMSprop", "params": {"lr": 1e-3, "weight_decay": 0.0, "alpha": 0.9}}}
    panel = make_panel(config=copy.deepcopy(original))
    assert panel.to_deepspeed() == original and run_dict(panel) == original
    assert "--set optimizer.type=RMSprop" in panel.flags
    assert panel.inputs["optimizer"].value == "rmsprop"
    panel.set(optimizer="adamw")
    assert panel.to_deepspeed()["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}}
    assert any("alpha" in note for note in panel.notes)


def test_save_json_button_writes_the_valid_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    panel = make_panel()
    panel.set(zero=2, offload_optimizer="cpu", **{"zero_optimization.offload_optimizer.pin_memory": True})
    panel.set(micro_batch=0)  # the widget itself refuses it
    assert panel.inputs["micro_batch"].value == 1
    panel.set(micro_batch=8)
    panel.set(lr=0.0)  # invalid: what is saved is the last valid config
    button(panel, "Save JSON").click()
    saved = json.loads((tmp_path / "ds_config.json").read_text())
    assert saved == panel.to_deepspeed()
    assert saved["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert saved["train_micro_batch_size_per_gpu"] == 8 and saved["optimizer"]["params"]["lr"] == 0.001


def test_copy_button_shows_a_line_that_runs_the_same_config() -> None:
    panel = make_panel()
    panel.set(zero=3, offload_optimizer="cpu", precision="bf16", grad_clip=1.0, optimizer="sgd",
              **{"optimizer.params.momentum": 0.9})
    panel.set(scheduler="warmup", **{"scheduler.params.warmup_num_steps": 10})
    button(panel, "Copy as %%bigtrain").click()
    lines = [x.value for x in widgets_in(panel.widget) if isinstance(x, w.Textarea) and x.value]
    assert lines and lines[0].startswith("%%bigtrain --nproc 2 --zero 3 --offload-optimizer cpu --precision bf16")
    assert "--set optimizer.params.momentum=0.9" in lines[0]
    panel.set(optimizer="adamw", **{"optimizer.params.betas": [0.8, 0.95]})
    assert panel.to_deepspeed()["optimizer"]["params"]["betas"] == [0.8, 0.95]
    assert "momentum" not in panel.to_deepspeed()["optimizer"]["params"]
    assert run_dict(panel) == panel.to_deepspeed()
    assert panel.to_deepspeed()["gradient_clipping"] == 1.0


def test_text_repr_summarises_the_config_for_saved_notebooks() -> None:
    panel = make_panel(model=1_300_000_000)
    panel.set(zero=3, precision="bf16", scheduler="warmup_cosine", **{"scheduler.params.warmup_num_steps": 10})
    bundle = panel._repr_mimebundle_()
    text = bundle["text/plain"]
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert text.startswith("ConfigPanel: ZeRO-3, bf16, micro-batch 8 x grad-accum 1 x 2 processes = global batch 16")
    assert "WarmupCosineLR over 100 steps" in text and "%%bigtrain --nproc 2 --zero 3" in text
    assert "GiB on the device" in text


def test_import_nbtrain_stays_light_and_config_panel_loads_on_use() -> None:
    code = ("import sys, nbtrain; heavy = [m for m in ('ipywidgets', 'torch', 'deepspeed') if m in sys.modules]; "
            "assert not heavy, heavy; nbtrain.ConfigPanel; assert 'ipywidgets' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "ok", out.stderr


# -- through a real kernel --------------------------------------------------------------------

PANEL_CELL = """
import json, nbtrain
panel = nbtrain.ConfigPanel(model=make_model(), steps=5)
panel.set(zero=2, offload_optimizer="cpu", micro_batch=4, grad_accum=2, grad_clip=1.0, lr=0.01,
          scheduler="warmup_decay")
panel.set(**{"scheduler.params.warmup_num_steps": 3, "scheduler.params.warmup_type": "linear",
             "zero_optimization.reduce_bucket_size": 1000000})
assert not panel.problems, panel.problems
print(json.dumps({"deepspeed": panel.to_deepspeed(), "lrs": list(panel.lr_curve.lrs)}))
"""


def leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


@pytest.mark.integration
def test_bigtrain_runs_the_panels_settings(kernel: Any, tmp_path: Path) -> None:
    from tests.conftest import only_run
    from tests.test_magic import FIT_CELL

    printed = kernel.execute(PANEL_CELL).text
    assert "Attempting to get learning rate" not in printed, "the preview leaks DeepSpeed's warning"
    panel = json.loads(printed.strip().splitlines()[-1])
    out = kernel.execute(f"%%bigtrain --config panel --nproc 2 --steps 5\n{FIT_CELL}")
    assert "succeeded" in out.value(), out.text
    run = only_run(tmp_path)
    effective = json.loads((run / "deepspeed.effective.json").read_text())
    used = leaves(effective["config"])
    for key, value in leaves(panel["deepspeed"]).items():
        assert used.get(key) == value, f"the run used {key} = {used.get(key)!r}, the panel said {value!r}"
    engine = effective["engine"]
    assert (engine["zero_stage"], engine["train_batch_size"], engine["max_steps"]) == (2, 4 * 2 * 2, 5)
    records = [json.loads(line) for line in (run / "metrics" / "rank-0.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in sorted(records, key=lambda r: r["step"]) if "lr" in r]
    assert lrs == pytest.approx(panel["lrs"], rel=1e-9), "the preview is not the LR the run used"


@pytest.mark.integration
def test_a_loaded_config_runs_as_loaded_with_deepspeeds_batch_split(kernel: Any, tmp_path: Path) -> None:
    """A documented-style config (train_batch_size only) loaded, untouched, run with --config panel."""
    from tests.conftest import only_run
    from tests.test_magic import FIT_CELL

    loaded = {"train_batch_size": 32, "optimizer": {"type": "Adam", "params": {"lr": 0.001}},
              "zero_optimization": {"stage": 1}}
    printed = kernel.execute(f"import json, nbtrain\npanel = nbtrain.ConfigPanel(config={loaded!r}, nproc=2, "
                             "steps=3)\nprint(json.dumps(panel.to_deepspeed()))").text
    assert json.loads(printed.strip().splitlines()[-1]) == loaded, printed
    out = kernel.execute(f"%%bigtrain --config panel --nproc 2 --steps 3\n{FIT_CELL}")
    assert "succeeded" in out.value(), out.text
    engine = json.loads((only_run(tmp_path) / "deepspeed.effective.json").read_text())["engine"]
    # DeepSpeed's own split: 16 per rank. Regression: nbtrain added grad-accum 1 and its default
    # micro-batch of 8, and DeepSpeed's batch assertion (32 != 8 x 1 x 2) failed in the workers.
    assert (engine["train_batch_size"], engine["micro_batch"], engine["grad_accum"], engine["zero_stage"]) == \
        (32, 16, 1, 1), engine


@pytest.mark.integration
def test_a_saved_notebook_shows_the_panels_summary_without_widgets(tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    source = "import nbtrain\npanel = nbtrain.ConfigPanel(steps=50)\npanel.set(zero=3, precision='bf16')\npanel"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    path = tmp_path / "panel.ipynb"
    nbformat.write(notebook, path)
    saved = nbformat.read(path, as_version=4)
    data = saved.cells[0].outputs[-1]["data"]
    assert "application/vnd.jupyter.widget-view+json" in data
    text = data["text/plain"]
    assert text.startswith("ConfigPanel: ZeRO-3, bf16, micro-batch 8"), f"a saved notebook would show {text!r}"
    assert "%%bigtrain --nproc 2 --zero 3 --precision bf16" in text and "bytes/parameter" in text


# -- exact round trips (issue 15, item 4) ------------------------------------------------------

GOLDEN = Path(__file__).with_name("golden")
# DeepSpeed's documented configs as users paste them (deepspeed.ai's config-json page and its
# ZeRO-3 offload tutorial), each without the keys nbtrain would fill in.
DEEPSPEED_EXAMPLES: dict[str, dict] = {
    "zero3_offload": {
        "train_micro_batch_size_per_gpu": 4,
        "zero_optimization": {"stage": 3, "contiguous_gradients": True, "stage3_max_live_parameters": 1e9,
                              "stage3_max_reuse_distance": 1e9, "stage3_prefetch_bucket_size": 1e7,
                              "stage3_param_persistence_threshold": 1e5, "reduce_bucket_size": 1e7,
                              "sub_group_size": 1e9, "offload_optimizer": {"device": "cpu"},
                              "offload_param": {"device": "cpu"}}},
    "fp16_loss_scaling": {
        "train_batch_size": 8, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 0.00015}},
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": {"stage": 2}},
    "scheduler_with_params": {
        "train_batch_size": 16, "gradient_clipping": 1.0,
        "optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.8, 0.999], "eps": 1e-8,
                                                 "weight_decay": 3e-7}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001,
                                                      "warmup_num_steps": 1000}}},
    "keys_the_form_does_not_know": {
        "train_micro_batch_size_per_gpu": 2, "steps_per_print": 10, "wall_clock_breakdown": False,
        "prescale_gradients": False, "communication_data_type": "fp32",
        "activation_checkpointing": {"partition_activations": False, "contiguous_memory_optimization": False,
                                     "cpu_checkpointing": False},
        "flops_profiler": {"enabled": False, "profile_step": 1, "module_depth": -1, "top_modules": 1},
        "tensorboard": {"enabled": False, "output_path": "logs/", "job_name": "train"},
        "zero_optimization": {"stage": 1, "reduce_scatter": True, "allgather_partitions": True}},
}


def golden_configs() -> dict[str, dict]:
    """Every DeepSpeed dict held in tests/golden: each rendered config, and each config file."""
    found = {}
    for path in sorted(GOLDEN.glob("*.json")):
        golden = json.loads(path.read_text())
        found[path.stem] = golden["deepspeed"]
        if golden["config_file"]:
            found[f"{path.stem} (config file)"] = golden["config_file"]
    return found


def round_trip_cases() -> dict[str, tuple[dict, MachineFacts]]:
    cases = {name: (ds, CPU) for name, ds in golden_configs().items()}
    cases.update({name: (ds, GPUS if "fp16" in name else CPU) for name, ds in DEEPSPEED_EXAMPLES.items()})
    return cases


def changed_keys(before: dict, after: dict) -> set[str]:
    """Return the dotted keys whose value differs between two DeepSpeed dicts (added and removed too)."""
    old, new = dict(form._leaves(before)), dict(form._leaves(after))
    return {key for key in old.keys() | new.keys() if old.get(key, "absent") != new.get(key, "absent")}


@pytest.mark.parametrize("name", sorted(round_trip_cases()))
def test_a_loaded_config_comes_back_equal_without_keys_it_did_not_have(name: str) -> None:
    # Regression (issue 15): a config without them came back with gradient_accumulation_steps: 1
    # and optimizer.params.weight_decay: 0.0 added.
    original, machine = round_trip_cases()[name]
    panel = make_panel(config=copy.deepcopy(original), machine=machine)
    assert panel.problems == (), [str(p) for p in panel.problems]
    assert panel.to_deepspeed() == original, f"changed keys: {changed_keys(original, panel.to_deepspeed())}"
    assert panel.config == original
    # The copied line runs what `%%bigtrain --config panel` runs with the same processes and steps.
    cell = TrainConfig(nproc=panel.inputs["nproc"].value, steps=panel.inputs["steps"].value)
    assert run_dict(panel) == plan_run(cell, machine, panel.to_deepspeed()).deepspeed, panel.flags


@pytest.mark.parametrize(("name", "field", "value", "key"), [
    ("zero3_offload", "zero_optimization.offload_param.pin_memory", True, "zero_optimization.offload_param.pin_memory"),
    ("zero3_offload", "lr", 0.01, "optimizer.params.lr"),
    ("fp16_loss_scaling", "fp16.loss_scale_window", 500, "fp16.loss_scale_window"),
    ("fp16_loss_scaling", "zero", 1, "zero_optimization.stage"),
    ("scheduler_with_params", "scheduler.params.warmup_num_steps", 50, "scheduler.params.warmup_num_steps"),
    ("scheduler_with_params", "weight_decay", 0.1, "optimizer.params.weight_decay"),
    ("keys_the_form_does_not_know", "grad_clip", 0.5, "gradient_clipping"),
    ("keys_the_form_does_not_know", "grad_accum", 4, "gradient_accumulation_steps"),
])
def test_a_form_change_sets_exactly_that_key(name: str, field: str, value: Any, key: str) -> None:
    original = DEEPSPEED_EXAMPLES[name]
    panel = make_panel(config=copy.deepcopy(original), machine=GPUS if "fp16" in name else CPU)
    before = panel.inputs[field].value
    panel.set(**{field: value})
    assert panel.problems == (), [str(p) for p in panel.problems]
    assert changed_keys(original, panel.to_deepspeed()) == {key}
    assert get_path(panel.to_deepspeed(), key) == value
    panel.set(**{field: before})  # changed back: the loaded config again, exactly
    assert panel.to_deepspeed() == original


def test_a_batch_change_keeps_a_loaded_train_batch_size_consistent() -> None:
    original = DEEPSPEED_EXAMPLES["scheduler_with_params"]  # train_batch_size 16 over 2 processes
    panel = make_panel(config=copy.deepcopy(original))
    assert (panel.inputs["micro_batch"].value, panel.inputs["grad_accum"].value) == (8, 1), "DeepSpeed derives 8 x 1"
    panel.set(grad_accum=2)
    assert changed_keys(original, panel.to_deepspeed()) == {"gradient_accumulation_steps", "train_batch_size"}
    assert panel.to_deepspeed()["train_batch_size"] == 8 * 2 * 2 and panel.problems == ()


def test_a_config_written_for_another_world_size_says_so_next_to_the_batch() -> None:
    written_for_8 = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    assert make_panel(config=dict(written_for_8)).inputs["nproc"].value == 8, "the batch sizes give the world size"
    panel = make_panel(config=dict(written_for_8), nproc=2)
    message = panel.inputs["micro_batch"].message.value
    assert "4 x 2 x 2 = 16" in message and "keep it with --nproc 8" in message, message
    with pytest.raises(ConfigError):
        panel.to_deepspeed()


def test_a_missing_nvme_path_is_shown_inline_and_never_reaches_a_run(tmp_path: Path) -> None:
    # Regression (issue 15): loading a config whose NVMe path does not exist must build the panel.
    missing = tmp_path / "nvme"
    original = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": str(missing)},
        "offload_param": {"device": "nvme", "nvme_path": str(missing)}}}
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(original))
    panel = make_panel(config=str(path))
    assert visible(panel, "nvme_path") and panel.inputs["nvme_path"].value == str(missing)
    assert f"mkdir -p {missing}" in panel.inputs["nvme_path"].message.value
    assert "does not exist" in panel._problems_box.value
    with pytest.raises(ConfigError, match="NVMe offload directory does not exist"):
        panel.to_deepspeed()  # what `%%bigtrain --config panel` reads: nothing invalid gets through
    with pytest.raises(ConfigError):
        panel.save_json(tmp_path / "saved.json")
    missing.mkdir()
    for typed in (str(missing)[:-1], str(missing)):  # the path typed again, key by key, once it exists
        panel.set(nvme_path=typed)
    assert panel.problems == () and panel.to_deepspeed() == original


@pytest.mark.parametrize(("original", "field", "shown", "says"), [
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}},
     "offload_optimizer", "nvme", "ZeRO-3 feature"),
    ({"fp16": {"enabled": True}}, "precision", "fp16", "only on CUDA devices"),
    ({"optimizer": {"type": "Lamb", "params": {"lr": 0.01}}}, "optimizer", "lamb", "no CPU implementation"),
    ({"zero_optimization": {"stage": 3, "zero_quantized_weights": True}}, "qwz", True, "no CPU version"),
    ({"zero_optimization": {"stage": 2, "zero_hpz_partition_size": 2}}, "hpz", 2, "hpZ needs ZeRO stage 3"),
])
def test_a_loaded_setting_the_form_would_not_offer_is_shown_with_its_problem_not_dropped(
        original: dict, field: str, shown: Any, says: str) -> None:
    # Regression: the form reset such values (NVMe below stage 3 to "none", fp16 on a CPU to
    # fp32, ...) with a note and handed out a valid config the user never wrote.
    panel = make_panel(config=copy.deepcopy(original))
    assert panel.inputs[field].value == shown
    assert says in panel.inputs[field].message.value
    panel.set(lr=0.5)  # another change keeps it, and its problem
    assert panel.inputs[field].value == shown and panel.problems
    with pytest.raises(ConfigError):
        panel.to_deepspeed()


def test_a_kept_setting_fixed_in_the_form_gives_exactly_that_change() -> None:
    original = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}}
    panel = make_panel(config=copy.deepcopy(original))
    panel.set(zero=3)
    assert panel.problems == ()
    assert changed_keys(original, panel.to_deepspeed()) == {"zero_optimization.stage"}
