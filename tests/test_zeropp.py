"""ZeRO++ (`--quant qwz|qgz|qwz+qgz`, `--hpz N`) and `--qat` against every ZeRO stage: rendering,
validation, hpZ training for real on CPU, and qwZ/qgZ training where CUDA exists."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from nbtrain.config.arguments import parse_line
from nbtrain.config.machine import MachineFacts
from nbtrain.config.plan import plan_run
from nbtrain.config.render import get_path
from nbtrain.errors import ConfigError, Problem
from tests.conftest import losses
from tests.kernel import Kernel

CPU = MachineFacts(gpu_count=0, has_libaio=True)
GPU = MachineFacts(gpu_count=2, has_libaio=True)
STAGES = (0, 1, 2, 3)
QUANT = ("none", "qwz", "qgz", "qwz+qgz")
HPZ = (None, 1, 2, 3)
QAT = ("none", "int8", "int4")


def expected_problems(stage: int, quant: str, hpz: int | None, machine: MachineFacts) -> set[tuple[str, str]]:
    """Return (flag, rule fragment) of every problem the rules in DESIGN.md call for (2 processes)."""
    found = set()
    for part in ("qwz", "qgz"):
        if part in quant.split("+"):
            if stage != 3:
                found.add(("--quant", f"{part} needs ZeRO stage 3"))
            if not machine.cuda:
                found.add(("--quant", f"ZeRO++ {part} uses CUDA kernels"))
    if hpz is not None and hpz > 1:
        if stage != 3:
            found.add(("--hpz", "hpZ needs ZeRO stage 3"))
        if 2 % hpz:
            found.add(("--hpz", "must divide the processes per host (2)"))
    return found


def problems_of(line: str, machine: MachineFacts) -> list[Problem]:
    try:
        plan_run(parse_line(line), machine)
    except ConfigError as e:
        return list(e.problems)
    return []


COMBINATIONS = list(itertools.product(STAGES, QUANT, HPZ, QAT, ("cpu", "gpu")))


@pytest.mark.parametrize(("stage", "quant", "hpz", "qat", "where"), COMBINATIONS)
def test_every_quantization_combination_renders_and_validates(stage: int, quant: str, hpz: int | None, qat: str,
                                                              where: str) -> None:
    machine = CPU if where == "cpu" else GPU
    line = f"--nproc 2 --zero {stage} --quant {quant} --qat {qat}" + (f" --hpz {hpz}" if hpz else "")
    problems = problems_of(line, machine)
    expected = expected_problems(stage, quant, hpz, machine)
    got = {(p.where, rule) for p in problems for _, rule in expected if rule in p.rule}
    assert got == expected and len(problems) == len(expected), \
        f"%%bigtrain {line} on {where}: expected {sorted(expected)}, got {[str(p) for p in problems]}"
    if problems:
        return
    ds = plan_run(parse_line(line), machine).deepspeed
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert zero.get("zero_quantized_weights", False) is ("qwz" in quant), zero
    assert zero.get("zero_quantized_gradients", False) is ("qgz" in quant), zero
    assert zero.get("zero_hpz_partition_size", 1) == (hpz or 1), zero
    assert "qat" not in json.dumps(ds), "--qat is nbtrain's (torchao), not a DeepSpeed key"


def test_zeropp_keys_from_a_config_file_are_judged_like_the_flags() -> None:
    base = {"zero_optimization": {"stage": 2, "zero_hpz_partition_size": 2, "zero_quantized_gradients": True}}
    with pytest.raises(ConfigError) as err:
        plan_run(parse_line("--nproc 2"), CPU, base)
    wheres = sorted(p.where for p in err.value.problems)
    assert wheres == ["zero_optimization.zero_hpz_partition_size", "zero_optimization.zero_quantized_gradients",
                      "zero_optimization.zero_quantized_gradients"], wheres


def test_qat_is_accepted_with_every_stage_offload_and_precision() -> None:
    line = "--nproc 2 --zero 3 --offload-optimizer cpu --offload-param cpu --precision bf16 --hpz 2 --qat int4"
    plan = plan_run(parse_line(line), CPU)
    assert plan.config.qat == "int4" and get_path(plan.deepspeed, "zero_optimization.zero_hpz_partition_size") == 2


# -- real runs -------------------------------------------------------------------------------
# DeepSpeed keeps parameters below stage3_param_persistence_threshold (1e5 elements) whole on
# every rank, so without a threshold of 0 the toy model would never be partitioned at all.
# Count, after each backward pass, the parameters that hold hpZ's secondary partition
# (DeepSpeed's ds_secondary_tensor, which the backward all-gathers read and each optimizer
# step invalidates): the proof that hierarchical partitioning was really on.
HPZ_CELL = """%%bigtrain --nproc 2 --zero 3 --steps 12 --micro-batch 8 --no-plot --name {name} {flags}
engine, loader = bigtrain.prepare(make_model(), ToyData())
for batch in loader:
    loss = loss_fn(engine, batch)
    engine.backward(loss)
    secondary = sum(p.ds_secondary_tensor is not None for p in engine.module.parameters())
    engine.step()
    bigtrain.log(loss=loss, secondary=secondary)"""


def logged(run: Path, key: str) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics" / "rank-0.jsonl").read_text().splitlines()]
    return [r[key] for r in sorted(records, key=lambda r: r["step"]) if key in r]


@pytest.mark.integration
def test_hpz_trains_on_cpu_with_the_same_losses_as_plain_zero3(kernel: Kernel, tmp_path: Path) -> None:
    every_param = "--set zero_optimization.stage3_param_persistence_threshold=0"
    for name, flags in (("zero3", every_param), ("hpz", f"{every_param} --hpz 2")):
        kernel.execute(HPZ_CELL.format(flags=flags, name=name))
    runs = {run.name.split("-")[2]: run for run in (tmp_path / "bigtrain-runs").iterdir()}
    effective = json.loads((runs["hpz"] / "deepspeed.effective.json").read_text())["config"]
    assert effective["zero_optimization"]["zero_hpz_partition_size"] == 2
    assert set(logged(runs["hpz"], "secondary")) == {4}, "hpZ kept no secondary partition of the 4 parameters"
    assert set(logged(runs["zero3"], "secondary")) == {0}
    plain, hpz = logged(runs["zero3"], "loss"), logged(runs["hpz"], "loss")
    assert len(hpz) == 12 and hpz[-1] < hpz[0], f"hpZ run did not learn: {hpz}"
    # hpZ changes only where the backward all-gather reads from; the arithmetic is the same.
    assert hpz == pytest.approx(plain, abs=1e-6), f"hpZ {hpz} vs ZeRO-3 {plain}"


QUANT_CELL = """%%bigtrain --nproc 2 --zero 3 --quant {quant} --steps 20 --micro-batch 8 --no-plot --name {name}
def on_device(model, batch):  # the loader hands out CPU tensors; this run's weights live on the GPU
    return loss_fn(model, tuple(t.to(bigtrain.device) for t in batch))
bigtrain.fit(make_model(), ToyData(), loss_fn=on_device)"""


@pytest.mark.gpu
def test_qwz_and_qgz_train_with_zero3_on_gpus(kernel: Kernel, tmp_path: Path) -> None:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip(f"2 worker processes need 2 GPUs; this machine has {torch.cuda.device_count()}")
    for quant in ("none", "qwz+qgz"):
        kernel.execute(QUANT_CELL.format(quant=quant, name=quant.replace("+", "")))
    runs = {run.name.split("-")[2]: run for run in (tmp_path / "bigtrain-runs").iterdir()}
    effective = json.loads((runs["qwzqgz"] / "deepspeed.effective.json").read_text())["config"]["zero_optimization"]
    assert effective["zero_quantized_weights"] is True and effective["zero_quantized_gradients"] is True
    plain, quantized = losses(runs["none"]), losses(runs["qwzqgz"])
    assert quantized[-1] < quantized[0], f"qwZ+qgZ run did not learn: {quantized}"
    # int8 weights in the all-gather and int4 gradients in the reduce-scatter cost a little accuracy.
    assert quantized[-1] == pytest.approx(plain[-1], abs=0.1), f"qwZ+qgZ {quantized} vs ZeRO-3 {plain}"
