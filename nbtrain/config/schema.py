"""The DeepSpeed config keys that DeepSpeed itself reads, derived from DeepSpeed.

DeepSpeed silently ignores a misspelt top-level key; nbtrain refuses it. The accepted keys
are not a hand-kept list but derived from the installed DeepSpeed:
- top-level keys and the keys of sections parsed by plain getters: recorded by running
  `DeepSpeedConfig` on a dict that notes every key DeepSpeed asks for;
- sections backed by DeepSpeed's pydantic models: the models' fields and aliases, nested;
- `scheduler.params` per scheduler type: the scheduler classes' constructor arguments;
- `optimizer.params` per optimizer type: the constructor arguments of the optimizers
  DeepSpeed builds for that type, plus the keys DeepSpeed itself pops;
- `optimizer.type`: DeepSpeed's own optimizer names (any case) and the `torch.optim`
  classes it falls back to by exact name.

Deriving imports DeepSpeed (over a second), so the result for the DeepSpeed version we
test against ships as `_deepspeed_schema.json`; `load_schema` derives afresh (and caches)
when the installed version differs. `python -m nbtrain.config.schema` rewrites it.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

_SHIPPED = Path(__file__).with_name("_deepspeed_schema.json")
# A key whose children are free-form (user-defined names) is marked with this.
ANY_KEYS = "*"


@dataclass(frozen=True)
class DeepSpeedSchema:
    """Accepted child keys per dotted path ('' is the top level)."""

    version: str
    children: dict[str, list[str]]
    scheduler_params: dict[str, list[str]]
    optimizer_params: dict[str, list[str]]
    # Keys DeepSpeed reads only to refuse them (removed features), dotted -> its message.
    removed: dict[str, str] = field(default_factory=dict)
    # optimizer.type values DeepSpeed can build: its own names (lower case, matched in any case)
    # and torch.optim class names (matched exactly: DeepSpeed does getattr(torch.optim, type)).
    optimizer_types: list[str] = field(default_factory=list)

    def builds_optimizer(self, kind: str) -> bool:
        """Return whether DeepSpeed can build an optimizer of this `optimizer.type` (True if unknown here)."""
        return not self.optimizer_types or kind in self.optimizer_types or kind.lower() in self.optimizer_types

    def allowed(self, path: str, config: dict[str, Any]) -> list[str] | None:
        """Return the keys accepted under `path`, or None where DeepSpeed does not check."""
        if path == "scheduler.params":
            kind = config.get("scheduler", {}).get("type")
            return self.scheduler_params.get(str(kind))
        if path == "optimizer.params":
            kind = str(config.get("optimizer", {}).get("type", "")).lower()
            return self.optimizer_params.get(kind)
        keys = self.children.get(path)
        return None if keys is None or keys == [ANY_KEYS] else keys


def deepspeed_version() -> str:
    """Return the installed DeepSpeed version without importing it."""
    return metadata.version("deepspeed")


@functools.lru_cache(maxsize=1)
def load_schema() -> DeepSpeedSchema:
    """Return the schema for the installed DeepSpeed (shipped, cached, or derived now)."""
    version = deepspeed_version()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nbtrain"
    for candidate in (_SHIPPED, cache / f"deepspeed-schema-{version}.json"):
        if candidate.exists():
            data = json.loads(candidate.read_text())
            if data["version"] == version:
                return DeepSpeedSchema(**data)
    schema = derive_schema()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / f"deepspeed-schema-{version}.json").write_text(json.dumps(schema.__dict__))
    except OSError:
        pass  # a read-only home only costs the derivation next time
    return schema


# ---------------------------------------------------------------------------------------
# Derivation (imports DeepSpeed)
# ---------------------------------------------------------------------------------------

class _RecordingKeys:
    """A `dict.keys()` stand-in that records membership tests (`k in d.keys()`)."""

    def __init__(self, owner: _RecordingDict):
        self._owner = owner

    def __contains__(self, key: object) -> bool:
        return self._owner.__contains__(key)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(dict.keys(self._owner))


class _RecordingDict(dict):  # type: ignore[type-arg]
    """A dict that records every key DeepSpeed's config parser asks it for."""

    def __init__(self, data: dict[str, Any], path: str, seen: set[str]):
        super().__init__(data)
        self._path, self._seen = path, seen

    def _note(self, key: object) -> None:
        self._seen.add(f"{self._path}{key}")

    def _wrap(self, key: str, value: Any) -> Any:
        if isinstance(value, dict) and not isinstance(value, _RecordingDict):
            return _RecordingDict(value, f"{self._path}{key}.", self._seen)
        return value

    def __getitem__(self, key: str) -> Any:
        self._note(key)
        return self._wrap(key, dict.__getitem__(self, key))

    def get(self, key: str, default: Any = None) -> Any:
        self._note(key)
        return self._wrap(key, dict.get(self, key, default))

    def __contains__(self, key: object) -> bool:
        self._note(key)
        return dict.__contains__(self, key)

    def keys(self) -> _RecordingKeys:  # type: ignore[override]
        return _RecordingKeys(self)


def _pydantic_sections() -> dict[str, Any]:
    """Return DeepSpeed's pydantic model for each section it validates with one."""
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.compile.config import CompileConfig
    from deepspeed.monitor.config import CometConfig, CSVConfig, TensorBoardConfig, WandbConfig
    from deepspeed.runtime.config import HybridEngineConfig
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return {
        "zero_optimization": DeepSpeedZeroConfig, "bf16": DeepSpeedBF16Config,
        "fp16": DeepSpeedFP16Config, "tensorboard": TensorBoardConfig, "wandb": WandbConfig,
        "csv_monitor": CSVConfig, "comet": CometConfig, "comms_logger": CommsLoggerConfig,
        "compile": CompileConfig, "hybrid_engine": HybridEngineConfig,
    }


def _model_children(model: Any, path: str, out: dict[str, list[str]]) -> None:
    """Record a pydantic model's field names and aliases under `path`, recursively."""
    from pydantic import BaseModel

    keys: list[str] = []
    for name, info in model.model_fields.items():
        keys.append(name)
        if info.alias:
            keys.append(info.alias)
        for candidate in _types_in(info.annotation):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                for key in {name, info.alias} - {None}:
                    _model_children(candidate, f"{path}.{key}", out)
            elif candidate is dict:
                for key in {name, info.alias} - {None}:
                    out.setdefault(f"{path}.{key}", [ANY_KEYS])
    out[path] = sorted(set(keys))


def _types_in(annotation: Any) -> list[Any]:
    import typing

    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if not args:
        return [annotation]
    found = [origin] if isinstance(origin, type) else []
    for arg in args:
        found += _types_in(arg)
    return found


def _recorded_children(sections: list[str]) -> dict[str, list[str]]:
    """Run DeepSpeedConfig with each section present and record what it reads."""
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()
    base = {"train_micro_batch_size_per_gpu": 1}
    probes = [dict(base)] + [{**base, s: {}} for s in sections]
    for probe in probes:
        try:
            DeepSpeedConfig(_RecordingDict(probe, "", seen))
        except Exception:  # noqa: BLE001 - a probe that DeepSpeed rejects still recorded its reads
            pass
    children: dict[str, set[str]] = {}
    for dotted in seen:
        parent, _, key = dotted.rpartition(".")
        children.setdefault(parent, set()).add(key)
    return {path: sorted(keys) for path, keys in children.items()}


def _scheduler_params() -> dict[str, list[str]]:
    from deepspeed.runtime import lr_schedules

    params = {}
    for name in lr_schedules.VALID_LR_SCHEDULES:
        signature = inspect.signature(getattr(lr_schedules, name).__init__)
        params[name] = sorted(p for p in signature.parameters if p not in ("self", "optimizer"))
    return params


def _optimizer_params() -> dict[str, list[str]]:
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
    from deepspeed.ops.lamb import FusedLamb
    from deepspeed.runtime import config as ds_config

    def args_of(*classes: Any) -> set[str]:
        names: set[str] = set()
        for cls in classes:
            names |= set(inspect.signature(cls.__init__).parameters) - {"self", "params", "model_params"}
        return names

    # Keys DeepSpeed's engine pops from Adam's params before building the optimizer.
    engine_keys = {ds_config.ADAM_W_MODE, ds_config.TORCH_ADAM_PARAM, "fp32_optimizer_states"}
    adam = args_of(torch.optim.Adam, torch.optim.AdamW, FusedAdam, DeepSpeedCPUAdam) | engine_keys
    return {
        "adam": sorted(adam), "adamw": sorted(adam),
        "lamb": sorted(args_of(FusedLamb)),
        "sgd": sorted(args_of(torch.optim.SGD)),
    }


def _optimizer_types() -> list[str]:
    import torch
    from deepspeed.runtime import config as ds_config

    own = {name.lower() for name in ds_config.DEEPSPEED_OPTIMIZERS}
    torch_classes = {name for name, cls in vars(torch.optim).items()
                     if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and cls is not torch.optim.Optimizer}
    return sorted(own | torch_classes)


def _removed_keys() -> dict[str, str]:
    """Return the keys DeepSpeed refuses as removed features, with DeepSpeed's message."""
    from deepspeed.runtime import config as ds_config

    # DeepSpeed asks for these keys only to raise: recorded reads would count them as accepted.
    removed = dict(getattr(ds_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))
    zero = getattr(ds_config, "_REMOVED_ZERO_CONFIG_KEYS", {})
    removed.update({f"zero_optimization.{key}": message for key, message in zero.items()})
    return removed


def derive_schema() -> DeepSpeedSchema:
    """Derive the accepted keys from the installed DeepSpeed (imports it: slow)."""
    removed = _removed_keys()
    children = _recorded_children([])
    top = children[""]
    children = _recorded_children([s for s in top if s not in _pydantic_sections() and s not in removed])
    for section, model in _pydantic_sections().items():
        _model_children(model, section, children)
    for section in ("optimizer", "scheduler"):
        children[section] = sorted(set(children.get(section, [])) | {"type", "params"})
    for dotted in removed:
        parent, _, key = dotted.rpartition(".")
        if key in children.get(parent, []):
            children[parent].remove(key)
    return DeepSpeedSchema(
        version=deepspeed_version(), children=children,
        scheduler_params=_scheduler_params(), optimizer_params=_optimizer_params(), removed=removed,
        optimizer_types=_optimizer_types(),
    )


if __name__ == "__main__":
    _SHIPPED.write_text(json.dumps(derive_schema().__dict__, indent=1, sort_keys=True) + "\n")
    print(f"wrote {_SHIPPED}")
