"""Batches put on the rank's device in the engine's dtype (nbtrain/worker/batches.py).

Regression (issue 14): on a GPU, `bigtrain.fit(model, data)` with dict batches failed with
"Expected all tensors to be on the same device ... index is on cpu": neither fit nor the loader
of prepare moved batches, and only bf16 (not fp16) inputs were cast. The "meta" device stands in
for a GPU here: a tensor that reaches it was moved.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple
from typing import Any

import pytest
import torch

from nbtrain.worker.batches import pinned_copy, to_device
from nbtrain.worker.data import MicroBatchLoader

Pair = namedtuple("Pair", ["inputs", "labels"])


@dataclasses.dataclass(frozen=True)
class Features:
    pixels: torch.Tensor
    mask: torch.Tensor
    name: str = "sample"


class Encoding(OrderedDict):
    """A mapping subclass with its own attribute, like transformers' BatchEncoding."""

    note = "kept"


def nested_batch() -> dict[str, Any]:
    return {
        "x": torch.randn(2, 3),
        "input_ids": torch.tensor([[1, 2, 3]]),
        "pair": Pair(torch.randn(2), torch.tensor([0, 1])),
        "features": Features(torch.randn(2, 2), torch.tensor([True, False])),
        "more": [torch.randn(1, dtype=torch.float64), (torch.tensor([7]), "text")],
        "encoding": Encoding(attention_mask=torch.ones(2, 3, dtype=torch.long), embeds=torch.randn(2, 3)),
        "step": 3,
    }


def leaves(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in leaves(v)]
    if dataclasses.is_dataclass(batch):
        return [t for f in dataclasses.fields(batch) for t in leaves(getattr(batch, f.name))]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in leaves(v)]
    return []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, None], ids=["bf16", "fp16", "fp32"])
def test_every_nested_tensor_moves_and_floats_take_the_engines_dtype(dtype: torch.dtype | None) -> None:
    batch = nested_batch()
    moved = to_device(batch, "meta", dtype)
    assert all(t.device.type == "meta" for t in leaves(moved)), "a tensor of the batch stayed on the CPU"
    assert len(leaves(moved)) == len(leaves(batch)) == 10
    for before, after in zip(leaves(batch), leaves(moved), strict=True):
        if before.is_floating_point():
            assert after.dtype == (dtype or before.dtype), f"{before.dtype} input became {after.dtype}"
        else:
            assert after.dtype == before.dtype, "integer and bool tensors (token ids, masks) must never be cast"


def test_containers_keep_their_types_and_other_values() -> None:
    moved = to_device(nested_batch(), "meta", torch.bfloat16)
    assert type(moved["pair"]) is Pair and moved["pair"]._fields == ("inputs", "labels")
    assert type(moved["features"]) is Features and moved["features"].name == "sample"
    assert type(moved["encoding"]) is Encoding and moved["encoding"].note == "kept"
    assert isinstance(moved["more"], list) and type(moved["more"][1]) is tuple and moved["more"][1][1] == "text"
    assert moved["step"] == 3


def test_a_batch_already_in_place_is_not_copied() -> None:
    x = torch.randn(3)
    assert to_device({"x": x}, "cpu")["x"] is x


def test_a_read_only_mapping_comes_back_as_a_dict() -> None:
    import types

    moved = to_device(types.MappingProxyType({"x": torch.ones(1)}), "meta")
    assert moved["x"].device.type == "meta"


def test_only_cpu_to_cuda_copies_go_through_pinned_memory() -> None:
    assert pinned_copy(torch.ones(1), torch.device("cuda:0"))
    assert not pinned_copy(torch.ones(1), torch.device("cpu"))
    assert not pinned_copy(torch.ones(1, device="meta"), torch.device("cuda:0"))


def test_the_loader_moves_its_batches_and_without_a_device_leaves_them_alone() -> None:
    class Samples(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": torch.randn(4), "input_ids": torch.tensor([i, i])}

    def first(**kw: Any) -> dict[str, torch.Tensor]:
        loader = MicroBatchLoader(Samples(), rank=0, world_size=1, micro_batch=2, grad_accum=1, max_steps=1,
                                  seed=0, **kw)
        return next(iter(loader))

    moved = first(device=torch.device("meta"), dtype=torch.float16)
    assert (moved["x"].device.type, moved["x"].dtype) == ("meta", torch.float16)
    assert (moved["input_ids"].device.type, moved["input_ids"].dtype) == ("meta", torch.int64)
    raw = first(dtype=torch.float16)  # device_placement=False: the batch as collated
    assert (raw["x"].device.type, raw["x"].dtype) == ("cpu", torch.float32)


def test_a_transformers_batch_encoding_stays_one() -> None:
    from transformers import BatchEncoding

    encoding = BatchEncoding({"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 2)})
    moved = to_device(encoding, "meta", torch.float16)
    assert type(moved) is BatchEncoding and moved.input_ids.device.type == "meta"
    assert (moved["input_ids"].dtype, moved["attention_mask"].dtype) == (torch.int64, torch.float16)
    assert encoding["input_ids"].device.type == "cpu", "the original batch must be left as it was"


def test_a_packed_sequence_keeps_its_batch_sizes_on_the_cpu() -> None:
    from torch.nn.utils.rnn import pack_sequence

    packed = pack_sequence([torch.randn(2, 2), torch.randn(3, 2)], enforce_sorted=False)
    moved = to_device(packed, "meta", torch.bfloat16)
    assert (moved.data.device.type, moved.data.dtype) == ("meta", torch.bfloat16)
    assert moved.sorted_indices.device.type == "meta" and moved.batch_sizes.device.type == "cpu"


@pytest.mark.gpu
def test_on_a_gpu_a_cpu_batch_arrives_whole_through_pinned_memory() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (make test-gpu)")
    batch = nested_batch()
    moved = to_device(batch, "cuda:0", torch.bfloat16)
    torch.cuda.synchronize()  # the copies did not block: wait for them before reading
    for before, after in zip(leaves(batch), leaves(moved), strict=True):
        assert after.device == torch.device("cuda:0")
        assert torch.equal(after.cpu(), before.to(after.dtype)), "a non-blocking copy changed the values"
    assert not batch["x"].is_pinned(), "the caller's tensor is left as it was"


def test_the_inputs_dtype_follows_the_precision_of_the_engine_or_of_the_config() -> None:
    from nbtrain.worker.batches import precision_dtype

    assert precision_dtype(bf16=True, fp16=False) is torch.bfloat16
    assert precision_dtype(bf16=False, fp16=True) is torch.float16
    assert precision_dtype(bf16=False, fp16=False) is None, "fp32 inputs must stay as they are"
