"""Put a batch where the engine computes: on the rank's device, floating point in the engine's dtype.

DeepSpeed casts the model to bf16/fp16, not its inputs, and moves neither: a batch straight
from a CPU collate would meet cuda weights ("Expected all tensors to be on the same device")
or fp32 inputs would meet bf16 weights. Integer tensors (token ids, labels) keep their dtype.

accelerate's `send_to_device` walks lists, tuples and mappings but neither dataclasses nor
dtypes, hence this small walker of our own.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch


def to_device(batch: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Return `batch` with every tensor on `device` and every floating-point tensor in `dtype`.

    Tensors may be nested in dicts (and other mappings, e.g. transformers' BatchEncoding, kept
    as their type), tuples (namedtuples too), lists and dataclasses; anything else is left as
    it is. From CPU to CUDA the copy goes through pinned memory and does not block.

    >>> to_device({"x": torch.ones(2), "ids": torch.tensor([1])}, "meta", torch.bfloat16)["x"].dtype
    torch.bfloat16
    """
    device = torch.device(device)
    if isinstance(batch, torch.Tensor):
        return _move(batch, device, dtype)
    if isinstance(batch, torch.nn.utils.rnn.PackedSequence):  # its own .to keeps batch_sizes on the CPU
        moved = batch.to(device=device)  # type: ignore[call-arg]  # typed as Tensor.to's first overload only
        return moved._replace(data=_move(moved.data, device, dtype))
    if isinstance(batch, Mapping):
        return _rebuilt_mapping(batch, {k: to_device(v, device, dtype) for k, v in batch.items()})
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {f.name: to_device(getattr(batch, f.name), device, dtype)
                   for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **changes)
    if isinstance(batch, (tuple, list)):
        items = [to_device(v, device, dtype) for v in batch]
        if hasattr(batch, "_fields"):  # a namedtuple takes its fields as arguments
            return type(batch)(*items)
        try:
            return type(batch)(items)
        except TypeError:  # a subclass with another constructor
            return tuple(items) if isinstance(batch, tuple) else items
    return batch


def input_dtype(engine: Any) -> torch.dtype | None:
    """Return the dtype the engine's weights train in when it is not fp32 (bf16 or fp16), else None."""
    return precision_dtype(bf16=engine.bfloat16_enabled(), fp16=engine.fp16_enabled())


def precision_dtype(*, bf16: bool, fp16: bool) -> torch.dtype | None:
    """Return the inputs' dtype for a bf16 or fp16 run, None for fp32."""
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else None


def pinned_copy(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether a copy of `tensor` to `device` goes through pinned memory, without blocking."""
    return device.type == "cuda" and tensor.device.type == "cpu"


def _move(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    if pinned_copy(tensor, device):
        # Only page-locked memory can be copied while the CPU goes on (to the next step).
        source = tensor if tensor.is_pinned() else tensor.pin_memory()
        tensor = source.to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)  # cast where the tensor now is: on a GPU, not on the CPU that feeds it
    return tensor


def _rebuilt_mapping(original: Mapping[Any, Any], moved: dict[Any, Any]) -> Mapping[Any, Any]:
    if type(original) is dict:
        return moved
    try:  # keep the mapping's type and its other attributes (a BatchEncoding's encodings)
        rebuilt = copy.copy(original)
        rebuilt.update(moved)  # type: ignore[attr-defined]
        return rebuilt
    except (TypeError, AttributeError):  # read-only or uncopyable mappings
        return moved
