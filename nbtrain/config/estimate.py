"""Estimate per-device memory for model states under ZeRO (the ZeRO paper's arithmetic).

Model states only: parameters, gradients and optimizer state. Activations depend on the
model and batch and are not included; the estimate says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nbtrain.config.render import get_path

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of model states per parameter on each device and in host memory per process."""

    params: float
    grads: float
    optimizer: float
    host: float  # offloaded states, per process

    @property
    def device(self) -> float:
        return self.params + self.grads + self.optimizer

    def for_params(self, count: int) -> tuple[float, float]:
        """Return (device GiB, host GiB) per process for a model of `count` parameters."""
        return self.device * count / GIB, self.host * count / GIB


def estimate(ds: Mapping[str, Any], world_size: int) -> MemoryEstimate:
    """Return the bytes per parameter that each process holds under `ds`."""
    stage = get_path(ds, "zero_optimization.stage", 0)
    mixed = get_path(ds, "bf16.enabled") is True or get_path(ds, "fp16.enabled") is True
    weight = 2 if mixed else 4
    optimizer_type = str(get_path(ds, "optimizer.type", "adamw")).lower()
    moments = 8 if optimizer_type in ("adam", "adamw", "lamb") else 4  # Adam: m and v in fp32
    # Mixed precision keeps an fp32 master copy of the weights with the optimizer state.
    optimizer = float(moments + (4 if mixed else 0))
    params, grads = float(weight), float(weight)
    if stage >= 1:
        optimizer /= world_size
    if stage >= 2:
        grads /= world_size
    if stage >= 3:
        params /= world_size
    host = 0.0
    if get_path(ds, "zero_optimization.offload_optimizer.device", "none") != "none":
        # ZeRO-Offload keeps only the parameters on the device: the gradients travel to the
        # host, where the optimizer steps (Ren et al. 2021, section 4.1).
        host, optimizer, grads = optimizer + grads, 0.0, 0.0
    if get_path(ds, "zero_optimization.offload_param.device", "none") != "none":
        host, params = host + params, 0.0
    return MemoryEstimate(params, grads, optimizer, host)


def describe(ds: Mapping[str, Any], world_size: int, param_count: int | None = None) -> str:
    """Return a short human-readable memory estimate."""
    est = estimate(ds, world_size)
    lines = [f"Model-state memory per process ({world_size} processes; activations not included):",
             f"  {est.device:.2f} bytes/parameter on the device "
             f"(params {est.params:.2f}, grads {est.grads:.2f}, optimizer {est.optimizer:.2f}), "
             f"{est.host:.2f} bytes/parameter offloaded to host memory"]
    sizes = [param_count] if param_count else [125_000_000, 1_300_000_000, 7_000_000_000]
    for count in sizes:
        device, host = est.for_params(count)
        lines.append(f"  {count / 1e6:,.0f}M parameters: {device:.2f} GiB device, {host:.2f} GiB host")
    return "\n".join(lines)
