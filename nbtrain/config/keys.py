"""The one table from each `%%bigtrain` flag to the DeepSpeed key it sets, and back.

Rendering (flag → key), the config panel (key → the field that shows it) and the problems
that validation reports (which flag or key a problem is about) all read this table, so a
flag's key is written once (accelerate's `plugin_to_config_mapping` is the model).

>>> [row.key for row in FLAG_KEYS if row.field == "precision"]
['bf16.enabled', 'fp16.enabled']
"""

from __future__ import annotations

import re
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
# --warmup-steps sets this parameter of the warm-up schedulers (see render._scheduler_flag_settings).
WARMUP_STEPS_KEY = "scheduler.params.warmup_num_steps"


def rows_of(field: str) -> tuple[FlagKey, ...]:
    """Return the rows of one TrainConfig field (precision and quant set two keys each)."""
    return tuple(row for row in FLAG_KEYS if row.field == field)


def key_of(field: str) -> str:
    """Return the DeepSpeed key of a flag that sets exactly one."""
    (row,) = rows_of(field)
    return row.key


def named(cfg: Any, field: str) -> str:
    """Return what a problem with a one-key flag's setting names: the flag when the user set it, else its key."""
    (row,) = rows_of(field)
    return row.flag if getattr(cfg, field) is not None else row.key


def field_of_key() -> dict[str, str]:
    """Return {dotted key: field} for every key a flag sets (the panel shows the key's problems there)."""
    found = {row.key: row.field for row in FLAG_KEYS}
    found |= {key: "nvme_path" for key in NVME_PATH_KEYS.values()}
    found["zero_optimization.zero_quantized_weights"] = "qwz"  # the panel shows --quant as two boxes
    found["zero_optimization.zero_quantized_gradients"] = "qgz"
    # Keys the panel has no field for show next to the field they follow.
    found |= {"train_batch_size": "micro_batch", "scheduler.params": "scheduler"}
    return found


def keys_of_flag(flag: str) -> tuple[str, ...]:
    """Return every DeepSpeed key `flag` sets (none for a flag such as --nproc that sets no key)."""
    beyond_the_table = {"--nvme-path": tuple(NVME_PATH_KEYS.values()), "--warmup-steps": (WARMUP_STEPS_KEY,)}
    return beyond_the_table.get(flag) or tuple(row.key for row in FLAG_KEYS if row.flag == flag)


_DOTTED_KEY = re.compile(r"[A-Za-z_]\w*(?:\.\w+)*")


def locate(where: str) -> tuple[str | None, tuple[str, ...]]:
    """Return the flag and the DeepSpeed keys that a problem's `where` names (`errors.Problem` fills its fields so).

    `where` is a flag (`--zero`: its keys from the table), a dotted key, `--set key`, a flag
    and a place (`--hostfile hosts:3`), or flags and keys joined by `/` for a problem about
    several (`bf16.enabled/fp16.enabled`); anything else (`host gpu01`, `%%bigtrain`) names neither.

    >>> locate("--set zero_optimization.stage")
    ('--set', ('zero_optimization.stage',))
    """
    head, _, place = where.partition(" ")
    if head.startswith("--") and place:
        return head, (place,) if head == "--set" and _DOTTED_KEY.fullmatch(place) else keys_of_flag(head)
    parts = where.split("/")
    flags = [part for part in parts if part.startswith("--")]
    keys = [key for part in parts for key in _keys_named(part)]
    return (flags[0] if len(flags) == 1 else None), tuple(dict.fromkeys(keys))


def _keys_named(part: str) -> tuple[str, ...]:
    if part.startswith("--"):
        return keys_of_flag(part)
    return (part,) if _DOTTED_KEY.fullmatch(part) else ()
