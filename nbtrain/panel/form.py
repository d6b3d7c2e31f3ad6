"""Map the panel's field values to a TrainConfig and back, without any widget.

The panel's state is a base DeepSpeed dict (from `config=`) plus the values of its fields.
A field becomes a flag or a `--set` only when its value differs from what the base already
renders to; `changed_dict` then writes into the loaded dict exactly the keys whose rendered
value the form changed, so a loaded config comes back out equal to itself (keys the form does
not show included, keys it did not have still absent). `values_from` reads field values out
of a rendered DeepSpeed dict.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from nbtrain.config.keys import (
    NVME_PATH_KEYS,
    SCHEDULER_TYPES,
    WARMUP_SCHEDULERS,
    WARMUP_STEPS_KEY,
    key_of,
    rows_of,
)
from nbtrain.config.machine import MachineFacts
from nbtrain.config.render import get_path, render, set_path
from nbtrain.config.schema import load_schema
from nbtrain.config.tree import DEFAULT_MICRO_BATCH, TrainConfig
from nbtrain.panel.fields import _SCHEDULER_PARAMS, field_by_name, scheduler_param_fields

FLAG_FIELDS = ("zero", "offload_optimizer", "offload_param", "precision", "micro_batch", "grad_accum", "grad_clip",
               "optimizer", "lr", "weight_decay", "scheduler", "hpz", "qat")
_SCHEDULER_NAMES = {v: k for k, v in SCHEDULER_TYPES.items()}
# Scheduler parameters that flags set (render() makes --steps the decay's end and --lr the
# peak): the form shows them but they follow the step count and the learning rate.
_MISSING = object()
DERIVED = {"scheduler.params.total_num_steps": "steps", "scheduler.params.warmup_max_lr": "lr",
           "scheduler.params.cycle_max_lr": "lr"}


def values_from(ds: Mapping[str, Any]) -> dict[str, Any]:
    """Return every field's value as the DeepSpeed dict `ds` has it (None where it has none)."""
    # The flags' fields, read back through the keys they set (config/keys.py).
    quant_weights, quant_gradients = (row.key for row in rows_of("quant"))
    values: dict[str, Any] = {
        "zero": get_path(ds, key_of("zero"), 0),
        "offload_optimizer": get_path(ds, key_of("offload_optimizer"), "none"),
        "offload_param": get_path(ds, key_of("offload_param"), "none"),
        "nvme_path": (get_path(ds, NVME_PATH_KEYS["offload_optimizer"])
                      or get_path(ds, NVME_PATH_KEYS["offload_param"]) or ""),
        "precision": next((row.key.split(".")[0] for row in rows_of("precision") if get_path(ds, row.key) is True),
                          "fp32"),
        "micro_batch": _whole(get_path(ds, key_of("micro_batch"))),
        "grad_accum": get_path(ds, key_of("grad_accum")),
        "grad_clip": float(get_path(ds, key_of("grad_clip")) or 0.0),
        "optimizer": str(get_path(ds, key_of("optimizer"), "adamw")).lower(),
        "lr": get_path(ds, key_of("lr")),
        "weight_decay": get_path(ds, key_of("weight_decay")),
        "scheduler": _SCHEDULER_NAMES.get(str(get_path(ds, key_of("scheduler"))), "none"),
        "qwz": get_path(ds, quant_weights, False) is True,
        "qgz": get_path(ds, quant_gradients, False) is True,
        "hpz": get_path(ds, key_of("hpz"), 1),
        "qat": "none",
    }
    kind = get_path(ds, "scheduler.type")
    for f in field_by_name().values():
        if f.is_flag or f.name in values:
            continue
        values[f.name] = get_path(ds, f.name, default_of(f.name, ds, kind))
        if f.kind == "int" and isinstance(values[f.name], float) and values[f.name].is_integer():
            values[f.name] = int(values[f.name])  # JSON's 1e9 is a float; DeepSpeed reads it as a count
    if isinstance(values["optimizer.params.betas"], (list, tuple)):
        values["optimizer.params.betas"] = [float(b) for b in values["optimizer.params.betas"]]
    return values


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def default_of(name: str, ds: Mapping[str, Any], scheduler: Any) -> Any:
    """Return what DeepSpeed uses for a `--set` field that `ds` does not give."""
    if name == "zero_optimization.overlap_comm":
        # DeepSpeed turns overlap_comm on by default at stage 3 only (DeepSpeedZeroConfig).
        return get_path(ds, "zero_optimization.stage", 0) == 3
    if name.startswith("scheduler.params."):
        param = name.rsplit(".", 1)[1]
        for p, _, default in _SCHEDULER_PARAMS.get(str(scheduler), []):
            if p == param:
                return default
    return field_by_name()[name].default


@dataclass(frozen=True)
class FormResult:
    """The TrainConfig a form produces, the base it applies to, and notes on what was dropped."""

    config: TrainConfig  # flags and --set of the form, config=None
    base: dict[str, Any]  # the loaded dict minus what the form replaced
    notes: tuple[str, ...] = ()


def prune_base(base: Mapping[str, Any], values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Drop base sections that another choice in the form made meaningless (a new scheduler type)."""
    pruned = copy.deepcopy(dict(base))
    notes: list[str] = []
    base_scheduler = _SCHEDULER_NAMES.get(str(get_path(base, "scheduler.type")), "none")
    if "scheduler" in pruned and values["scheduler"] != base_scheduler:
        # Parameters of one scheduler are unknown keys to another: start the new one afresh.
        del pruned["scheduler"]
        notes.append(f"the loaded scheduler ({get_path(base, 'scheduler.type')}) and its parameters were replaced")
    base_optimizer = str(get_path(base, "optimizer.type", "")).lower()
    params = get_path(pruned, "optimizer.params")
    if isinstance(params, dict) and base_optimizer and values["optimizer"] != base_optimizer:
        allowed = set(load_schema().optimizer_params.get(values["optimizer"], []))
        dropped = sorted(k for k in params if k not in allowed)
        for key in dropped:
            del params[key]
        if dropped:
            notes.append(f"optimizer parameters {', '.join(dropped)} do not apply to {values['optimizer']}: dropped")
    return pruned, notes


def quant_flag(values: Mapping[str, Any]) -> str:
    """Return the --quant value of the two ZeRO++ checkboxes."""
    return {(False, False): "none", (True, False): "qwz", (False, True): "qgz",
            (True, True): "qwz+qgz"}[(bool(values["qwz"]), bool(values["qgz"]))]


def to_config(values: Mapping[str, Any], base: Mapping[str, Any], pinned: Collection[str] = (),
              initial: Mapping[str, Any] | None = None) -> FormResult:
    """Return the TrainConfig whose rendering on the (pruned) base is what the form shows.

    Flag fields are compared with what the base renders to. A `--set` field is written only
    when `pinned` (the user set it): the others follow what render() derives, so e.g. the
    scheduler's total_num_steps follows the step count until the user types one. A loaded
    train_batch_size follows the form's batch once the user changes it from `initial`.
    """
    pruned, notes = prune_base(base, values)
    reference = values_from(render(TrainConfig(), pruned).deepspeed)
    flags: dict[str, Any] = {"nproc": values["nproc"], "steps": values["steps"]}
    for name in FLAG_FIELDS:
        if values[name] != reference[name]:
            flags[name] = values[name]
    if quant_flag(values) != quant_flag(reference):
        flags["quant"] = quant_flag(values)
    nvme_kinds = [k for k in ("offload_optimizer", "offload_param") if values[k] == "nvme"]
    if nvme_kinds and values["nvme_path"] != reference["nvme_path"]:
        # render() writes --nvme-path only beside an offload flag that chose nvme.
        flags["nvme_path"] = values["nvme_path"]
        flags.update({k: "nvme" for k in nvme_kinds})
    if flags.get("qat") == "none":
        del flags["qat"]
    cfg = TrainConfig(**flags)
    rendered = render(cfg, pruned).deepspeed
    after_flags = values_from(rendered)
    changed = [name for name in active_set_fields(values) if name in pinned and name not in DERIVED
               and values[name] is not None and values[name] != after_flags[name]]
    if WARMUP_STEPS_KEY in changed and get_path(rendered, "scheduler.type") in WARMUP_SCHEDULERS:
        # The warm-up length has a flag of its own; the copied line reads better with it.
        changed.remove(WARMUP_STEPS_KEY)
        cfg = cfg.replace(warmup_steps=values[WARMUP_STEPS_KEY])
    sets = [set_item(name, values[name]) for name in changed]
    if "train_batch_size" in pruned and initial is not None and any(values[k] != initial[k] for k in BATCH_FIELDS):
        # The user changed the batch: keep the loaded train_batch_size consistent with it (a
        # loaded one that never fitted is left for the batch rule to show).
        global_batch = values["micro_batch"] * values["grad_accum"] * values["nproc"]
        if global_batch != pruned["train_batch_size"]:
            sets.append(f"train_batch_size={global_batch}")
    return FormResult(cfg.replace(set=tuple(sets)), pruned, tuple(notes))


BATCH_FIELDS = ("micro_batch", "grad_accum", "nproc")


def world_size_of(base: Mapping[str, Any]) -> int | None:
    """Return the world size a config with all three batch sizes was written for (None if it does not say)."""
    sizes: list[Any] = [base.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                               "gradient_accumulation_steps")]
    total, micro, accum = sizes
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (total, micro, accum)) \
            and total % (micro * accum) == 0:
        return int(total // (micro * accum))
    return None


def changed_only(initial: TrainConfig, result: FormResult) -> FormResult:
    """Return `result` with only the flags and `--set`s that differ from the form as loaded (nproc, steps kept)."""
    before = initial.given()
    kept = {name: value for name, value in result.config.given().items()
            if name in ("nproc", "steps") or before.get(name, _MISSING) != value}
    kept["set"] = tuple(item for item in result.config.set if item not in initial.set)
    return FormResult(TrainConfig(**kept), result.base, result.notes)


def changed_dict(before: Mapping[str, Any], after: Mapping[str, Any], loaded: Mapping[str, Any]) -> dict[str, Any]:
    """Return `loaded` with exactly the keys whose rendered value the form changed (before -> after).

    A key the form did not change stays as loaded, or absent; a key it changed is written;
    a key the change removed (another scheduler's parameters) is dropped.
    """
    out = copy.deepcopy(dict(loaded))
    for key, value in _leaves(after):
        if get_path(before, key, _MISSING) != value:
            set_path(out, key, copy.deepcopy(value))
    for key, _ in _leaves(before):
        if get_path(after, key, _MISSING) is _MISSING:
            _delete_path(out, key)
    return out


def _delete_path(tree: dict[str, Any], dotted: str) -> None:
    """Delete tree[a][b][c] for 'a.b.c' where present, and the sections it leaves empty."""
    head, _, rest = dotted.partition(".")
    if head not in tree:
        return
    if not rest:
        del tree[head]
    elif isinstance(tree[head], dict):
        _delete_path(tree[head], rest)
        if not tree[head]:
            del tree[head]


def active_set_fields(values: Mapping[str, Any]) -> list[str]:
    """Return the `--set` fields that apply to the form's current choices."""
    names = [f"zero_optimization.{k}.pin_memory" for k in ("offload_optimizer", "offload_param")
             if values[k] != "none"]
    if values["precision"] == "fp16":
        names += [n for n in field_by_name() if n.startswith("fp16.")]
    if values["optimizer"] == "sgd":
        names.append("optimizer.params.momentum")
    else:
        names += ["optimizer.params.betas", "optimizer.params.eps"]
    kind = SCHEDULER_TYPES.get(values["scheduler"])
    if kind is not None:
        names += [f.name for f in scheduler_param_fields()[kind]]
    names += [n for n in field_by_name() if n.startswith("zero_optimization.") and "pin_memory" not in n]
    return names


def standalone(result: FormResult, source: str | None, original: Mapping[str, Any]) -> TrainConfig:
    """Return the TrainConfig that renders the panel's dict on its own (for the %%bigtrain line).

    A file that the form did not prune is named with `--config`; otherwise every setting of
    the base that no flag or `--set` covers becomes a `--set` of its own.
    """
    cfg = result.config
    if source is not None and result.base == dict(original):
        return cfg.replace(config=source)
    # Every key a flag or --set writes (the scheduler parameters that --steps/--lr fill included).
    covered = set(render(cfg, result.base).sources)
    leaves = [set_item(key, value) for key, value in _leaves(result.base)
              if not any(".".join(key.split(".")[:n]) in covered for n in range(1, key.count(".") + 2))]
    return cfg.replace(set=tuple(leaves) + cfg.set)


def set_item(key: str, value: Any) -> str:
    """Return the `--set key=value` item that parse_set reads back as `value`."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return f"{key}={value}"  # plain text reads back as itself: no JSON quotes needed
    return f"{key}={json.dumps(value)}"


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out += _leaves(value, f"{prefix}{key}.")
        elif not isinstance(value, Mapping):  # an empty section carries no setting
            out.append((prefix + key, value))
    return out


@dataclass(frozen=True)
class Choice:
    """The options a choice field may offer now, and why others are missing."""

    options: tuple[Any, ...]
    reason: str = ""  # why some options (or the whole field) are unavailable


def allowed_choices(values: Mapping[str, Any], machine: MachineFacts,
                    keep: Mapping[str, Any] | None = None) -> dict[str, Choice]:
    """Return what each constrained field may be set to, given the stage and the machine.

    `keep` holds loaded values the form would not offer (NVMe below stage 3, qwZ on a CPU):
    they stay offered while the field still has them, so the validator's problem shows next
    to them instead of the form silently dropping them.
    """
    stage = values["zero"]
    nvme_ok = stage == 3 and machine.has_libaio
    nvme_why = ("nvme needs ZeRO-3 (below it DeepSpeed silently keeps the state in CPU memory)" if stage != 3
                else "" if machine.has_libaio else "nvme needs libaio (apt-get install libaio-dev)")
    out = {
        "offload_optimizer": Choice(("none",), "optimizer offload needs ZeRO stage 1, 2 or 3") if stage == 0
        else Choice(OFFLOAD_ALL if nvme_ok else ("none", "cpu"), nvme_why),
        "offload_param": Choice(OFFLOAD_ALL if nvme_ok else ("none", "cpu"), nvme_why) if stage == 3
        else Choice(("none",), "parameter offload needs ZeRO stage 3"),
        "precision": Choice(("fp32", "bf16", "fp16")) if machine.cuda
        else Choice(("fp32", "bf16"), "fp16: DeepSpeed runs fp16 only on CUDA devices; this machine has no GPU"),
        "optimizer": Choice(("adamw", "adam", "sgd", "lamb")) if machine.cuda
        else Choice(("adamw", "adam", "sgd"), "lamb: DeepSpeed's Lamb has no CPU implementation; no GPU here"),
        "qat": Choice(("none", "int8", "int4")),
    }
    if values["optimizer"] not in SUPPORTED_OPTIMIZERS:
        # A loaded config's own optimizer (e.g. OneBitAdam): keep offering it; the validator judges it.
        out["optimizer"] = Choice((values["optimizer"], *out["optimizer"].options), out["optimizer"].reason)
    zpp = "" if stage == 3 else "ZeRO++ needs ZeRO stage 3"
    cuda = "" if machine.cuda else "qwZ/qgZ use CUDA kernels DeepSpeed has no CPU version of; this machine has no GPU"
    out["qwz"] = out["qgz"] = Choice((False, True) if not (zpp or cuda) else (False,), zpp or cuda)
    out["hpz"] = Choice((), zpp)  # any divisor of the process count; only at stage 3
    for name, loaded in (keep or {}).items():
        if name in out and values[name] == loaded and loaded not in out[name].options:
            out[name] = Choice((*out[name].options, loaded), out[name].reason)
    return out


def unoffered(values: Mapping[str, Any], allowed: Mapping[str, Choice]) -> dict[str, Any]:
    """Return the values (of a loaded config) that the form would not offer or would reset."""
    out = {name: values[name] for name in _RESETS if values[name] not in allowed[name].options}
    if allowed["hpz"].reason and values["hpz"] != 1:
        out["hpz"] = values["hpz"]
    return out


OFFLOAD_ALL = ("none", "cpu", "nvme")
SUPPORTED_OPTIMIZERS = ("adamw", "adam", "sgd", "lamb")


_RESETS = {"offload_optimizer": "none", "offload_param": "none", "precision": "fp32", "optimizer": "adamw",
           "qat": "none", "qwz": False, "qgz": False}


def coerce(values: dict[str, Any], allowed: Mapping[str, Choice], keep: Mapping[str, Any] | None = None) -> list[str]:
    """Reset fields whose value is no longer allowed (e.g. param offload after leaving stage 3); say so."""
    notes = []
    for name, fallback in _RESETS.items():
        if values[name] not in allowed[name].options:
            notes.append(f"{name} reset from {values[name]!r} to {fallback!r}: {allowed[name].reason}")
            values[name] = fallback
    if allowed["hpz"].reason and values["hpz"] != 1 and values["hpz"] != (keep or {}).get("hpz"):
        notes.append(f"hpz reset from {values['hpz']} to 1: {allowed['hpz'].reason}")
        values["hpz"] = 1
    return notes


def display_defaults(values: dict[str, Any], nproc: int, steps: int) -> dict[str, Any]:
    """Fill what a rendered dict leaves open (micro-batch from a DataLoader) with what the form shows."""
    filled = dict(values)
    filled.setdefault("nproc", nproc)
    filled.setdefault("steps", steps)
    if filled["micro_batch"] is None:
        filled["micro_batch"] = DEFAULT_MICRO_BATCH
    for name, default in (("grad_accum", 1), ("lr", 1e-3), ("weight_decay", 0.0)):
        if filled[name] is None:
            filled[name] = default
    return filled

