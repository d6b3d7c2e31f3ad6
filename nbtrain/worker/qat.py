"""Quantization-aware training (`--qat int8|int4`) with torchao, inside the DeepSpeed run.

Before the engine is built, every Linear layer (GPT-2 `Conv1D` layers become Linear first)
is swapped for torchao's `FakeQuantizedLinear`: the forward pass rounds activations to int8
per token and weights to int8 per output channel (int4: in groups of 32 input features,
per channel where the width is not a multiple of 32), so training learns weights that
survive the rounding. Gradients flow straight through the rounding. The layer keeps the
float weight as its only parameter, so DeepSpeed partitions, gathers and saves it as usual.
After training, `convert` turns rank 0's consolidated copy into a real int8-activation /
int-weight model (torchao's `Int8DynamicActivationIntxWeightConfig`, the conversion that
matches these fake-quantizers exactly). Its int4 weights are stored one per byte (torchao's
`unpacked_to_int8` layout, the one that runs on CPU), so on disk int4 is no smaller than int8.
"""

from __future__ import annotations

from typing import Any

import torch

from nbtrain.quantization import import_torchao, linear_from_conv1d, untied_linear_filter

GROUP_SIZE = 32  # int4 weights share a scale per 32 input features


def _base_configs(mode: str) -> list[tuple[Any, Any]]:
    """Return (torchao config, which Linear layers it applies to) pairs for `mode`, in order."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    int4 = getattr(torch, "int4")  # noqa: B009 (torch's type stubs lack the sub-byte dtypes)
    if mode == "int8":
        return [(Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
                 lambda linear: True)]
    if mode == "int4":
        return [(Int8DynamicActivationIntxWeightConfig(weight_dtype=int4,
                                                       weight_granularity=PerGroup(GROUP_SIZE)),
                 lambda linear: linear.in_features % GROUP_SIZE == 0),
                (Int8DynamicActivationIntxWeightConfig(weight_dtype=int4, weight_granularity=PerAxis(0)),
                 lambda linear: linear.in_features % GROUP_SIZE != 0)]
    raise ValueError(f"--qat {mode!r}: use int8 or int4")


def prepare(model: torch.nn.Module, mode: str) -> int:
    """Swap `model`'s Linear layers for fake-quantized ones in place; return how many were swapped."""
    import_torchao()
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    if isinstance(model, torch.nn.Linear) or type(model).__name__ == "Conv1D":
        raise ValueError(f"--qat {mode} swaps the Linear layers inside the model, and the model is one "
                         "Linear layer; wrap it: torch.nn.Sequential(layer)")
    linear_from_conv1d(model)
    untied = untied_linear_filter(model)
    swapped = 0
    for base, applies in _base_configs(mode):
        def pick(module: torch.nn.Module, fqn: str, applies: Any = applies) -> bool:
            return untied(module, fqn) and type(module) is torch.nn.Linear and applies(module)

        swapped += sum(1 for fqn, m in model.named_modules() if pick(m, fqn))
        quantize_(model, QATConfig(base, step="prepare"), filter_fn=pick)
    if swapped == 0:
        raise ValueError(f"--qat {mode} found no torch.nn.Linear layer (with a weight of its own) in "
                         f"{type(model).__name__}; quantization-aware training has nothing to train")
    return swapped


def convert(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Turn a trained fake-quantized model into a quantized one in place, and return it."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    for base, applies in _base_configs(mode):
        def pick(module: torch.nn.Module, fqn: str, applies: Any = applies) -> bool:
            return isinstance(module, FakeQuantizedLinear) and applies(module)

        quantize_(model, QATConfig(base, step="convert"), filter_fn=pick)
    return model


def is_on(cfg: Any) -> bool:
    """Return whether the run's TrainConfig asks for quantization-aware training."""
    return getattr(cfg, "qat", None) not in (None, "none")
