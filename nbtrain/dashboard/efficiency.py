"""Compute and energy efficiency of a run: FLOP/s per device, MFU, power, energy per run and per token.

Only measured numbers: where a figure needs something the machine does not report (a GPU
peak we do not know, an energy counter that is missing or unreadable, token counts),
the figure says why instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass

from nbtrain.config.machine import gpus as gpus_words
from nbtrain.dashboard.store import RunMetrics
from nbtrain.rundir import FINAL_STATES

NOT_MEASURABLE = "not measurable on this machine"
BEFORE_FIRST_STEP = "no MFU: the run ended before its first step"

# Dense (no sparsity) peak FLOP/s from NVIDIA's data sheets: tensor-core bf16/fp16, and fp32
# without TF32 (what an fp32 run gets by default in PyTorch). Matched on NVML's device name,
# most specific pattern first.
_PEAKS: tuple[tuple[tuple[str, ...], float, float], ...] = (
    (("H100", "PCIE"), 756e12, 51e12),
    (("H100", "NVL"), 835e12, 60e12),
    (("H100",), 989e12, 67e12),
    (("H200",), 989e12, 67e12),
    (("GH200",), 989e12, 67e12),
    (("B200",), 2250e12, 80e12),
    (("A100",), 312e12, 19.5e12),
    (("L40S",), 362e12, 91.6e12),
    (("L40",), 181e12, 90.5e12),
    (("L4",), 121e12, 30.3e12),
    (("V100",), 125e12, 15.7e12),
    (("T4",), 65e12, 8.1e12),
)


def device_peak_flops(device_name: str, precision: str) -> float | None:
    """Return the device's dense peak FLOP/s at `precision` ("bf16", "fp16", "fp32"), None if unknown."""
    name = device_name.upper()
    if precision == "bf16" and any(old in name for old in ("V100", "T4")):
        return None  # no bf16 tensor cores before Ampere
    for patterns, half, single in _PEAKS:
        if all(p in name for p in patterns):
            return half if precision in ("bf16", "fp16") else single
    return None


def flops_per_device(parameters: int, tokens_per_s: float, world_size: int) -> float:
    """Return the training FLOP/s per device of a transformer LM: 6 × parameters × tokens/s, shared out."""
    return 6.0 * parameters * tokens_per_s / max(1, world_size)


def energy_per_million_tokens(energy_j: float, tokens: float) -> float | None:
    return energy_j / tokens * 1e6 if tokens > 0 else None


@dataclass(frozen=True)
class Efficiency:
    """The efficiency figures of a run, each a number or None with a note saying why not."""

    flops_per_device: float | None
    flops_note: str
    mfu: float | None
    mfu_note: str
    power_w: float | None
    energy_j: float | None
    energy_source: str  # "NVML", "RAPL", or why there is none
    energy_per_mtok_j: float | None


def precision_of(engine: dict[str, object]) -> str:
    return "bf16" if engine.get("bf16") else "fp16" if engine.get("fp16") else "fp32"


def efficiency(metrics: RunMetrics) -> Efficiency:
    """Return what can be said about the run's efficiency from what it recorded so far."""
    flops, flops_note = _flops(metrics)
    mfu, mfu_note = _mfu(metrics, flops)
    power, energy, source = _energy(metrics)
    per_mtok = energy_per_million_tokens(energy, metrics.tokens_seen) if energy is not None else None
    return Efficiency(flops, flops_note, mfu, mfu_note, power, energy, source, per_mtok)


def _flops(metrics: RunMetrics) -> tuple[float | None, str]:
    parameters = metrics.engine.get("parameters")
    tokens_per_s = metrics.tokens_per_s.ys[-20:]
    if not tokens_per_s:
        return None, "needs token counts (batches with input_ids)"
    if not parameters:
        return None, "waiting for the engine's parameter count"
    recent = sorted(tokens_per_s)[len(tokens_per_s) // 2]
    world = int(metrics.engine.get("world_size") or len(metrics.utilization) or 1)
    return flops_per_device(int(parameters), recent, world), "6 × parameters × tokens/s ÷ devices"


def _mfu(metrics: RunMetrics, flops: float | None) -> tuple[float | None, str]:
    gpus = [u for u in metrics.utilization.values() if u.device == "gpu"]
    if not gpus:
        return None, _no_gpu_reading(metrics)
    precision = precision_of(metrics.engine)
    peak = device_peak_flops(gpus[0].device_name, precision)
    if peak is None:
        return None, f"peak {precision} FLOP/s of {gpus[0].device_name} unknown"
    if flops is None:
        return None, BEFORE_FIRST_STEP if _ended_before_first_step(metrics) else "needs FLOP/s"
    return flops / peak, f"of {peak / 1e12:.0f} TFLOP/s {precision} peak"


def _no_gpu_reading(metrics: RunMetrics) -> str:
    """Say truthfully why no rank's GPU was read: no GPU here, a run that died first, or an unknown device.

    The machine's facts come from run.json (what the kernel saw before launch); a run
    written before they were kept there is read as before (no GPU).
    """
    facts = metrics.run.run_info().get("machine") or {}
    gpu_count = facts.get("gpu_count")
    if not gpu_count:
        return NOT_MEASURABLE + " (no GPU, CPU peak unknown)"
    visible = facts.get("cuda_visible_devices")
    has = f"this machine has {gpus_words(gpu_count)}" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible else "")
    if _ended_before_first_step(metrics):
        return f"{BEFORE_FIRST_STEP}; {has}"
    if not metrics.utilization and metrics.run.status().get("state") not in FINAL_STATES:
        return f"waiting for the ranks' first GPU reading ({has})"
    return f"{has}, but no rank's GPU could be read through NVML, so its peak is unknown"


def _ended_before_first_step(metrics: RunMetrics) -> bool:
    return metrics.step == 0 and metrics.run.status().get("state") in FINAL_STATES


def _energy(metrics: RunMetrics) -> tuple[float | None, float | None, str]:
    """Return (power W now, joules so far, source) from NVML's counters, else RAPL's."""
    ranks = list(metrics.utilization.values())
    per_gpu: dict[object, tuple[list[tuple[float, float]], float | None]] = {}
    for util in ranks:
        if util.device == "gpu" and util.energy:
            # Two ranks on one GPU would count it twice: one entry per GPU.
            per_gpu[util.gpu_index] = (util.energy, util.power_w.last)
    if per_gpu:
        energy = sum(pairs[-1][1] - pairs[0][1] for pairs, _ in per_gpu.values())
        powers = [p for _, p in per_gpu.values() if p is not None]
        return (sum(powers) if powers else None), energy, "NVML"
    rapl = [u.cpu_energy for u in ranks if len(u.cpu_energy) >= 1]
    if rapl:
        pairs = rapl[0]
        energy = pairs[-1][1] - pairs[0][1]
        power = None
        if len(pairs) >= 2 and pairs[-1][0] > pairs[-2][0]:
            power = (pairs[-1][1] - pairs[-2][1]) / (pairs[-1][0] - pairs[-2][0])
        return power, energy, "RAPL (CPU packages)"
    if any(u.device == "gpu" for u in ranks):
        return None, None, "this GPU reports no power or energy"
    return None, None, NOT_MEASURABLE
