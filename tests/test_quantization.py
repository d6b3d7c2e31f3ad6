"""Post-training quantization in the kernel: `nbtrain.quantize` and its before/after report."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch

import nbtrain
from nbtrain.quantization import PtqMode, linear_from_conv1d, quantize


def small_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4))


IDS = torch.randint(0, 96, (8, 24), generator=torch.Generator().manual_seed(3))


def lm_loss(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=IDS, labels=IDS).loss


@pytest.mark.parametrize("mode", ["int8_weight_only", "int8_dynamic"])
def test_ptq_shrinks_a_gpt2_and_keeps_its_eval_loss(mode: PtqMode) -> None:
    model = small_gpt2()
    report = quantize(model, mode, eval_fn=lm_loss, example_batch={"input_ids": IDS}, repeats=3)
    # 8 projection layers become int8; the tied embedding/LM head stays float.
    assert report.quantized_layers == 8
    assert report.size_after < 0.45 * report.size_before, f"{mode}: {report.size_before} -> {report.size_after} bytes"
    assert report.eval_after == pytest.approx(report.eval_before, abs=0.01), report.table
    assert report.forward_before_s and report.forward_after_s, "no forward timing with an example batch"
    quantized: Any = report.model
    assert quantized.lm_head.weight is quantized.transformer.wte.weight, "quantizing untied the LM head"
    assert type(quantized.transformer.h[0].mlp.c_fc.weight).__name__ == "Int8Tensor"


def test_the_original_model_is_left_as_it_was() -> None:
    model = small_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize(model, "int8_dynamic", eval_fn=lm_loss)
    assert model.training, "quantize left the model in eval mode"
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the original's weights changed"


def test_the_report_is_a_table_with_a_readable_repr_and_html() -> None:
    report = quantize(small_gpt2(), "int8_weight_only", eval_fn=lm_loss)
    table = report.table
    assert list(table.columns) == ["size_mib", "eval_loss", "forward_ms"]
    assert list(table.index) == ["before (float)", "after (int8_weight_only)"]
    assert table["forward_ms"].isna().all(), "forward time without an example batch must be missing, not made up"
    text = repr(report)
    assert text.startswith("QuantizationReport: 8 Linear layers -> int8_weight_only, size x0.")
    assert "eval loss +" in text or "eval loss -" in text
    html = report._repr_html_()
    assert "<table" in html and "after (int8_weight_only)" in html


def test_gpt2_conv1d_layers_become_equal_linear_layers() -> None:
    model = small_gpt2().eval()
    reference = model(input_ids=IDS).logits
    assert linear_from_conv1d(model) == 8
    assert not any(type(m).__name__ == "Conv1D" for m in model.modules())
    assert torch.allclose(model(input_ids=IDS).logits, reference, atol=1e-5)


def test_unknown_modes_and_models_without_linear_layers_are_refused() -> None:
    with pytest.raises(ValueError, match="mode='int4'.*use one of int8_weight_only, int8_dynamic"):
        quantize(small_gpt2(), "int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no torch.nn.Linear layer"):
        quantize(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3)))


def test_nbtrain_quantize_is_the_function_and_import_nbtrain_stays_light() -> None:
    assert nbtrain.quantize is quantize
    code = "import sys, nbtrain; assert 'torch' not in sys.modules and 'torchao' not in sys.modules; print('light')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "light", out.stderr
