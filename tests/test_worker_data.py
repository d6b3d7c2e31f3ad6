"""The micro-batch loader each rank trains on (nbtrain/worker/data.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from nbtrain.worker.data import MicroBatchLoader, batches_per_epoch, is_supported


class Indices(Dataset):
    """Sample i is the number i: batches show which samples a rank got."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


def loaders(data: Any, world_size: int, **kw: Any) -> list[MicroBatchLoader]:
    settings = {"micro_batch": 4, "grad_accum": 1, "max_steps": 5, "seed": 0, **kw}
    return [MicroBatchLoader(data, rank=r, world_size=world_size, **settings) for r in range(world_size)]


def samples(batches: list[torch.Tensor]) -> list[int]:
    return [int(i) for batch in batches for i in batch]


def test_ranks_share_an_epoch_without_overlap() -> None:
    data = Indices(40)
    per_rank = [samples(list(loader)) for loader in loaders(data, 2, max_steps=5)]  # exactly one epoch
    assert set(per_rank[0]).isdisjoint(per_rank[1]), "two ranks trained on the same sample"
    assert sorted(per_rank[0] + per_rank[1]) == list(range(40)), "an epoch must cover the data once"


def test_every_rank_yields_the_same_number_of_micro_batches() -> None:
    # 37 samples on 3 ranks at micro-batch 4: a rank that ran out first would hang the others.
    counts = [len(list(loader)) for loader in loaders(Indices(37), 3, max_steps=7, grad_accum=2)]
    assert counts == [14, 14, 14]
    assert all(len(batch) == 4 for loader in loaders(Indices(37), 3) for batch in loader), "no short batch"


def test_the_loader_ends_after_max_steps_times_grad_accum_going_round_the_data() -> None:
    (loader,) = loaders(Indices(16), 1, max_steps=7, grad_accum=3)  # 4 micro-batches per epoch
    batches = list(loader)
    assert len(loader) == len(batches) == 21
    assert loader.epoch == 6, "21 micro-batches of 4 per epoch span 6 epochs"


def test_each_epoch_is_reshuffled_from_the_seed() -> None:
    def epochs(seed: int) -> list[list[int]]:
        (loader,) = loaders(Indices(32), 1, max_steps=24, micro_batch=4, seed=seed)  # 3 epochs of 8
        order = samples(list(loader))
        return [order[i:i + 32] for i in range(0, 96, 32)]

    first = epochs(seed=0)
    assert first[0] != first[1] != first[2], "the data order must change every epoch"
    assert all(sorted(e) == list(range(32)) for e in first)
    assert epochs(seed=0) == first, "the same seed must give the same order"
    assert epochs(seed=1) != first, "another seed must give another order"


def test_epoch_end_callbacks_see_every_epoch_including_a_partial_last_one() -> None:
    (loader,) = loaders(Indices(16), 1, max_steps=10)  # 4 per epoch: 4 + 4 + 2
    seen: list[int] = []
    loader.epoch_end_callbacks.append(seen.append)
    list(loader)
    assert seen == [0, 1, 2]


def test_a_dataloader_keeps_its_order_and_deals_batches_to_ranks() -> None:
    data = DataLoader(Indices(50), batch_size=5)  # 10 batches, in order
    per_rank = [[int(b[0]) // 5 for b in loader] for loader in loaders(data, 3, max_steps=3)]
    # 10 batches on 3 ranks: 3 each, the 10th left out so that every rank has as many.
    assert per_rank == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]


def test_a_dataloader_s_batches_are_used_as_they_are() -> None:
    def collate(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"x": torch.stack(items)}

    data = DataLoader(Indices(12), batch_size=3, collate_fn=collate)
    (loader,) = loaders(data, 1, max_steps=2, micro_batch=99)
    assert [b["x"].tolist() for b in loader] == [[0, 1, 2], [3, 4, 5]]


def test_batches_per_epoch() -> None:
    assert batches_per_epoch(Indices(37), micro_batch=4, world_size=3) == 3
    assert batches_per_epoch(DataLoader(Indices(50), batch_size=5), micro_batch=4, world_size=3) == 3


def test_too_little_data_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no complete micro-batch per rank: 6 samples with micro-batch 4 on 2 ranks"):
        loaders(Indices(6), 2)


def test_floating_point_inputs_are_cast_to_the_training_dtype() -> None:
    class Pairs(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.randn(3), torch.tensor(i)

    (loader,) = loaders(Pairs(), 1, max_steps=1, device=torch.device("cpu"), dtype=torch.bfloat16)
    x, y = next(iter(loader))
    assert (x.dtype, y.dtype) == (torch.bfloat16, torch.int64), "labels must keep their integer type"


def test_custom_collate_fn_is_used() -> None:
    (summed,) = loaders(Indices(8), 1, max_steps=2, collate_fn=lambda items: sum(int(i) for i in items))
    (plain,) = loaders(Indices(8), 1, max_steps=2)
    assert list(summed) == [int(batch.sum()) for batch in plain]


def test_supported_data() -> None:
    assert is_supported(Indices(3)) and is_supported(DataLoader(Indices(3))) and is_supported([1, 2])
    assert not is_supported(iter([1, 2]))
