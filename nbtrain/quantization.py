"""Post-training int8 quantization of a trained model in the kernel, with a before/after report.

>>> report = nbtrain.quantize(model, "int8_dynamic", eval_fn=my_eval, example_batch=x)   # doctest: +SKIP
>>> report              # size on disk, eval loss and forward time, before and after
>>> small = report.model

Quantization goes through torchao's `quantize_`, which rewrites `torch.nn.Linear` layers.
Two things would make it quietly do less than asked, so they are handled here for the
workers' `--qat` as well: GPT-2-style `Conv1D` layers (a Linear with the weight
transposed) are turned into Linear layers first, and a Linear whose weight is shared with
another layer (tied embeddings) is left alone, since quantizing one of the pair would store
the weight twice.
"""

from __future__ import annotations

import copy
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

PtqMode = Literal["int8_weight_only", "int8_dynamic"]
MODES: dict[str, str] = {
    "int8_weight_only": "int8 weights (per output channel), float activations",
    "int8_dynamic": "int8 weights and int8 activations quantized on the fly per token",
}


def import_torchao() -> None:
    """Import torchao without its import-time noise (CUDA kernels that a CPU build cannot load)."""
    # torchao logs "Failed to load ..._C_cutlass..." for each CUDA-only library, and torch
    # warns about an Enum torchao registers: warnings about nothing the user can act on.
    names = ("torchao", "torch.utils._pytree")
    levels = [logging.getLogger(name).level for name in names]
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import torchao.quantization  # noqa: F401
    finally:
        for name, level in zip(names, levels, strict=True):
            logging.getLogger(name).setLevel(level)


def linear_from_conv1d(model: torch.nn.Module) -> int:
    """Replace transformers' `Conv1D` layers by equivalent `torch.nn.Linear` layers in place; return how many."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            weight, bias = getattr(child, "weight", None), getattr(child, "bias", None)
            if type(child).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
                setattr(parent, name, _as_linear(weight, bias if isinstance(bias, torch.Tensor) else None))
                replaced += 1
    return replaced


def _as_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    nx, nf = weight.shape  # Conv1D computes x @ W + b with W of shape (in, out); Linear stores W.T
    linear = torch.nn.Linear(nx, nf, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if bias is not None:
            linear.bias.copy_(bias)
    linear.requires_grad_(weight.requires_grad)
    return linear


def untied_linear_filter(model: torch.nn.Module) -> Callable[[torch.nn.Module, str], bool]:
    """Return a `quantize_` filter that picks Linear layers whose weight no other layer holds."""
    holders: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            holders[id(param)] = holders.get(id(param), 0) + 1

    def keep(module: torch.nn.Module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and holders.get(id(module.weight), 0) <= 1

    return keep


def _ptq_config(mode: str) -> Any:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if mode == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if mode == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    raise ValueError(f"quantize(mode={mode!r}): unknown mode; use one of {', '.join(MODES)}")


def size_on_disk(model: torch.nn.Module) -> int:
    """Return the bytes `torch.save(model.state_dict())` writes."""
    handle, path = tempfile.mkstemp(suffix=".pt")
    os.close(handle)
    try:
        torch.save(model.state_dict(), path)
        return os.path.getsize(path)
    finally:
        os.unlink(path)


def forward_seconds(model: torch.nn.Module, batch: Any, repeats: int) -> float:
    """Return the median wall time of `repeats` forward passes of `batch` (after one warm-up pass)."""
    def call() -> Any:
        if isinstance(batch, dict):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        return model(batch)

    times = []
    with torch.inference_mode():
        call()  # the first pass pays for lazy initialisation; it is not what a user waits for later
        for _ in range(repeats):
            begun = time.perf_counter()
            call()
            times.append(time.perf_counter() - begun)
    return statistics.median(times)


@dataclass
class QuantizationReport:
    """What `quantize` made: the quantized copy and its size, eval loss and speed against the original."""

    model: torch.nn.Module
    mode: str
    quantized_layers: int
    size_before: int
    size_after: int
    eval_before: float | None
    eval_after: float | None
    forward_before_s: float | None
    forward_after_s: float | None

    @property
    def table(self) -> Any:
        """Return the before/after figures as a pandas DataFrame (one row each)."""
        import pandas as pd

        rows = [("before (float)", self.size_before, self.eval_before, self.forward_before_s),
                (f"after ({self.mode})", self.size_after, self.eval_after, self.forward_after_s)]
        frame = pd.DataFrame(
            [{"model": name, "size_mib": size / 2**20, "eval_loss": loss,
              "forward_ms": None if seconds is None else seconds * 1e3} for name, size, loss, seconds in rows])
        return frame.set_index("model")

    def summary(self) -> str:
        """Return one line: how much smaller, the eval-loss change and the speed ratio."""
        parts = [f"{self.quantized_layers} Linear layers -> {self.mode}",
                 f"size x{self.size_after / self.size_before:.2f}"]
        if self.eval_before is not None and self.eval_after is not None:
            parts.append(f"eval loss {self.eval_after - self.eval_before:+.4f}")
        if self.forward_before_s and self.forward_after_s:
            parts.append(f"forward time x{self.forward_after_s / self.forward_before_s:.2f}")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"QuantizationReport: {self.summary()}\n{self.table.to_string(float_format=lambda v: f'{v:.4g}')}"

    def _repr_html_(self) -> str:
        table = self.table.to_html(float_format=lambda v: f"{v:.4g}", na_rep="—")
        return f"<div><b>QuantizationReport</b>: {self.summary()}{table}</div>"


def quantize(model: torch.nn.Module, mode: PtqMode = "int8_weight_only",
             eval_fn: Callable[[torch.nn.Module], float | torch.Tensor] | None = None, example_batch: Any = None,
             repeats: int = 10) -> QuantizationReport:
    """Quantize a copy of `model` with torchao and report size, eval loss and speed before and after.

    `eval_fn(model)` returns a loss (called on the original and on the copy, in eval mode);
    `example_batch` is what a forward pass gets: a dict (`model(**batch)`), a tuple of
    positional arguments (`model(*batch)`) or one tensor (`model(batch)`). The original model
    is left unchanged.

    >>> report = quantize(torch.nn.Sequential(torch.nn.Linear(64, 64)), "int8_dynamic")
    >>> report.size_after < report.size_before
    True
    """
    import_torchao()
    from torchao.quantization import quantize_

    config = _ptq_config(mode)
    was_training = model.training
    model.eval()
    quantized = copy.deepcopy(model)
    linear_from_conv1d(quantized)
    keep = untied_linear_filter(quantized)
    layers = sum(1 for fqn, m in quantized.named_modules() if keep(m, fqn))
    if layers == 0:
        raise ValueError("quantize found no torch.nn.Linear layer (with a weight of its own) to quantize")
    quantize_(quantized, config, filter_fn=keep)
    try:
        return QuantizationReport(
            model=quantized, mode=mode, quantized_layers=layers,
            size_before=size_on_disk(model), size_after=size_on_disk(quantized),
            eval_before=_evaluate(eval_fn, model), eval_after=_evaluate(eval_fn, quantized),
            forward_before_s=None if example_batch is None else forward_seconds(model, example_batch, repeats),
            forward_after_s=None if example_batch is None else forward_seconds(quantized, example_batch, repeats))
    finally:
        model.train(was_training)


def _evaluate(eval_fn: Callable[[torch.nn.Module], float | torch.Tensor] | None, model: torch.nn.Module) -> float | None:
    if eval_fn is None:
        return None
    with torch.no_grad():
        value = eval_fn(model)
    return float(value.item() if isinstance(value, torch.Tensor) else value)
