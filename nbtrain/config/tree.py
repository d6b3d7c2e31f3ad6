"""The typed, frozen description of one `%%bigtrain` run.

`TrainConfig` holds what the user asked for and nothing more: a field is `None` when the
user did not set it, so that a DeepSpeed config file keeps its values unless a flag
overrides them (precedence: config file < flags < `--set`). Defaults are applied when the
DeepSpeed dict is rendered (`nbtrain.config.render`), in one place.

Every field maps to the `%%bigtrain` flag of the same name with dashes (`micro_batch` is
`--micro-batch`); its `help` metadata is the flag's help text. This module imports
nothing heavy: it is read by the magic, the config panel, the launcher and the workers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

ZeroStage = Literal[0, 1, 2, 3]
OffloadDevice = Literal["none", "cpu", "nvme"]
Precision = Literal["fp32", "bf16", "fp16"]
OptimizerName = Literal["adamw", "adam", "sgd", "lamb"]
SchedulerName = Literal[
    "none", "warmup", "warmup_decay", "warmup_cosine", "one_cycle", "lr_range_test"
]
Quantization = Literal["none", "qwz", "qgz", "qwz+qgz"]
QatMode = Literal["none", "int8", "int4"]
MultinodeLauncher = Literal["pdsh", "openmpi", "mvapich", "slurm", "standard"]

# Where DeepSpeed has no usable default, these are ours (DESIGN.md, "The %%bigtrain contract").
DEFAULT_OPTIMIZER: OptimizerName = "adamw"
DEFAULT_LR = 1e-3
DEFAULT_WEIGHT_DECAY = 0.0
DEFAULT_GRAD_ACCUM = 1
DEFAULT_SEED = 0
DEFAULT_MICRO_BATCH = 8  # used only when no DataLoader tells us its batch size
DEFAULT_EPOCHS = 1
DEFAULT_CPU_PROCESSES = 2
DEFAULT_RUN_ROOT = "bigtrain-runs"
# A rank that makes no progress this long while its peers wait for it counts as hung.
# Generous: a legitimate step of a big offloaded model can take minutes.
DEFAULT_HANG_TIMEOUT_S = 300.0
# Workers of a successful run stay this long for the next compatible run (`--keep-warm`).
DEFAULT_KEEP_WARM_S = 900.0
# DeepSpeed's own default for warmup_num_steps (deepspeed/runtime/lr_schedules.py).
DEEPSPEED_DEFAULT_WARMUP_STEPS = 1000


def _flag(help: str, default: Any = None, **extra: Any) -> Any:
    """Declare a config field with the help text of its `%%bigtrain` flag."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a `%%bigtrain` cell asked for; `None` means "not set by the user".

    >>> cfg = TrainConfig(zero=3, offload_optimizer="cpu", steps=100)
    >>> cfg.replace(precision="bf16").precision
    'bf16'
    """

    # -- launch shape ------------------------------------------------------------------
    nproc: int | None = _flag(
        "worker processes per host (default: one per visible GPU, else 2 CPU processes)"
    )
    hostfile: str | None = _flag("DeepSpeed hostfile (`host slots=N` lines) for multi-node runs")
    hosts: tuple[str, ...] | None = _flag("comma-separated hosts, shorthand for a hostfile")
    multinode_launcher: MultinodeLauncher | None = _flag(
        "how workers reach other hosts (DeepSpeed's runners; default pdsh); slurm is --slurm"
    )
    # -- SLURM (issue 17): nbtrain-only flags, no DeepSpeed key --------------------------
    slurm: bool = _flag("launch the workers with srun on a SLURM allocation: the kernel's own "
                        "(SLURM_JOB_ID), else one nbtrain requests with salloc", default=False)
    nodes: int | None = _flag("SLURM nodes of the run, --nproc processes on each (default: the "
                              "allocation's node count, else 1; only with --slurm)")
    partition: str | None = _flag("SLURM partition of the allocation nbtrain requests (default: the "
                                  "cluster's default partition; only with --slurm)")
    time_limit: str | None = _flag("time limit of the allocation nbtrain requests, in Slurm's formats "
                                   "M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (only with --slurm)", flag="--time")
    account: str | None = _flag("SLURM account charged for the allocation nbtrain requests "
                                "(only with --slurm)")
    gpus_per_node: int | None = _flag("GPUs per node of the allocation nbtrain requests; checked against "
                                      "the partition's nodes (only with --slurm)")
    # -- ZeRO and offload ---------------------------------------------------------------
    zero: ZeroStage | None = _flag("ZeRO stage: 0 off, 1 optimizer state, 2 +gradients, 3 +parameters")
    offload_optimizer: OffloadDevice | None = _flag("offload optimizer state to cpu or nvme")
    offload_param: OffloadDevice | None = _flag("offload parameters to cpu or nvme (ZeRO-3 only)")
    nvme_path: str | None = _flag("directory for NVMe offload (a fast local disk)")
    # -- numerics -------------------------------------------------------------------------
    precision: Precision | None = _flag("training precision (bf16/fp16 keep fp32 master weights)")
    micro_batch: int | None = _flag(
        "samples per process per forward pass (default: the DataLoader's batch size, else 8)"
    )
    grad_accum: int | None = _flag("micro-batches accumulated per optimizer step (default 1)")
    grad_clip: float | None = _flag("clip the global gradient norm to this value (default: off)")
    optimizer: OptimizerName | None = _flag("optimizer (default adamw)")
    lr: float | None = _flag("peak learning rate, for every scheduler (default 1e-3)")
    weight_decay: float | None = _flag("weight decay (default 0)")
    scheduler: SchedulerName | None = _flag("DeepSpeed LR scheduler (default none: constant LR)")
    warmup_steps: int | None = _flag("warm-up steps of the warmup* schedulers (DeepSpeed's default 1000)")
    # -- length ---------------------------------------------------------------------------
    steps: int | None = _flag("stop after this many optimizer steps")
    epochs: int | None = _flag("passes over the data when --steps is not given (default 1)")
    seed: int | None = _flag("seed for model init, data order and dropout (default 0)")
    # -- quantization -------------------------------------------------------------------
    quant: Quantization | None = _flag("ZeRO++ quantized weights (qwz) / gradients (qgz); CUDA only")
    hpz: int | None = _flag("ZeRO++ hierarchical partition size (ZeRO-3)")
    qat: QatMode | None = _flag("quantization-aware training through torchao")
    # -- DeepSpeed config sources ---------------------------------------------------------
    config: str | None = _flag("DeepSpeed JSON file, or the name of a dict/ConfigPanel variable")
    set: tuple[str, ...] = _flag(
        "dotted.key=value for any DeepSpeed key (repeatable; wins over flags and file)", default=()
    )
    # -- run bookkeeping ------------------------------------------------------------------
    name: str | None = _flag("run name, part of the run id")
    run_dir: str | None = _flag(f"root folder of run directories (default ./{DEFAULT_RUN_ROOT})")
    out: tuple[str, ...] = _flag("names whose rank-0 values are bound in the notebook", default=())
    background: bool = _flag("return at once with a handle; training continues", default=False)
    no_plot: bool = _flag("no live dashboard, only the progress line", default=False)
    checkpoint_every: int | None = _flag("save a DeepSpeed checkpoint every N steps")
    resume: str | None = _flag("resume from a run id, or 'latest'")
    hang_timeout: float | None = _flag(
        f"seconds a rank may make no progress while the others wait for it before the run is "
        f"stopped as hung (default {DEFAULT_HANG_TIMEOUT_S:.0f})"
    )
    cold: bool = _flag("start this run on fresh worker processes, not the warm ones of an earlier run",
                       default=False)
    keep_warm: float | None = _flag(
        f"seconds the workers stay warm for the next compatible run once this one succeeds "
        f"(default {DEFAULT_KEEP_WARM_S:.0f}; 0 ends them with the run)"
    )
    dry_run: bool = _flag("print the resolved DeepSpeed JSON and memory estimate; start nothing", default=False)

    def __post_init__(self) -> None:
        # `--multinode-launcher slurm` is the long form of `--slurm`: one field for the launcher to read.
        if self.multinode_launcher == "slurm" and not self.slurm:
            object.__setattr__(self, "slurm", True)

    def replace(self, **changes: Any) -> TrainConfig:
        """Return a copy with `changes` applied (the config itself is frozen)."""
        return dataclasses.replace(self, **changes)

    def given(self) -> dict[str, Any]:
        """Return the fields the user set, by name."""
        # Not `in (None, (), False)`: 0 == False, and `--zero 0` is a choice the user made.
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None and getattr(self, f.name) is not False
            and getattr(self, f.name) != ()
        }


def config_fields() -> tuple[dataclasses.Field[Any], ...]:
    """Return TrainConfig's fields, in flag order."""
    return dataclasses.fields(TrainConfig)


def flag_name(field_name: str) -> str:
    """Return the `%%bigtrain` flag for a TrainConfig field (`micro_batch` -> `--micro-batch`).

    A field may name its flag otherwise (`time_limit` is Slurm's `--time`).
    """
    named = {f.name: f.metadata.get("flag") for f in dataclasses.fields(TrainConfig)}.get(field_name)
    return named or "--" + field_name.replace("_", "-")


def choices_of(annotation: Any) -> tuple[Any, ...] | None:
    """Return the Literal choices of a field annotation (string or type), or None."""
    names = {
        "ZeroStage": ZeroStage, "OffloadDevice": OffloadDevice, "Precision": Precision,
        "OptimizerName": OptimizerName, "SchedulerName": SchedulerName,
        "Quantization": Quantization, "QatMode": QatMode, "MultinodeLauncher": MultinodeLauncher,
    }
    if isinstance(annotation, str):
        head = annotation.split("|")[0].strip()
        annotation = names.get(head)
    return get_args(annotation) or None


def freeze_mapping(value: Mapping[str, Any]) -> dict[str, Any]:
    """Return a deep copy of a JSON-like mapping as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): freeze_mapping(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [freeze_mapping(v) for v in value]
    return value
