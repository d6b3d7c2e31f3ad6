"""The DeepSpeed keys nbtrain accepts are DeepSpeed's own.

Two directions: every key of real, valid DeepSpeed configs (from DeepSpeed's docs and
tests) passes nbtrain's validation and DeepSpeed's own parser; and a misspelt key that
nbtrain refuses is one DeepSpeed either refuses too or would silently ignore.
These tests import DeepSpeed (about a second), nothing more: no process starts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from nbtrain.config.machine import MachineFacts
from nbtrain.config.schema import _SHIPPED, DeepSpeedSchema, derive_schema, load_schema
from nbtrain.config.tree import TrainConfig
from nbtrain.config.validate import check

# Judge the keys, not this machine: a GPU machine may run every one of these configs.
GPU = MachineFacts(gpu_count=2, has_libaio=True)
NVME_DIR = "/tmp"

OPTIMIZERS = {
    "adam": {"type": "Adam", "params": {"lr": 1e-3, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7,
                                        "torch_adam": True, "adam_w_mode": True}},
    "adamw": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                                          "amsgrad": False}},
    "sgd": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "dampening": 0.0, "weight_decay": 1e-4,
                                      "nesterov": True}},
}
SCHEDULERS = {
    "WarmupLR": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000, "warmup_type": "log"},
    "WarmupDecayLR": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 100,
                      "total_num_steps": 10000, "warmup_type": "linear"},
    "WarmupCosineLR": {"total_num_steps": 1000, "warmup_min_ratio": 0.0, "warmup_num_steps": 100,
                       "cos_min_ratio": 0.0001, "warmup_type": "linear"},
    "OneCycle": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3, "decay_lr_rate": 0.001, "cycle_first_step_size": 1000,
                 "cycle_second_step_size": 1000, "cycle_first_stair_count": 0, "cycle_second_stair_count": 0,
                 "decay_step_size": 1000, "cycle_momentum": True, "cycle_min_mom": 0.85, "cycle_max_mom": 0.99,
                 "decay_mom_rate": 0.0},
    "LRRangeTest": {"lr_range_test_min_lr": 1e-4, "lr_range_test_step_size": 200, "lr_range_test_step_rate": 5,
                    "lr_range_test_staircase": False},
}

VALID_CONFIGS: dict[str, dict[str, Any]] = {
    "zero3 cpu offload, every stage3 knob, bf16": {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
        "steps_per_print": 100, "wall_clock_breakdown": False, "prescale_gradients": False,
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
            "reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7,
            "stage3_param_persistence_threshold": 1e5, "stage3_max_live_parameters": 1e9,
            "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True,
            "stage3_module_granularity_threshold": 0, "stage3_model_persistence_threshold": 1e12,
            "offload_optimizer": {"device": "cpu", "pin_memory": True, "ratio": 1.0},
            "offload_param": {"device": "cpu", "pin_memory": True},
            "zero_hpz_partition_size": 1, "ignore_unused_parameters": True, "memory_efficient_linear": True,
            "round_robin_gradients": False, "elastic_checkpoint": False, "load_from_fp32_weights": True,
        },
        "optimizer": OPTIMIZERS["adamw"], "scheduler": {"type": "WarmupCosineLR", "params": SCHEDULERS["WarmupCosineLR"]},
    },
    "zero3 nvme offload with aio": {
        "train_batch_size": 8, "train_micro_batch_size_per_gpu": 8,
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "nvme", "nvme_path": NVME_DIR, "buffer_count": 4, "pin_memory": False,
                                  "pipeline_read": False, "pipeline_write": False, "fast_init": False},
            "offload_param": {"device": "nvme", "nvme_path": NVME_DIR, "buffer_count": 5, "buffer_size": 1e8,
                              "max_in_cpu": 1e9, "pin_memory": False},
        },
        "aio": {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
                "overlap_events": True},
        "optimizer": OPTIMIZERS["adam"],
    },
    "zero2 fp16 with loss-scale knobs": {
        "train_batch_size": 32, "gradient_accumulation_steps": 1,
        "fp16": {"enabled": True, "auto_cast": False, "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "consecutive_hysteresis": False, "min_loss_scale": 1},
        "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 2e8,
                              "reduce_scatter": True, "reduce_bucket_size": 2e8, "overlap_comm": True,
                              "contiguous_gradients": True, "round_robin_gradients": True},
        "optimizer": OPTIMIZERS["adam"], "scheduler": {"type": "WarmupDecayLR", "params": SCHEDULERS["WarmupDecayLR"]},
    },
    "profiling, checkpointing and monitors": {
        "train_micro_batch_size_per_gpu": 8, "memory_breakdown": False, "dump_state": False,
        "communication_data_type": "fp32", "gradient_predivide_factor": 1.0,
        "flops_profiler": {"enabled": True, "profile_step": 1, "module_depth": -1, "top_modules": 1,
                           "detailed": True, "output_file": None},
        "activation_checkpointing": {"partition_activations": False, "cpu_checkpointing": False,
                                     "contiguous_memory_optimization": False, "number_checkpoints": None,
                                     "synchronize_checkpoint_boundary": False, "profile": False},
        "tensorboard": {"enabled": True, "output_path": "logs/", "job_name": "train_bert"},
        "csv_monitor": {"enabled": True, "output_path": "logs/", "job_name": "train_bert"},
        "wandb": {"enabled": False, "group": "my_group", "team": "my_team", "project": "my_project"},
        "comms_logger": {"enabled": True, "verbose": False, "prof_all": True, "debug": False},
        "timers": {"throughput": {"enabled": True, "synchronized": False}},
        "checkpoint": {"tag_validation": "Warn", "load_universal": False, "use_node_local_storage": False},
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True, "optimizer": OPTIMIZERS["sgd"],
    },
}
for _name, _params in SCHEDULERS.items():
    VALID_CONFIGS[f"scheduler {_name}"] = {"train_micro_batch_size_per_gpu": 2, "optimizer": OPTIMIZERS["adam"],
                                           "scheduler": {"type": _name, "params": _params}}
for _name, _optimizer in OPTIMIZERS.items():
    VALID_CONFIGS[f"optimizer {_name}"] = {"train_micro_batch_size_per_gpu": 2, "optimizer": _optimizer,
                                           "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}


def deepspeed_parses(config: dict[str, Any]) -> None:
    """Let DeepSpeed's own config parser read `config` (it raises on what it refuses)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    DeepSpeedConfig(copy.deepcopy(config))


def deepspeed_builds_optimizer_and_scheduler(config: dict[str, Any]) -> None:
    """Build the optimizer and scheduler from `config` the way DeepSpeed's engine does."""
    import torch
    from deepspeed.runtime import lr_schedules

    params = dict(config["optimizer"]["params"])
    kind = config["optimizer"]["type"].lower()
    # The engine pops these before calling the torch optimizer (engine._configure_basic_optimizer).
    adam_w_mode = params.pop("adam_w_mode", True)
    params.pop("torch_adam", None)
    cls = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW,
           "adam": torch.optim.AdamW if adam_w_mode else torch.optim.Adam}[kind]
    optimizer = cls([torch.nn.Parameter(torch.zeros(2))], **params)
    if "scheduler" in config:
        scheduler = config["scheduler"]
        getattr(lr_schedules, scheduler["type"])(optimizer, **scheduler.get("params", {}))


def test_the_shipped_schema_is_what_the_installed_deepspeed_says() -> None:
    derived = json.loads(json.dumps(derive_schema().__dict__, sort_keys=True))
    shipped = json.loads(_SHIPPED.read_text())
    assert derived == shipped, (
        f"{_SHIPPED.name} is out of date for DeepSpeed {derived['version']} (it was made for {shipped['version']}): "
        "run `python -m nbtrain.config.schema` and commit the result")


def test_load_schema_reads_the_shipped_file_for_this_version() -> None:
    schema = load_schema()
    assert isinstance(schema, DeepSpeedSchema)
    assert schema.version == json.loads(_SHIPPED.read_text())["version"]


@pytest.mark.parametrize("name", sorted(VALID_CONFIGS))
def test_what_deepspeed_accepts_we_accept(name: str) -> None:
    config = VALID_CONFIGS[name]
    deepspeed_parses(config)
    deepspeed_builds_optimizer_and_scheduler(config)
    problems = check(TrainConfig(), config, GPU, nproc=2)
    assert problems == [], f"nbtrain refuses a config DeepSpeed accepts: {[str(p) for p in problems]}"


@pytest.mark.parametrize(("section", "key"), [
    ("zero_optimization", "stage3_prefetch_bucket_sze"),
    ("zero_optimization.offload_optimizer", "pin_memroy"),
    ("zero_optimization.offload_param", "buffer_cont"),
    ("bf16", "enabeld"),
    ("fp16", "loss_scale_windw"),
    ("comms_logger", "verbos"),
])
def test_a_misspelt_nested_key_is_refused_by_deepspeed_and_by_us(section: str, key: str) -> None:
    config = copy.deepcopy(VALID_CONFIGS["zero3 cpu offload, every stage3 knob, bf16"])
    node = config
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[key] = 1
    with pytest.raises(Exception, match=key):  # DeepSpeed raises pydantic's ValidationError
        deepspeed_parses(config)
    problems = check(TrainConfig(), config, GPU, nproc=2)
    assert [p.where for p in problems] == [f"{section}.{key}"], [str(p) for p in problems]


def test_a_misspelt_top_level_key_is_ignored_by_deepspeed_but_refused_by_us() -> None:
    # The reason nbtrain checks at all: DeepSpeed takes this config and trains with accumulation 1.
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_acumulation_steps": 8}
    deepspeed_parses(config)
    problems = check(TrainConfig(), config, GPU, nproc=2)
    assert [(p.where, p.fix) for p in problems] == \
        [("gradient_acumulation_steps", "did you mean 'gradient_accumulation_steps'?")]


@pytest.mark.parametrize(("kind", "key"), [("WarmupLR", "total_num_steps"), ("OneCycle", "cycle_max_momentum")])
def test_a_scheduler_param_of_the_wrong_type_fails_in_deepspeed_and_is_refused_here(kind: str, key: str) -> None:
    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": OPTIMIZERS["adamw"],
              "scheduler": {"type": kind, "params": {**SCHEDULERS[kind], key: 1}}}
    with pytest.raises(TypeError, match=key):
        deepspeed_builds_optimizer_and_scheduler(config)
    assert [p.where for p in check(TrainConfig(), config, GPU, nproc=2)] == [f"scheduler.params.{key}"]


def test_an_optimizer_param_of_another_optimizer_fails_in_torch_and_is_refused_here() -> None:
    config = {"train_micro_batch_size_per_gpu": 2,
              "optimizer": {"type": "SGD", "params": {"lr": 0.1, "betas": [0.9, 0.99]}}}
    with pytest.raises(TypeError, match="betas"):
        deepspeed_builds_optimizer_and_scheduler(config)
    assert [p.where for p in check(TrainConfig(), config, GPU, nproc=2)] == ["optimizer.params.betas"]


@pytest.mark.parametrize("dotted", ["amp", "elasticity", "zero_optimization.mics_shard_size"])
def test_a_removed_deepspeed_feature_is_refused_with_deepspeeds_reason(dotted: str) -> None:
    # Regression: these keys used to count as accepted (DeepSpeed reads them, but only to refuse).
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}}
    section, _, key = dotted.rpartition(".")
    (config[section] if section else config)[key] = {"enabled": True} if not section else 2
    with pytest.raises(Exception, match="removed") as refused:
        deepspeed_parses(config)
    (problem,) = check(TrainConfig(), config, GPU, nproc=2)
    assert problem.where == dotted
    assert str(refused.value) in problem.rule


def test_free_form_sections_are_not_checked() -> None:
    # A user-named key (e.g. under a section DeepSpeed passes on as a dict) must not be refused.
    schema = load_schema()
    assert schema.allowed("optimizer.params", {"optimizer": {"type": "OneBitAdam"}}) is None
    assert schema.allowed("no.such.section", {}) is None


def test_the_shipped_schema_is_valid_json_with_every_part(tmp_path: Path) -> None:
    data = json.loads(_SHIPPED.read_text())
    assert set(data) == {"version", "children", "scheduler_params", "optimizer_params", "removed", "optimizer_types"}
    assert {"adamw", "lamb", "SGD", "RMSprop"} <= set(data["optimizer_types"])
    assert "zero_optimization" in data["children"][""]
    assert set(data["scheduler_params"]) == set(SCHEDULERS)
