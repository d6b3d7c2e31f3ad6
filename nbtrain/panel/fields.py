"""What the config panel shows: every field, its DeepSpeed key or flag, its kind and help.

Pure data, no widgets: `nbtrain.panel.form` maps field values to a TrainConfig with it, and
`nbtrain.panel.widgets` draws it. Flag fields are TrainConfig fields (so the copied
`%%bigtrain` line uses the real flags); every other field is a dotted DeepSpeed key that
the panel writes with `--set`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

from nbtrain.config.keys import field_of_key
from nbtrain.config.tree import config_fields, flag_name
from nbtrain.errors import Problem

Kind = Literal["int", "float", "bool", "text", "choice", "pair", "optional_int"]


@dataclass(frozen=True)
class Field:
    """One input of the panel."""

    name: str  # a TrainConfig field (flag) or a dotted DeepSpeed key
    label: str
    kind: Kind
    section: str
    help: str = ""
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    default: Any = None  # shown (and compared against) when the DeepSpeed dict lacks the key

    @property
    def is_flag(self) -> bool:
        return "." not in self.name and self.name not in ("qwz", "qgz")


STAGE_HELP = {
    0: "ZeRO off: every process holds all parameters, gradients and optimizer state (plain data parallel).",
    1: "Stage 1 partitions the optimizer state across processes.",
    2: "Stage 2 partitions the optimizer state and the gradients.",
    3: "Stage 3 partitions optimizer state, gradients and the parameters themselves (needed for param offload).",
}

OFFLOAD = ("none", "cpu", "nvme")
ZERO = "zero_optimization"
FP16 = "fp16"

_RUN = [
    Field("nproc", "processes", "int", "Run", "worker processes (the global batch and memory depend on it)", minimum=1),
    Field("steps", "steps", "int", "Run", "optimizer steps of the run (the LR schedule's length)", minimum=1),
]
_ZERO = [
    Field("zero", "ZeRO stage", "choice", "ZeRO", "what each process keeps a slice of", choices=(0, 1, 2, 3)),
    Field("offload_optimizer", "offload optimizer", "choice", "ZeRO", "move optimizer state off the device",
          choices=OFFLOAD),
    Field("offload_param", "offload parameters", "choice", "ZeRO", "move parameters off the device (ZeRO-3)",
          choices=OFFLOAD),
    Field("nvme_path", "NVMe path", "text", "ZeRO", "a directory on a fast local disk", default=""),
    Field(f"{ZERO}.offload_optimizer.pin_memory", "pin memory (optimizer)", "bool", "ZeRO",
          "page-locked host memory: faster copies, more host RAM", default=False),
    Field(f"{ZERO}.offload_param.pin_memory", "pin memory (parameters)", "bool", "ZeRO",
          "page-locked host memory: faster copies, more host RAM", default=False),
]
_PRECISION = [
    Field("precision", "precision", "choice", "Precision", "bf16/fp16 keep fp32 master weights",
          choices=("fp32", "bf16", "fp16")),
    Field(f"{FP16}.loss_scale", "loss scale", "float", "Precision", "0 = dynamic loss scaling", minimum=0, default=0.0),
    Field(f"{FP16}.initial_scale_power", "initial scale power", "int", "Precision",
          "dynamic scaling starts at 2**power", minimum=0, default=16),
    Field(f"{FP16}.loss_scale_window", "loss scale window", "int", "Precision",
          "steps without overflow before the scale grows", minimum=1, default=1000),
    Field(f"{FP16}.hysteresis", "hysteresis", "int", "Precision", "overflows tolerated before the scale shrinks",
          minimum=1, default=2),
    Field(f"{FP16}.min_loss_scale", "min loss scale", "float", "Precision", "the scale never goes below this",
          minimum=0, default=1.0),
]
_BATCH = [
    Field("micro_batch", "micro-batch", "int", "Batch", "samples per process per forward pass", minimum=1),
    Field("grad_accum", "grad accumulation", "int", "Batch", "micro-batches per optimizer step", minimum=1),
    Field("grad_clip", "gradient clipping", "float", "Batch", "clip the global gradient norm (0 = off)", minimum=0),
]
_OPTIMIZER = [
    Field("optimizer", "optimizer", "choice", "Optimizer", "", choices=("adamw", "adam", "sgd", "lamb")),
    Field("lr", "learning rate", "float", "Optimizer", "the peak LR of every schedule", minimum=0),
    Field("weight_decay", "weight decay", "float", "Optimizer", "", minimum=0),
    Field("optimizer.params.betas", "betas", "pair", "Optimizer", "Adam's moment decay rates", default=[0.9, 0.999]),
    Field("optimizer.params.eps", "eps", "float", "Optimizer", "Adam's denominator term", minimum=0, default=1e-8),
    Field("optimizer.params.momentum", "momentum", "float", "Optimizer", "SGD momentum", minimum=0, default=0.0),
]
_SCHEDULER = [
    Field("scheduler", "scheduler", "choice", "LR schedule", "DeepSpeed LR scheduler (none: constant LR)",
          choices=("none", "warmup", "warmup_decay", "warmup_cosine", "one_cycle", "lr_range_test")),
]
_QUANT = [
    Field("qwz", "ZeRO++ quantized weights (qwZ)", "bool", "Quantization", "int8 weights in all-gathers",
          default=False),
    Field("qgz", "ZeRO++ quantized gradients (qgZ)", "bool", "Quantization", "int4 gradients in reduce-scatter",
          default=False),
    Field("hpz", "ZeRO++ hpZ partition size", "int", "Quantization",
          "keep a secondary weight copy per group of this many processes (1 = off)", minimum=1),
    Field("qat", "quantization-aware training", "choice", "Quantization", "through torchao",
          choices=("none", "int8", "int4")),
]
_ADVANCED = [
    Field(f"{ZERO}.overlap_comm", "overlap communication", "bool", "Advanced",
          "overlap gradient reduction with the backward pass (DeepSpeed: on at stage 3)"),
    Field(f"{ZERO}.contiguous_gradients", "contiguous gradients", "bool", "Advanced",
          "copy gradients into one buffer as they are produced", default=True),
    Field(f"{ZERO}.reduce_bucket_size", "reduce bucket size", "int", "Advanced", "elements reduced at once",
          minimum=1, default=500_000_000),
    Field(f"{ZERO}.allgather_bucket_size", "all-gather bucket size", "int", "Advanced",
          "elements all-gathered at once (stages 1-2)", minimum=1, default=500_000_000),
    Field(f"{ZERO}.stage3_prefetch_bucket_size", "prefetch bucket size", "int", "Advanced",
          "parameter elements fetched ahead of use (stage 3)", minimum=0, default=50_000_000),
    Field(f"{ZERO}.stage3_param_persistence_threshold", "persistence threshold", "int", "Advanced",
          "parameters smaller than this stay unpartitioned (stage 3)", minimum=0, default=100_000),
    Field(f"{ZERO}.stage3_max_live_parameters", "max live parameters", "int", "Advanced",
          "parameter elements resident at once before release (stage 3)", minimum=0, default=1_000_000_000),
    Field(f"{ZERO}.stage3_max_reuse_distance", "max reuse distance", "int", "Advanced",
          "keep a parameter if it is reused within this many elements (stage 3)", minimum=0,
          default=1_000_000_000),
]

# The parameters of each DeepSpeed scheduler, as its class takes them (tests compare this with
# DeepSpeed's signatures). Defaults are DeepSpeed's; None means "the value render() derives".
_SCHEDULER_PARAMS: dict[str, list[tuple[str, Kind, Any]]] = {
    "WarmupLR": [("warmup_min_lr", "float", 0.0), ("warmup_max_lr", "float", None),
                 ("warmup_num_steps", "int", 1000), ("warmup_type", "choice", "log")],
    "WarmupDecayLR": [("warmup_min_lr", "float", 0.0), ("warmup_max_lr", "float", 0.001),
                      ("warmup_num_steps", "int", 1000), ("warmup_type", "choice", "log"),
                      ("total_num_steps", "int", None)],
    "WarmupCosineLR": [("warmup_min_ratio", "float", 0.0), ("warmup_num_steps", "int", 1000),
                       ("cos_min_ratio", "float", 0.0001), ("warmup_type", "choice", "log"),
                       ("total_num_steps", "int", None)],
    "OneCycle": [("cycle_min_lr", "float", None), ("cycle_max_lr", "float", None),
                 ("cycle_first_step_size", "int", 2000), ("cycle_second_step_size", "optional_int", None),
                 ("cycle_first_stair_count", "int", 0), ("cycle_second_stair_count", "optional_int", None),
                 ("decay_lr_rate", "float", 0.0), ("decay_step_size", "int", 0),
                 ("cycle_momentum", "bool", True), ("cycle_min_mom", "float", 0.8),
                 ("cycle_max_mom", "float", 0.9), ("decay_mom_rate", "float", 0.0)],
    "LRRangeTest": [("lr_range_test_min_lr", "float", 0.001), ("lr_range_test_step_size", "int", 2000),
                    ("lr_range_test_step_rate", "float", 1.0), ("lr_range_test_staircase", "bool", False)],
}
_PARAM_HELP = {
    "warmup_num_steps": "steps from the minimum to the peak", "warmup_type": "log or linear warm-up",
    "total_num_steps": "the step where the decay ends", "cos_min_ratio": "final LR as a fraction of the peak",
    "warmup_min_ratio": "first LR as a fraction of the peak", "cycle_second_step_size": "empty: same as the first",
    "cycle_second_stair_count": "empty: same as the first", "decay_step_size": "0 = no decay after the cycle",
    "lr_range_test_step_rate": "LR grows by min_lr x rate per step_size steps",
}


@functools.cache
def scheduler_param_fields() -> dict[str, list[Field]]:
    """Return the panel fields of each DeepSpeed scheduler's parameters, by class name."""
    out: dict[str, list[Field]] = {}
    for kind, params in _SCHEDULER_PARAMS.items():
        out[kind] = [
            Field(f"scheduler.params.{name}", name, param_kind, "LR schedule", _PARAM_HELP.get(name, ""),
                  choices=("log", "linear") if param_kind == "choice" else (),
                  minimum=None if param_kind in ("bool", "choice", "optional_int") else 0, default=default)
            for name, param_kind, default in params
        ]
    return out


@functools.cache
def all_fields() -> tuple[Field, ...]:
    """Return every field of the panel, scheduler parameters of every type included, in display order."""
    fields = _RUN + _ZERO + _PRECISION + _BATCH + _OPTIMIZER + _SCHEDULER
    names = {f.name for f in fields}
    for params in scheduler_param_fields().values():
        for f in params:
            if f.name not in names:  # the warm-up schedulers share their parameter names
                names.add(f.name)
                fields.append(f)
    return tuple(fields + _QUANT + _ADVANCED)


@functools.cache
def field_by_name() -> dict[str, Field]:
    """Return every field keyed by name (one shared dict: read it, do not change it)."""
    return {f.name: f for f in all_fields()}


SECTIONS = ("Run", "ZeRO", "Precision", "Batch", "Optimizer", "LR schedule", "Quantization", "Advanced")


def fields_of(problem: Problem) -> tuple[str, ...]:
    """Return the fields that show `problem` inline: those of each of its keys, and its flag's.

    Read from the problem's `keys` and `flag` (config/keys.py maps a key to its flag's field),
    never from the text it names (`where`), which is for people.
    """
    names = [_field_of_key().get(key, key) for key in problem.keys]
    names.append(_field_of_flag().get(problem.flag or "", ""))
    return tuple(name for name in dict.fromkeys(names) if name in field_by_name())


@functools.cache
def _field_of_key() -> dict[str, str]:
    return field_of_key()


@functools.cache
def _field_of_flag() -> dict[str, str]:
    return {flag_name(f.name): f.name for f in config_fields()}
