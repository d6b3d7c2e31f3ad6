"""Compute the learning rate of every optimizer step with DeepSpeed's own scheduler classes.

The config panel's LR preview must be what training will do, not a re-implementation, so
the curve comes from `deepspeed.runtime.lr_schedules` driving a one-parameter torch
optimizer, built the way DeepSpeed's engine builds it (`scheduler(optimizer, **params)`).
torch and deepspeed are imported on first use only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from nbtrain.config.render import get_path
from nbtrain.config.tree import DEFAULT_LR
from nbtrain.errors import Problem

# A preview never needs more points than a plot has pixels; longer runs are sampled.
MAX_POINTS = 1000


@dataclass(frozen=True)
class LrCurve:
    """The LR that optimizer step `steps[i]` (1-based) uses is `lrs[i]`."""

    steps: tuple[int, ...]
    lrs: tuple[float, ...]
    scheduler: str  # the DeepSpeed class name, or "constant"

    def at(self, step: int) -> float:
        """Return the LR of one of the computed steps."""
        return self.lrs[self.steps.index(step)]


class ScheduleError(ValueError):
    """DeepSpeed's scheduler refused its parameters; carries the problem for the user."""

    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem


def sample_steps(total: int, points: int = MAX_POINTS) -> list[int]:
    """Return the 1-based steps to evaluate: all of them, or `points` evenly spread with the ends."""
    if total <= points:
        return list(range(1, total + 1))
    stride = (total - 1) / (points - 1)
    return sorted({1 + round(i * stride) for i in range(points)})


def dummy_optimizer(ds: Mapping[str, Any]) -> Any:
    """Return a torch optimizer over one tensor with the config's LR (and betas/momentum)."""
    import torch

    params = dict(get_path(ds, "optimizer.params", {}) or {})
    lr = params.get("lr", DEFAULT_LR)
    weights = [torch.zeros(1, requires_grad=True)]
    kind = str(get_path(ds, "optimizer.type", "adamw")).lower()
    if kind == "sgd":
        return torch.optim.SGD(weights, lr=lr, momentum=params.get("momentum", 0.0))
    # Adam, AdamW and Lamb all carry `betas`, which OneCycle's cyclic momentum reads.
    return torch.optim.AdamW(weights, lr=lr, betas=tuple(params.get("betas", (0.9, 0.999))))


@contextlib.contextmanager
def _quiet_deepspeed() -> Iterator[None]:
    # The schedulers warn "before it has started" when asked for the initial LR, which is
    # exactly what a step-1 preview asks; the warning would only confuse the notebook.
    # Import first: DeepSpeed sets its logger's level when it creates it.
    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def lr_curve(ds: Mapping[str, Any], total_steps: int, points: int = MAX_POINTS) -> LrCurve:
    """Return the LR each optimizer step of a `total_steps` run uses under the DeepSpeed dict `ds`.

    Step 1 uses the LR the scheduler set when it was built; DeepSpeed's engine calls
    `scheduler.step()` after every optimizer step, so step s uses the LR after s-1 calls.
    Raises ScheduleError where DeepSpeed refuses the scheduler's parameters.

    >>> ds = {"optimizer": {"type": "AdamW", "params": {"lr": 0.1}},
    ...       "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10, "warmup_type": "linear"}}}
    >>> lr_curve(ds, 12).at(6)                                  # doctest: +SKIP
    0.05
    """
    steps = sample_steps(total_steps, points)
    kind = get_path(ds, "scheduler.type")
    if kind is None:
        lr = float(get_path(ds, "optimizer.params.lr", DEFAULT_LR))
        return LrCurve(tuple(steps), tuple(lr for _ in steps), "constant")
    from deepspeed.runtime import lr_schedules

    with _quiet_deepspeed():
        optimizer = dummy_optimizer(ds)
        params = dict(get_path(ds, "scheduler.params", {}) or {})
        try:
            scheduler = getattr(lr_schedules, str(kind))(optimizer, **params)
        except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
            raise ScheduleError(Problem("scheduler.params", params, f"DeepSpeed's {kind} refuses them: {e}",
                                        "change the scheduler parameters")) from e
        lrs = []
        for step in steps:
            if step > 1:
                # The schedulers are functions of their iteration count: jumping straight to
                # iteration step-2 gives the LR that s-1 single steps would (tests check it).
                scheduler.step(step - 2)
            lrs.append(float(optimizer.param_groups[0]["lr"]))
    return LrCurve(tuple(steps), tuple(lrs), str(kind))
