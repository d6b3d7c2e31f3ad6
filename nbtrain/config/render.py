"""Render a TrainConfig (plus a DeepSpeed config file or dict) into the DeepSpeed dict.

This is the one place that turns flags into DeepSpeed keys and applies defaults.
Precedence: the base dict (from `--config`) < flags < `--set`. The result is complete:
it is handed to accelerate as is, so accelerate's own defaults (ZeRO stage 2) never apply.

Two values may only be known in the workers: the micro-batch size when a DataLoader gives
it, and the total step count of an epoch-based run. Until then they hold the marker
`FROM_DATALOADER`, which `--dry-run` shows and `finalize` replaces.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nbtrain.config import tree as defaults
from nbtrain.config.keys import (
    DECAYING_SCHEDULERS,
    FLAG_KEYS,
    NVME_PATH_KEYS,
    OPTIMIZER_TYPES,
    WARMUP_MAX_LR_SCHEDULERS,
    WARMUP_SCHEDULERS,
    WARMUP_STEPS_KEY,
)
from nbtrain.config.tree import TrainConfig
from nbtrain.errors import ConfigError, Problem

FROM_DATALOADER = "from the DataLoader"
_MISSING = object()

# Optimizer types whose DeepSpeed-built optimizer is in ZERO_SUPPORTED_OPTIMIZERS (zero/utils.py):
# adam/adamw -> FusedAdam, DeepSpeedCPUAdam or torch's Adam(W); adagrad -> torch's Adagrad or
# DeepSpeedCPUAdagrad; lion -> FusedLion or DeepSpeedCPULion; muon -> MuonWithAuxAdam. Any other
# type (lamb's FusedLamb, a torch.optim class such as SGD) needs zero_allow_untested_optimizer
# under ZeRO. tests/test_validate.py checks the classes against DeepSpeed's list.
ZERO_TESTED_OPTIMIZERS = ("adam", "adamw", "adagrad", "lion", "muon")
# OneCycle starts at peak / 25 (PyTorch's OneCycleLR div_factor); the LR range test sweeps
# from peak / 1000 up to the peak over the run.
ONE_CYCLE_DIV = 25.0
RANGE_TEST_SPAN = 1000.0


@dataclass(frozen=True)
class Rendered:
    """The DeepSpeed dict of a run and the notices for the user (flag overrode file)."""

    deepspeed: dict[str, Any]
    notices: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)  # dotted key -> flag or --set


def parse_set(item: str) -> tuple[str, Any]:
    """Parse one `--set dotted.key=value`; the value is JSON where it parses, else text."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError([Problem("--set", item, "expected dotted.key=value",
                                   "write e.g. --set zero_optimization.overlap_comm=true")])
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    return key.strip(), value


def flag_settings(cfg: TrainConfig) -> list[tuple[str, Any, str]]:
    """Return (dotted DeepSpeed key, value, flag) for every flag the user set (from keys.FLAG_KEYS)."""
    out: list[tuple[str, Any, str]] = []
    for row in FLAG_KEYS:
        value = getattr(cfg, row.field)
        if value is None or not row.applies(value):
            continue
        out.append((row.key, row.to_key(value), row.flag))
        if row.field in NVME_PATH_KEYS and value == "nvme" and cfg.nvme_path is not None:
            out.append((NVME_PATH_KEYS[row.field], cfg.nvme_path, "--nvme-path"))
    return out


def get_path(tree: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """Return tree[a][b][c] for 'a.b.c', or `default` where a part is missing."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set tree[a][b][c] = value for 'a.b.c', creating the dicts on the way."""
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


def render(cfg: TrainConfig, base: Mapping[str, Any] | None = None) -> Rendered:
    """Return the complete DeepSpeed dict for `cfg` on top of `base`; raise ConfigError on conflicts.

    >>> render(TrainConfig(zero=3)).deepspeed["zero_optimization"]["stage"]
    3
    """
    rendered, problems = render_collecting(cfg, base)
    if problems:
        raise ConfigError(problems)
    return rendered


def render_collecting(cfg: TrainConfig, base: Mapping[str, Any] | None = None) -> tuple[Rendered, list[Problem]]:
    """Return the DeepSpeed dict and every `--set` problem, so validation can report them together.

    A refused `--set` item is left out of the dict; the rest is rendered as usual.
    """
    ds: dict[str, Any] = copy.deepcopy(dict(base or {}))
    notices: list[str] = []
    sources: dict[str, str] = {}
    for key, value, flag in flag_settings(cfg):
        _apply_flag(ds, key, value, flag, notices, sources)
    if cfg.scheduler == "none":
        # `--scheduler none` means a constant LR, even if the config file names a scheduler.
        if "scheduler" in ds:
            notices.append(f"--scheduler none drops the config file's scheduler {get_path(ds, 'scheduler.type')!r}")
            del ds["scheduler"]
        sources["scheduler"] = "--scheduler"

    filled = _apply_defaults(ds)
    problems: list[Problem] = []
    for item in cfg.set:
        try:
            key, value = parse_set(item)
        except ConfigError as e:
            problems += e.problems
            continue
        clash = _set_conflict(ds, key, value, sources)
        if clash:
            problems.append(clash)
            continue
        set_path(ds, key, value)
        sources[key] = "--set"
    if "train_batch_size" in ds:
        # A global batch makes DeepSpeed derive what is missing of micro-batch and grad-accum
        # (resolve_batch, against the world size): the defaults must not pre-empt that.
        for key in filled:
            if key not in sources:
                del ds[key]
    # Flags that fill scheduler parameters (--lr, --warmup-steps, --steps) win over the
    # file like every flag, and are refused when a --set says otherwise.
    for key, value, flag in _scheduler_flag_settings(ds, cfg):
        parts = key.split(".")
        if any(sources.get(".".join(parts[:n])) == "--set" for n in range(1, len(parts) + 1)):
            if get_path(ds, key) != value:
                problems.append(_conflict_problem(key, get_path(ds, key), flag, value))
            continue
        _apply_flag(ds, key, value, flag, notices, sources)
    _render_scheduler(ds, cfg)
    return Rendered(ds, tuple(notices), sources), problems


def _apply_flag(ds: dict[str, Any], key: str, value: Any, flag: str, notices: list[str],
                sources: dict[str, str]) -> None:
    before = get_path(ds, key)
    if before is not None and before != value:
        notices.append(f"{flag} sets {key} = {value!r} (the config file had {before!r})")
    set_path(ds, key, value)
    sources[key] = flag


def _set_conflict(ds: Mapping[str, Any], key: str, value: Any, sources: Mapping[str, str]) -> Problem | None:
    """Return the problem if `--set key=value` would change what a flag set (the key, above or below it)."""
    trial = copy.deepcopy(dict(ds))
    set_path(trial, key, value)
    for flagged, flag in sources.items():
        before, after = get_path(ds, flagged, _MISSING), get_path(trial, flagged, _MISSING)
        if flag != "--set" and before != after:
            return _conflict_problem(key, value, flag, before, flagged)
    return None


def _conflict_problem(key: str, set_value: Any, flag: str, flag_value: Any, flagged: str | None = None) -> Problem:
    rule = (f"{flag} already removes {flagged or key}" if flag_value is _MISSING
            else f"{flag} already sets {flagged or key} to {flag_value!r}")
    return Problem(f"--set {key}", set_value, rule, f"drop one of {flag} and --set {key}")


def _scheduler_flag_settings(ds: Mapping[str, Any], cfg: TrainConfig) -> list[tuple[str, Any, str]]:
    """Return (key, value, flag) for the scheduler parameters that flags set directly."""
    kind = get_path(ds, "scheduler.type")
    out: list[tuple[str, Any, str]] = []
    if kind in WARMUP_SCHEDULERS and cfg.warmup_steps is not None:
        out.append((WARMUP_STEPS_KEY, cfg.warmup_steps, "--warmup-steps"))
    if cfg.lr is not None and kind in WARMUP_MAX_LR_SCHEDULERS:
        out.append(("scheduler.params.warmup_max_lr", cfg.lr, "--lr"))
    if cfg.lr is not None and kind == "OneCycle":
        out.append(("scheduler.params.cycle_max_lr", cfg.lr, "--lr"))
    if cfg.steps is not None and kind in DECAYING_SCHEDULERS:
        out.append(("scheduler.params.total_num_steps", cfg.steps, "--steps"))
    return out


def _apply_defaults(ds: dict[str, Any]) -> list[str]:
    """Fill what DeepSpeed has no usable default for (DESIGN.md's defaults); return the batch keys filled."""
    optimizer = ds.setdefault("optimizer", {})
    optimizer.setdefault("type", OPTIMIZER_TYPES[defaults.DEFAULT_OPTIMIZER])
    params = optimizer.setdefault("params", {})
    params.setdefault("lr", defaults.DEFAULT_LR)
    params.setdefault("weight_decay", defaults.DEFAULT_WEIGHT_DECAY)
    filled = [key for key in ("gradient_accumulation_steps", "train_micro_batch_size_per_gpu") if key not in ds]
    ds.setdefault("gradient_accumulation_steps", defaults.DEFAULT_GRAD_ACCUM)
    # DeepSpeed's default stage is 0, but accelerate refuses a config without the section
    # (and would otherwise assume stage 2): say it explicitly.
    ds.setdefault("zero_optimization", {}).setdefault("stage", 0)
    ds.setdefault("train_micro_batch_size_per_gpu", FROM_DATALOADER)
    stage = get_path(ds, "zero_optimization.stage", 0)
    if str(optimizer["type"]).lower() not in ZERO_TESTED_OPTIMIZERS and isinstance(stage, int) and stage > 0:
        # DeepSpeed refuses ZeRO with an optimizer it has not tested (Lamb, torch's SGD) unless told.
        ds.setdefault("zero_allow_untested_optimizer", True)
    return filled


def _render_scheduler(ds: dict[str, Any], cfg: TrainConfig) -> None:
    """Fill the scheduler's parameters so that `--lr` is the peak LR of every schedule."""
    kind = get_path(ds, "scheduler.type")
    if kind is None:
        return
    peak = get_path(ds, "optimizer.params.lr")
    params = ds["scheduler"].setdefault("params", {})
    total = cfg.steps if cfg.steps is not None else FROM_DATALOADER
    warmup = cfg.warmup_steps
    if kind in WARMUP_SCHEDULERS and warmup is not None:
        params.setdefault("warmup_num_steps", warmup)
    if kind in WARMUP_MAX_LR_SCHEDULERS:
        params.setdefault("warmup_min_lr", 0.0)
        params.setdefault("warmup_max_lr", peak)
    if kind in DECAYING_SCHEDULERS:
        params.setdefault("total_num_steps", total)
    if kind == "OneCycle":
        params.setdefault("cycle_max_lr", peak)
        params.setdefault("cycle_min_lr", peak / ONE_CYCLE_DIV if isinstance(peak, (int, float)) else peak)
        params.setdefault("cycle_first_step_size", _half(total))
    if kind == "LRRangeTest":
        params.setdefault("lr_range_test_min_lr", peak / RANGE_TEST_SPAN if isinstance(peak, (int, float)) else peak)
        params.setdefault("lr_range_test_step_size", 1)
        params.setdefault("lr_range_test_step_rate", _range_rate(total))


def _half(total: Any) -> Any:
    return max(1, total // 2) if isinstance(total, int) else total


def _range_rate(total: Any) -> Any:
    # lr(step) = min_lr * (1 + rate * step): reach the peak (span x min_lr) at the last step.
    return (RANGE_TEST_SPAN - 1) / max(1, total - 1) if isinstance(total, int) else total


def finalize(ds: Mapping[str, Any], *, micro_batch: int, total_steps: int) -> dict[str, Any]:
    """Replace the FROM_DATALOADER markers with what the workers found out."""
    done = copy.deepcopy(dict(ds))
    if done.get("train_micro_batch_size_per_gpu") == FROM_DATALOADER:
        done["train_micro_batch_size_per_gpu"] = micro_batch
    params = get_path(done, "scheduler.params", {})
    for key, value in list(params.items()):
        if value != FROM_DATALOADER:
            continue
        if key == "cycle_first_step_size":
            params[key] = _half(total_steps)
        elif key == "lr_range_test_step_rate":
            params[key] = _range_rate(total_steps)
        else:
            params[key] = total_steps
    return done


def resolve_batch(ds: Mapping[str, Any], world_size: int) -> dict[str, Any]:
    """Return `ds` with the micro-batch and grad-accum that DeepSpeed derives from train_batch_size.

    DeepSpeed fills a missing one with integer division (config.py `_set_batch_related_parameters`);
    the workers need both before DeepSpeed starts (to batch the data), so the plan fills them the
    same way once `check_batch` has found that they divide exactly.
    """
    done = copy.deepcopy(dict(ds))
    total = done.get("train_batch_size")
    if not isinstance(total, int) or isinstance(total, bool) or total <= 0:
        return done
    micro: Any = done.get("train_micro_batch_size_per_gpu")
    accum: Any = done.get("gradient_accumulation_steps")
    if any(v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0) for v in (micro, accum)):
        return done  # a marker or a bad value: nothing DeepSpeed would derive from (check_batch reports it)
    if micro is None and accum is None:
        accum = 1
    if accum is None:
        accum = total // micro // world_size
    if micro is None:
        micro = total // world_size // accum
    done.setdefault("train_micro_batch_size_per_gpu", micro)
    done.setdefault("gradient_accumulation_steps", accum)
    return done


def unresolved(ds: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Return the dotted keys that still hold FROM_DATALOADER."""
    found = []
    for key, value in ds.items():
        if isinstance(value, Mapping):
            found += unresolved(value, f"{prefix}{key}.")
        elif value == FROM_DATALOADER:
            found.append(prefix + key)
    return found
