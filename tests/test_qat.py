"""Quantization-aware training (`--qat int8|int4`): fake-quantized layers, their conversion, real runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from nbtrain.worker import qat
from tests.conftest import losses
from tests.kernel import Kernel


def small_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4))


def mlp(width: int = 64) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.Tanh(), torch.nn.Linear(width, 4))


def test_prepare_fake_quantizes_every_layer_of_a_gpt2_but_the_tied_head() -> None:
    from torchao.quantization.qat import FakeQuantizedLinear

    model = small_gpt2()
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids, labels=ids).loss.item()
    swapped = qat.prepare(model, "int8")
    fake = [name for name, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)]
    # c_attn, attn.c_proj, c_fc, mlp.c_proj per block (GPT-2's Conv1D turned into Linear first)
    assert swapped == len(fake) == 8, fake
    assert model.lm_head.weight is model.transformer.wte.weight, "the tied LM head was untied"
    assert not isinstance(model.lm_head, FakeQuantizedLinear)
    after = model(input_ids=ids, labels=ids).loss.item()
    assert after == pytest.approx(before, abs=0.02), "int8 fake quantization changed the loss too much"
    assert after != before, "the fake quantizers did nothing"


def test_the_converted_model_computes_what_the_fake_quantized_one_trained() -> None:
    for mode in ("int8", "int4"):
        model = mlp()
        qat.prepare(model, mode)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
        for _ in range(3):  # gradients pass through the rounding (straight-through)
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        fake_out = model(x).detach()
        converted: Any = qat.convert(copy.deepcopy(model), mode)
        assert all(type(m) is torch.nn.Linear for m in (converted[0], converted[2])), converted
        weight = converted[2].weight
        assert type(weight).__name__ == "IntxUnpackedToInt8Tensor", type(weight)
        low, high = (-128, 127) if mode == "int8" else (-8, 7)
        assert low <= int(weight.qdata.min()) and int(weight.qdata.max()) <= high, f"{mode}: codes out of range"
        real_out = converted(x).detach()
        assert torch.allclose(real_out, fake_out, atol=1e-4), \
            f"{mode}: converted model differs from the trained fake-quantized one by {(real_out - fake_out).abs().max()}"


def test_int4_uses_groups_of_32_where_the_width_allows_and_channels_elsewhere() -> None:
    model = mlp(width=64)
    qat.prepare(model, "int4")
    converted: Any = qat.convert(model, "int4")
    assert converted[0].weight.block_size == (1, 16), "16 inputs: one scale per output channel"
    assert converted[2].weight.block_size == (1, qat.GROUP_SIZE), "64 inputs: groups of 32"


def test_models_qat_cannot_train_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"wrap it: torch.nn.Sequential\(layer\)"):
        qat.prepare(torch.nn.Linear(4, 4), "int8")
    with pytest.raises(ValueError, match="found no torch.nn.Linear layer"):
        qat.prepare(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3)), "int8")


# -- through a real kernel and real DeepSpeed workers -----------------------------------------
# Training loss of rank 0's converted model, measured in the kernel on the whole data set.
FIT_OUT = """%%bigtrain --nproc 2 --steps 30 --micro-batch 8 --lr 0.01 --no-plot {flags} --name {name} --out {name}
{name} = bigtrain.fit(make_model(), ToyData(), loss_fn=loss_fn)"""
KERNEL_EVAL = "x, y = ToyData()[:]\nprint(json.dumps({{'loss': loss_fn({name}.model, (x, y)).item(), " \
              "'weight': type({name}.model[0].weight).__name__}}))"


@pytest.mark.integration
def test_qat_trains_inside_deepspeed_and_the_quantized_model_comes_back(kernel: Kernel, tmp_path: Path) -> None:
    runs = {"fp32": "--zero 2", "qat8": "--zero 2 --qat int8", "qat4z3": "--zero 3 --qat int4"}
    kernel.execute("import json")
    in_kernel, shown = {}, None
    for name, flags in runs.items():
        kernel.execute(FIT_OUT.format(flags=flags, name=name))
        in_kernel[name] = json.loads(kernel.execute(KERNEL_EVAL.format(name=name)).text.strip().splitlines()[-1])
        if name == "fp32":  # post-training quantization in the kernel, before anything imported torchao there
            shown = kernel.execute("import nbtrain\nnbtrain.quantize(fp32.model, 'int8_dynamic', "
                                   "eval_fn=lambda m: loss_fn(m, ToyData()[:]), example_batch=ToyData()[:8][0])")
    logged = {run.name.split("-")[2]: losses(run) for run in (tmp_path / "bigtrain-runs").iterdir()}
    for name in runs:
        assert logged[name][-1] < logged[name][0] - 0.1, f"{name}: the loss did not go down: {logged[name]}"
    assert in_kernel["fp32"]["weight"] == "Parameter"
    for name in ("qat8", "qat4z3"):
        assert in_kernel[name]["weight"] == "IntxUnpackedToInt8Tensor", f"{name}: {in_kernel[name]}"
        # The converted int8/int4 model evaluated in the kernel is about as good as the float one.
        assert in_kernel[name]["loss"] == pytest.approx(in_kernel["fp32"]["loss"], abs=0.05), in_kernel
    assert in_kernel["qat8"]["loss"] == pytest.approx(logged["qat8"][-1], abs=0.1), \
        "the converted model is far from the model QAT trained"
    assert shown is not None
    html = next(m.content["data"]["text/html"] for m in shown.messages if m.kind == "execute_result")
    assert "QuantizationReport" in html and "after (int8_dynamic)" in html, html
    assert "Failed to load" not in shown.text, f"torchao's import noise reached the notebook:\n{shown.text}"
