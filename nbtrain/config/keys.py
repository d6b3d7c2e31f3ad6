"""The one table from each `%%bigtrain` flag to the DeepSpeed key it sets, and back.

Rendering (flag → key), the config panel (key → the field that shows it) and the problems
that validation reports (which flag or key a problem is about) all read this table, so a
flag's key is written once (accelerate's `plugin_to_config_mapping` is the model).

>>> [row.key for row in FLAG_KEYS if row.field == "precision"]
['bf16.enabled', 'fp16.enabled']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SCHEDULER_TYPES = {
    "warmup": "WarmupLR", "warmup_decay": "WarmupDecayLR", "warmup_cosine": "WarmupCosineLR",
    "one_cycle": "OneCycle", "lr_range_test": "LRRangeTest",
}
# The schedulers that read warmup_num_steps (--warmup-steps), that end at total_num_steps
# (--steps), and whose peak is warmup_max_lr (--lr).
WARMUP_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
DECAYING_SCHEDULERS = ("WarmupDecayLR", "WarmupCosineLR")
WARMUP_MAX_LR_SCHEDULERS = ("WarmupLR", "WarmupDecayLR")
OPTIMIZER_TYPES = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "lamb": "Lamb"}


def _same(value: Any) -> Any:
    return value


def _always(_: Any) -> bool:
    return True


@dataclass(frozen=True)
class FlagKey:
    """One DeepSpeed key that a flag sets: how the flag's value becomes the key's."""

    field: str  # the TrainConfig field (and the panel's field name)
    flag: str
    key: str  # the dotted DeepSpeed key
    to_key: Callable[[Any], Any] = _same  # the flag's value -> the key's value
    applies: Callable[[Any], bool] = _always  # whether a set flag sets this key at all


FLAG_KEYS: tuple[FlagKey, ...] = (
    FlagKey("zero", "--zero", "zero_optimization.stage"),
    FlagKey("offload_optimizer", "--offload-optimizer", "zero_optimization.offload_optimizer.device"),
    FlagKey("offload_param", "--offload-param", "zero_optimization.offload_param.device"),
    FlagKey("precision", "--precision", "bf16.enabled", lambda p: p == "bf16"),
    FlagKey("precision", "--precision", "fp16.enabled", lambda p: p == "fp16"),
    FlagKey("micro_batch", "--micro-batch", "train_micro_batch_size_per_gpu"),
    FlagKey("grad_accum", "--grad-accum", "gradient_accumulation_steps"),
    FlagKey("grad_clip", "--grad-clip", "gradient_clipping"),
    FlagKey("optimizer", "--optimizer", "optimizer.type", OPTIMIZER_TYPES.__getitem__),
    FlagKey("lr", "--lr", "optimizer.params.lr"),
    FlagKey("weight_decay", "--weight-decay", "optimizer.params.weight_decay"),
    FlagKey("scheduler", "--scheduler", "scheduler.type", SCHEDULER_TYPES.__getitem__, lambda s: s != "none"),
    FlagKey("quant", "--quant", "zero_optimization.zero_quantized_weights", lambda q: "qwz" in q),
    FlagKey("quant", "--quant", "zero_optimization.zero_quantized_gradients", lambda q: "qgz" in q),
    FlagKey("hpz", "--hpz", "zero_optimization.zero_hpz_partition_size"),
)
# --nvme-path sets the path of whichever offload goes to NVMe (see render.flag_settings).
NVME_PATH_KEYS = {"offload_optimizer": "zero_optimization.offload_optimizer.nvme_path",
                  "offload_param": "zero_optimization.offload_param.nvme_path"}


def rows_of(field: str) -> tuple[FlagKey, ...]:
    """Return the rows of one TrainConfig field (precision and quant set two keys each)."""
    return tuple(row for row in FLAG_KEYS if row.field == field)


def key_of(field: str) -> str:
    """Return the DeepSpeed key of a flag that sets exactly one."""
    (row,) = rows_of(field)
    return row.key


def field_of_key() -> dict[str, str]:
    """Return {dotted key: field} for every key a flag sets (the panel shows the key's problems there)."""
    found = {row.key: row.field for row in FLAG_KEYS}
    found |= {key: "nvme_path" for key in NVME_PATH_KEYS.values()}
    found["zero_optimization.zero_quantized_weights"] = "qwz"  # the panel shows --quant as two boxes
    found["zero_optimization.zero_quantized_gradients"] = "qgz"
    return found
