"""The micro-batch loader each rank trains on.

- A map-style Dataset is shuffled each epoch from the seed (the same order on every
  rank), split across ranks without overlap, and batched at the micro-batch size.
- A DataLoader keeps its own order; its batches are dealt out to the ranks in turn.
The loader ends after `max_steps` optimizer steps (x grad-accum micro-batches), going
round the data as often as needed; every rank yields the same number of micro-batches,
so no rank waits in a collective for one that has run out.
A resumed run starts `start` micro-batches in (the ones trained before the checkpoint),
in the epoch and at the place where the interrupted run was.
Each micro-batch is put on `device` with floating-point inputs in `dtype`
(`nbtrain.worker.batches`); without a device it comes as the data give it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from nbtrain.worker.batches import to_device


def batches_per_epoch(data: Any, micro_batch: int, world_size: int) -> int:
    """Return how many micro-batches each rank gets from one pass over `data`."""
    if isinstance(data, DataLoader):
        return len(data) // world_size
    return (len(data) // world_size) // micro_batch


class MicroBatchLoader:
    """Iterate this rank's micro-batches for a whole run (all epochs)."""

    def __init__(self, data: Any, *, rank: int, world_size: int, micro_batch: int, grad_accum: int,
                 max_steps: int, seed: int, collate_fn: Callable[[list[Any]], Any] | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None, start: int = 0,
                 epoch_rng: torch.Tensor | None = None):
        self.data, self.rank, self.world_size = data, rank, world_size
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.max_steps, self.seed = max_steps, seed
        self.collate_fn = collate_fn or torch.utils.data.default_collate
        self.device, self.dtype = device, dtype
        self.per_epoch = batches_per_epoch(data, micro_batch, world_size)
        if self.per_epoch == 0:
            raise ValueError(
                f"the data gives no complete micro-batch per rank: {_size(data)} with micro-batch "
                f"{micro_batch} on {world_size} ranks. Use more data or a smaller --micro-batch.")
        self.epoch = 0
        self.epoch_end_callbacks: list[Callable[[int], None]] = []
        # Micro-batches yielded since the run began (a resumed run starts at `start`); with
        # `epoch_rng`, the torch RNG state when the current epoch began, for a checkpoint.
        self.start = self.position = start
        self.epoch_rng = epoch_rng

    def __len__(self) -> int:
        return max(0, self.max_steps * self.grad_accum - self.start)

    def __iter__(self) -> Iterator[Any]:
        remaining = len(self)
        self.epoch, skip = divmod(self.start, self.per_epoch)
        self.position = self.start
        while remaining > 0:
            for batch in self._epoch_batches(self.epoch, skip):
                self.position += 1
                yield batch if self.device is None else to_device(batch, self.device, self.dtype)
                remaining -= 1
                if remaining == 0:
                    break
            skip = 0
            self._end_epoch()  # a full pass, or the run's end part-way through one

    def _end_epoch(self) -> None:
        for callback in self.epoch_end_callbacks:
            callback(self.epoch)
        self.epoch += 1

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[Any]:
        if isinstance(self.data, DataLoader):
            yield from self._dataloader_batches(skip)
            return
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.data), generator=generator).tolist()
        mine = order[self.rank::self.world_size][: self.per_epoch * self.micro_batch]
        for start in range(skip * self.micro_batch, len(mine), self.micro_batch):
            yield self.collate_fn([self.data[i] for i in mine[start:start + self.micro_batch]])

    def _dataloader_batches(self, skip: int) -> Iterator[Any]:
        """Deal out the DataLoader's batches; a resumed epoch replays its shuffle, then skips."""
        # A shuffling DataLoader draws its order from the torch RNG when its epoch starts
        # (on the first batch): a resumed epoch draws it from the state the epoch began with.
        resumed = self.epoch_rng if skip and self.epoch_rng is not None else None
        now = torch.get_rng_state()
        self.epoch_rng = now if resumed is None else resumed
        if resumed is not None:
            torch.set_rng_state(resumed)
        batches = iter(self.data)
        first = next(batches, None)
        if resumed is not None:
            torch.set_rng_state(now)  # the state the checkpoint had, after that draw
        if first is None:
            return
        for i, batch in enumerate(_chain(first, batches)):
            if i >= self.per_epoch * self.world_size:
                return
            if i % self.world_size == self.rank and i // self.world_size >= skip:
                yield batch


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _size(data: Any) -> str:
    try:
        return f"{len(data)} {'batches' if isinstance(data, DataLoader) else 'samples'}"
    except TypeError:
        return "data without a length"


def is_supported(data: Any) -> bool:
    """Return whether `data` is a map-style Dataset or a DataLoader."""
    return isinstance(data, (DataLoader, Dataset)) or (hasattr(data, "__len__") and hasattr(data, "__getitem__"))
