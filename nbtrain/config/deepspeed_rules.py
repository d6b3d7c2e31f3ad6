"""DeepSpeed's own cross-key rules, checked before anything starts.

DeepSpeed asserts these at `deepspeed.initialize`, in every worker, after the processes,
the imports and the model have cost their seconds, and says it in its own words
(`assert train_batch == micro_batch * grad_acc * self.world_size`). nbtrain checks the
rendered dict first and names the flag or key, the value, the rule and the fix. Each rule
names the DeepSpeed 0.19 check it mirrors; docs/validation.md lists them, and the ones left
to DeepSpeed with the reason.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from nbtrain.config.keys import WARMUP_SCHEDULERS, named
from nbtrain.config.render import FROM_DATALOADER, ZERO_TESTED_OPTIMIZERS, get_path
from nbtrain.config.schema import DeepSpeedSchema
from nbtrain.config.tree import TrainConfig
from nbtrain.errors import Problem

MICRO, ACCUM, GLOBAL = "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"
WARMUP_TYPES = ("log", "linear")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_rules(cfg: TrainConfig, ds: Mapping[str, Any], schema: DeepSpeedSchema) -> list[Problem]:
    """Return the problems DeepSpeed would assert at initialize, other than the batch rule."""
    return _precision(ds) + _zero(cfg, ds) + _optimizer(cfg, ds, schema) + _scheduler(cfg, ds)


# -- the batch rule (config.py _set_batch_related_parameters, _batch_assertion) ----------------

def check_batch(cfg: TrainConfig, ds: Mapping[str, Any], nproc: int, hosts: int = 0) -> list[Problem]:
    """Refuse batch sizes that break train_batch_size = micro-batch x grad-accum x world size.

    DeepSpeed derives a missing one of the three with integer division and then asserts the
    equality, so two given values must divide; `hosts` is the host count of a multi-node run.
    """
    world = nproc * max(1, hosts)
    total: Any = ds.get(GLOBAL)
    micro: Any = ds.get(MICRO)
    accum: Any = ds.get(ACCUM)
    if not _whole(total) or total <= 0 or not _whole(world) or world <= 0:
        return []  # no global batch: DeepSpeed derives it; bad values are _positive's to report
    if micro == FROM_DATALOADER or any(v is not None and (not _whole(v) or v <= 0) for v in (micro, accum)):
        return []
    names = _BatchNames(cfg, nproc, hosts)
    if micro is not None and accum is not None:
        if total == micro * accum * world:
            return []
        rule = (f"DeepSpeed needs {GLOBAL} = micro-batch x grad-accum x world size, but {micro} x {accum} x "
                f"{world} = {micro * accum * world} ({names.world})")
    elif micro is not None:
        if total % (micro * world) == 0:
            return []
        rule = (f"DeepSpeed derives {ACCUM} = {GLOBAL} / (micro-batch x world size) = {total} / ({micro} x {world}), "
                f"which is not a whole number of at least 1 ({names.world})")
    elif accum is not None:
        if total % (accum * world) == 0:
            return []
        rule = (f"DeepSpeed derives {MICRO} = {GLOBAL} / (grad-accum x world size) = {total} / ({accum} x {world}), "
                f"which is not a whole number of at least 1 ({names.world})")
    else:
        if total % world == 0:
            return []
        rule = (f"DeepSpeed derives {MICRO} = {GLOBAL} / world size = {total} / {world} (with grad-accum 1), "
                f"which is not a whole number of at least 1 ({names.world})")
    return [Problem(GLOBAL, total, rule, _batch_fix(total, micro, accum, world, names))]


class _BatchNames:
    """How the batch message names each value: the flag the user gave, else the DeepSpeed key."""

    def __init__(self, cfg: TrainConfig, nproc: int, hosts: int):
        self.micro = "--micro-batch " if cfg.micro_batch is not None else f"{MICRO}="
        self.accum = "--grad-accum " if cfg.grad_accum is not None else f"{ACCUM}="
        self.hosts = hosts
        shape = f"--nproc {nproc} on each of {hosts} hosts" if hosts else f"--nproc {nproc}"
        self.world = f"world size {nproc * max(1, hosts)}: {shape}"


def _batch_fix(total: int, micro: int | None, accum: int | None, world: int, names: _BatchNames) -> str:
    """Say which values would work: another global batch, or a micro-batch/grad-accum/nproc that reaches it."""
    fixes = []
    if micro is not None and accum is not None:
        fixes.append(f"set {GLOBAL}={micro * accum * world} (or drop it: DeepSpeed derives it)")
    elif micro is not None:
        fixes.append(f"set {GLOBAL} to a multiple of {micro * world}, e.g. {micro * world * max(1, total // (micro * world))}")
    else:
        step = (accum or 1) * world
        fixes.append(f"set {GLOBAL} to a multiple of {step}, e.g. {step * max(1, total // step)}")
    if total % world:
        fixes.append(f"{total} is not a multiple of the world size {world}, so no micro-batch and grad-accum reach it")
    else:
        per_rank = total // world
        if accum is not None and per_rank % accum == 0:
            fixes.append(f"keep it with {names.micro}{per_rank // accum}")
        if micro is not None and per_rank % micro == 0:
            fixes.append(f"keep it with {names.accum}{per_rank // micro}")
    each = (micro or 1) * (accum or 1)
    if not names.hosts and total % each == 0 and total // each != world and micro is not None:
        fixes.append(f"keep it with --nproc {total // each}")
    return "; ".join(fixes)


# -- precision (precision_config.py validators, config.py _do_error_check) --------------------

def _precision(ds: Mapping[str, Any]) -> list[Problem]:
    found: list[Problem] = []
    stage = get_path(ds, "zero_optimization.stage", 0)
    for key, name in (("fp16.fp16_master_weights_and_grads", "fp16 master weights and gradients"),
                      ("bf16.bf16_master_weights_and_grads", "bf16 master weights and gradients"),
                      ("bf16.bf16_optimizer_states", "bf16 optimizer states")):
        if get_path(ds, key) is True and stage not in (1, 2, 3):
            found.append(Problem(key, True, f"DeepSpeed keeps {name} only in its ZeRO optimizer (stage 1, 2 or 3; "
                                 f"stage is {stage})", f"add --zero 1 (or 2, 3), or drop {key}"))
    if get_path(ds, "bf16.bf16_optimizer_states") is True and get_path(ds, "bf16.bf16_master_weights_and_grads") \
            is not True:
        found.append(Problem("bf16.bf16_optimizer_states", True, "bf16 optimizer states need bf16 master weights",
                             "add --set bf16.bf16_master_weights_and_grads=true, or drop bf16_optimizer_states"))
    return found + _loss_scaling(ds)


def _loss_scaling(ds: Mapping[str, Any]) -> list[Problem]:
    scale = get_path(ds, "fp16.loss_scale", 0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
        return [Problem("fp16.loss_scale", scale, "the fp16 loss scale must be a number of 0 or more "
                        "(0 means dynamic loss scaling)", "give fp16.loss_scale 0 (dynamic) or a positive scale")]
    found: list[Problem] = []
    if get_path(ds, "fp16.enabled") is True and scale == 0:
        # Dynamic scaling divides by loss_scale_window and must never fall to a zero scale.
        for key, default in (("loss_scale_window", 1000), ("min_loss_scale", 1)):
            value = get_path(ds, f"fp16.{key}", default)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
                found.append(Problem(f"fp16.{key}", value, f"dynamic loss scaling (loss_scale 0) needs {key} > 0",
                                     f"give fp16.{key} a value above 0 (DeepSpeed's default: {default})"))
    return found


# -- ZeRO (zero/config.py validators, config.py _do_error_check) ------------------------------

def _zero(cfg: TrainConfig, ds: Mapping[str, Any]) -> list[Problem]:
    found: list[Problem] = []
    stage = get_path(ds, "zero_optimization.stage", 0)
    stage_where = named(cfg, "zero")
    if get_path(ds, "zero_optimization.compute_grad_norm") is False and stage not in (1, 2):
        found.append(Problem("zero_optimization.compute_grad_norm", False,
                             f"skipping the gradient norm works only at ZeRO stage 1 or 2 (stage is {stage})",
                             f"drop zero_optimization.compute_grad_norm, or change {stage_where} to 1 or 2"))
    ratio = get_path(ds, "zero_optimization.offload_optimizer.ratio")
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and ratio < 1 and stage != 3:
        found.append(Problem("zero_optimization.offload_optimizer.ratio", ratio,
                             f"partial optimizer offload (ratio below 1) needs ZeRO stage 3 (stage is {stage})",
                             "add --zero 3, or drop zero_optimization.offload_optimizer.ratio"))
    op = ds.get("gradient_allreduce_op", "mean")
    if str(op).lower() not in ("mean", "sum"):
        found.append(Problem("gradient_allreduce_op", op, "DeepSpeed reduces gradients by 'mean' or 'sum' only",
                             "use gradient_allreduce_op=mean (the default) or sum"))
    elif str(op).lower() == "sum" and stage == 3:
        found.append(Problem("gradient_allreduce_op", op, "DeepSpeed does not support summed gradients with ZeRO "
                             "stage 3", f"drop gradient_allreduce_op (mean), or change {stage_where} to 0, 1 or 2"))
    return found


# -- the optimizer (engine.py _configure_basic_optimizer, _do_optimizer_sanity_check) ---------

def _optimizer(cfg: TrainConfig, ds: Mapping[str, Any], schema: DeepSpeedSchema) -> list[Problem]:
    found: list[Problem] = []
    given = get_path(ds, "optimizer.type")
    if isinstance(given, str) and not schema.builds_optimizer(given):
        # Compared in lower case (DeepSpeed's names match in any case); torch's named as torch spells them.
        spelled = {name.lower(): name for name in sorted(schema.optimizer_types, key=str.islower)}
        close = difflib.get_close_matches(given.lower(), spelled, n=1, cutoff=0.7)
        found.append(Problem(named(cfg, "optimizer"), given,
                             f"DeepSpeed {schema.version} builds its own optimizers (adam, adamw, lamb, lion, ...; "
                             "any case) or a torch.optim class of exactly that name, and this is neither",
                             f"did you mean {spelled[close[0]]!r}?" if close else "use --optimizer adamw (or adam, sgd)"))
    params = get_path(ds, "optimizer.params", {})
    if isinstance(params, Mapping) and "max_grad_norm" in params:
        found.append(Problem("optimizer.params.max_grad_norm", params["max_grad_norm"],
                             "DeepSpeed refuses max_grad_norm as an optimizer parameter",
                             f"use --grad-clip {params['max_grad_norm']} (gradient_clipping) instead"))
    kind = str(get_path(ds, "optimizer.type", "")).lower()
    stage = get_path(ds, "zero_optimization.stage", 0)
    allowed = ds.get("zero_allow_untested_optimizer") is True
    if kind and kind not in ZERO_TESTED_OPTIMIZERS and isinstance(stage, int) and stage > 0 and not allowed:
        found.append(Problem(named(cfg, "optimizer"), get_path(ds, "optimizer.type"),
                             f"DeepSpeed runs ZeRO (stage {stage}) only with its tested optimizers "
                             f"({', '.join(ZERO_TESTED_OPTIMIZERS)}) unless zero_allow_untested_optimizer is true",
                             "drop zero_allow_untested_optimizer=false (nbtrain then allows it), or use --optimizer "
                             "adamw"))
    return found


# -- the LR scheduler (lr_schedules.py constructors) -------------------------------------------

def _scheduler(cfg: TrainConfig, ds: Mapping[str, Any]) -> list[Problem]:
    kind = get_path(ds, "scheduler.type")
    params = get_path(ds, "scheduler.params", {})
    if not isinstance(params, Mapping):
        return []
    found: list[Problem] = []

    def positive(name: str, default: Any) -> None:
        value = params.get(name, default)
        if value != FROM_DATALOADER and (not _whole(value) or value <= 0):
            found.append(Problem(f"scheduler.params.{name}", value, f"{kind} needs {name} to be a whole number "
                                 "greater than 0", f"give scheduler.params.{name} a value of 1 or more"))

    if kind in WARMUP_SCHEDULERS:
        if cfg.warmup_steps is None:  # --warmup-steps has its own check
            positive("warmup_num_steps", 1000)
        kind_of_warmup = params.get("warmup_type", "log")
        if kind_of_warmup not in WARMUP_TYPES:
            found.append(Problem("scheduler.params.warmup_type", kind_of_warmup,
                                 "DeepSpeed warms up 'log' or 'linear' only (it would silently use log)",
                                 "give warmup_type 'log' or 'linear'"))
    if kind == "LRRangeTest":
        positive("lr_range_test_step_size", 2000)
    if kind == "OneCycle":
        first, second = params.get("cycle_first_step_size", 2000), params.get("cycle_second_step_size")
        if isinstance(first, (int, float)) and not isinstance(first, bool) and first <= 0:
            found.append(Problem("scheduler.params.cycle_first_step_size", first, "OneCycle's first half must "
                                 "last more than 0 steps", "give cycle_first_step_size a value of 1 or more"))
        if isinstance(second, (int, float)) and not isinstance(second, bool) and second < 0:
            found.append(Problem("scheduler.params.cycle_second_step_size", second, "OneCycle's second half cannot "
                                 "be negative", "give cycle_second_step_size 0 or more (empty: as the first)"))
    return found
