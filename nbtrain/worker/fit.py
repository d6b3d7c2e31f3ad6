"""The managed training loop behind `bigtrain.fit`, and weight consolidation."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from nbtrain.worker import qat
from nbtrain.worker.context import meta_copy

if TYPE_CHECKING:
    from nbtrain.worker.context import BigTrain


@dataclass
class FitResult:
    """What `bigtrain.fit` returns; `state_dict` and `model` are set on rank 0 only."""

    steps: int
    final_loss: float | None
    eval_loss: float | None
    state_dict: dict[str, torch.Tensor] | None
    model: torch.nn.Module | None

    def __repr__(self) -> str:
        held = "with weights" if self.state_dict is not None else "weights on rank 0"
        return (f"FitResult(steps={self.steps}, final_loss={_fmt(self.final_loss)}, "
                f"eval_loss={_fmt(self.eval_loss)}, {held})")


def _fmt(value: float | None) -> str:
    return "None" if value is None else f"{value:.4f}"


def batch_loss(model: Any, batch: Any, loss_fn: Callable[..., Any] | None) -> torch.Tensor:
    """Return the scalar loss of one batch."""
    if loss_fn is not None:
        return loss_fn(model, batch)
    if not isinstance(batch, Mapping):
        raise TypeError("without loss_fn, batches must be dicts and model(**batch) must return the loss; "
                        f"got a {type(batch).__name__} batch. Pass loss_fn=lambda model, batch: ...")
    out = model(**batch)
    loss = getattr(out, "loss", out)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("model(**batch) must return a scalar loss or an object with .loss; "
                        "pass loss_fn=lambda model, batch: ... otherwise")
    return loss


def mean_over_ranks(value: float, device: torch.device) -> float:
    """Return the mean of `value` over all ranks (one small all-reduce)."""
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def _count_tokens(batch: Any) -> int:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


def fit(bt: BigTrain, model: torch.nn.Module, data: Any, loss_fn: Callable[..., Any] | None = None,
        eval_data: Any = None) -> FitResult:
    """Train with the engine's optimizer and scheduler; log the rank-averaged loss each step.

    Every batch reaches the model on `bt.device`, floating-point tensors in the engine's dtype.
    """
    engine, loader = bt.prepare(model, data)
    grad_accum = engine.gradient_accumulation_steps()
    eval_losses: list[float] = []
    if eval_data is not None:
        loader.epoch_end_callbacks.append(
            lambda epoch: eval_losses.append(_evaluate(bt, engine, eval_data, loss_fn, epoch)))
    window: list[float] = []
    final_loss = None
    engine.train()
    for batch in loader:
        loss = batch_loss(engine, batch, loss_fn)
        engine.backward(loss)
        window.append(float(loss.detach().float().item()))
        bt.tokens_in_step += _count_tokens(batch)
        engine.step()
        if len(window) == grad_accum:
            final_loss = mean_over_ranks(sum(window) / grad_accum, bt.device)
            window.clear()
            if bt.is_main:
                bt.log(loss=final_loss)
    state_dict = consolidated_state_dict(engine, keep=bt.is_main)
    trained = load_into(bt, model, state_dict) if bt.is_main else None
    return FitResult(steps=int(engine.global_steps), final_loss=final_loss,
                     eval_loss=eval_losses[-1] if eval_losses else None,
                     state_dict=state_dict, model=trained)


@torch.no_grad()
def _evaluate(bt: BigTrain, engine: Any, eval_data: Any, loss_fn: Callable[..., Any] | None, epoch: int) -> float:
    from nbtrain.worker.batches import input_dtype
    from nbtrain.worker.data import MicroBatchLoader, batches_per_epoch

    micro = engine.train_micro_batch_size_per_gpu()
    count = batches_per_epoch(eval_data, micro, bt.world_size)
    loader = MicroBatchLoader(eval_data, rank=bt.rank, world_size=bt.world_size, micro_batch=micro, grad_accum=1,
                              max_steps=count, seed=bt.seed, device=bt.device, dtype=input_dtype(engine))
    engine.eval()
    total = sum(float(batch_loss(engine, batch, loss_fn).float().item()) for batch in loader)
    engine.train()
    value = mean_over_ranks(total / max(count, 1), bt.device)
    if bt.is_main:
        bt.log(eval_loss=value, epoch=epoch)
    return value


def consolidated_state_dict(engine: Any, keep: bool) -> dict[str, torch.Tensor] | None:
    """Return the full fp32 weights on CPU (where `keep`), ZeRO-3 partitions gathered.

    Every rank must call this: under ZeRO-3 each parameter is gathered collectively.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    keys = list(module.state_dict().keys())
    by_name = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers())
    full_by_id: dict[int, torch.Tensor] = {}
    result: dict[str, torch.Tensor] = {}
    for name in keys:
        if name in by_name:
            param = by_name[name]
            if id(param) not in full_by_id:
                full = safe_get_full_fp32_param(param)
                tensor = (full if full is not None else param).detach().float().cpu()
                full_by_id[id(param)] = tensor.clone() if keep else tensor
            if keep:
                result[name] = full_by_id[id(param)]
        elif keep and name in buffers:
            result[name] = buffers[name].detach().cpu().clone()
    return result if keep else None


def load_into(bt: BigTrain, model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """Return the pre-training copy of `model` holding `state_dict` (a CPU module; quantized under --qat)."""
    skeleton = bt._skeletons[id(model)]
    if qat.is_on(bt._cfg):  # convert a fresh copy: the skeleton may be loaded again (fit, then --out)
        skeleton = meta_copy(skeleton)
    skeleton.load_state_dict(state_dict or {}, strict=False, assign=True)
    tie_weights = getattr(skeleton, "tie_weights", None)  # transformers models share embeddings
    if callable(tie_weights):
        tie_weights()
    return qat.convert(skeleton, str(bt._cfg.qat)) if qat.is_on(bt._cfg) else skeleton


def consolidated_model(bt: BigTrain, model: torch.nn.Module | None) -> torch.nn.Module | None:
    """Gather the prepared model's weights (all ranks) and return the full model on rank 0."""
    assert model is not None
    state_dict = consolidated_state_dict(bt.engine, keep=bt.is_main)
    return load_into(bt, model, state_dict) if bt.is_main else None
