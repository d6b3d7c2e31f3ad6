"""The LR preview is DeepSpeed's own schedule: compare it with DeepSpeed's schedulers stepped one by one."""

from __future__ import annotations

import pytest
import torch
from deepspeed.runtime import lr_schedules

from nbtrain.config.schedules import ScheduleError, lr_curve, sample_steps

SCHEDULES = {
    "WarmupLR": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 30, "warmup_type": "log"},
    "WarmupDecayLR": {"warmup_min_lr": 0.001, "warmup_max_lr": 0.01, "warmup_num_steps": 20,
                      "warmup_type": "linear", "total_num_steps": 120},
    "WarmupCosineLR": {"warmup_min_ratio": 0.1, "warmup_num_steps": 15, "cos_min_ratio": 0.01,
                       "total_num_steps": 120},
    "OneCycle": {"cycle_min_lr": 0.0004, "cycle_max_lr": 0.01, "cycle_first_step_size": 40,
                 "cycle_second_step_size": 30, "cycle_first_stair_count": 4, "decay_lr_rate": 0.5,
                 "decay_step_size": 10},
    "LRRangeTest": {"lr_range_test_min_lr": 1e-5, "lr_range_test_step_size": 10,
                    "lr_range_test_step_rate": 2.0, "lr_range_test_staircase": True},
}


def deepspeed_config(kind: str, params: dict) -> dict:
    return {"optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.0}},
            "scheduler": {"type": kind, "params": dict(params)}}


def stepped_one_by_one(kind: str, params: dict, steps: int) -> list[float]:
    """Return the LR each optimizer step uses, driving DeepSpeed's scheduler the way its engine does."""
    weight = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.AdamW([weight], lr=0.01)
    scheduler = getattr(lr_schedules, kind)(optimizer, **params)
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_curve_is_deepspeeds_scheduler_step_by_step(kind: str) -> None:
    expected = stepped_one_by_one(kind, SCHEDULES[kind], 150)
    curve = lr_curve(deepspeed_config(kind, SCHEDULES[kind]), 150)
    assert curve.steps == tuple(range(1, 151))
    assert list(curve.lrs) == pytest.approx(expected, rel=1e-12, abs=0), f"{kind} preview differs from DeepSpeed"
    assert len(set(curve.lrs)) > 5, f"{kind} preview is flat: {curve.lrs[:10]}"


def test_long_runs_are_sampled_at_exact_steps() -> None:
    params = {**SCHEDULES["WarmupCosineLR"], "total_num_steps": 5000, "warmup_num_steps": 300}
    expected = stepped_one_by_one("WarmupCosineLR", params, 5000)
    curve = lr_curve(deepspeed_config("WarmupCosineLR", params), 5000, points=200)
    assert len(curve.steps) == 200 and curve.steps[0] == 1 and curve.steps[-1] == 5000
    for step, lr in zip(curve.steps, curve.lrs, strict=True):
        assert lr == pytest.approx(expected[step - 1], rel=1e-12), f"step {step}"


def test_no_scheduler_is_the_constant_optimizer_lr() -> None:
    curve = lr_curve({"optimizer": {"type": "AdamW", "params": {"lr": 0.003}}}, 10)
    assert curve.scheduler == "constant" and set(curve.lrs) == {0.003}


def test_sgd_momentum_reaches_one_cycle_like_deepspeed() -> None:
    ds = {"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
          "scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1,
                                                        "cycle_first_step_size": 5}}}
    assert lr_curve(ds, 12).at(6) == pytest.approx(0.1)


def test_parameters_deepspeed_refuses_are_a_problem_naming_the_scheduler() -> None:
    ds = deepspeed_config("WarmupLR", {"warmup_num_steps": 0})
    with pytest.raises(ScheduleError) as caught:
        lr_curve(ds, 10)
    problem = caught.value.problem
    assert problem.where == "scheduler.params" and "WarmupLR" in problem.rule and "positive" in problem.rule


def test_sample_steps_keeps_both_ends_and_never_repeats() -> None:
    assert sample_steps(5, 10) == [1, 2, 3, 4, 5]
    steps = sample_steps(10_001, 7)
    assert steps[0] == 1 and steps[-1] == 10_001 and len(steps) == 7 and steps == sorted(set(steps))
